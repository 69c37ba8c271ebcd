"""Token-level sampling: filters on hand-made logits, cached == recomputed decoding, greedy,
guidance, priming, seeds and batch-size independence, callbacks, bad input. Tiny random models
on the CPU reference path, one thread."""

from __future__ import annotations

import dataclasses
import math
from typing import get_type_hints

import pytest
import torch
from _pipeline_fixtures import peaked, tiny_transformer_config
from dalle_ar.kernels.layouts import Layout
from dalle_ar.kernels.reference import decode_reference, decode_sdpa

from dalle_ar.models.transformer import Transformer
from dalle_ar.runtime import sample_seeds, uniforms
from dalle_ar.sampling import (
    combine,
    decode_one,
    filter_logits,
    generate_image_tokens,
    guide,
    logits_to_probs,
    prefill,
    sample_from_probs,
)
from dalle_ar.sampling.settings import (
    ARSampling,
    MaskedSampling,
    PriorSampling,
    RerankSettings,
    UpsampleSampling,
)

T, H, W, TV, IV = 6, 3, 4, 40, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **kw) -> Transformer:
    shape = dict(text_vocab=TV, text_len=T, image_vocab=IV, grid_h=H, grid_w=W, depth=3)
    torch.manual_seed(seed)
    return peaked(Transformer(tiny_transformer_config(**{**shape, **kw})).eval())


def prompts(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TV, (n, T), generator=g)
    lens = torch.tensor([T, 2, 4, 5, 3][:n])
    ids[:, 0] = 1
    for i, n_valid in enumerate(lens.tolist()):
        ids[i, n_valid - 1] = 2
        ids[i, n_valid:] = 0
    return ids, lens


EMPTY = torch.tensor([1, 2] + [0] * (T - 2))


# -- logits -> probabilities -> tokens ---------------------------------------------------------


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 3.0):
        want = torch.softmax(logits / t, -1)
        assert torch.allclose(logits_to_probs(logits, temperature=t), want)
    assert logits_to_probs(logits, temperature=0.25)[0, 0] > logits_to_probs(logits)[0, 0]


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()[0]
    assert kept.tolist() == [False, True, False, True, False]
    one = filter_logits(torch.tensor([[0.5, 2.0, 2.0]]), top_k=1).isfinite()
    assert int(one.sum()) == 1
    assert filter_logits(logits, top_k=99).isfinite().all()  # k >= V: nothing to drop


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: filter_logits(logits, top_p=p).isfinite()[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.8) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.81) == [False, True, True, True]  # needs the 0.15 too
    assert kept(0.01) == [False, True, False, False]  # the most likely always stays
    assert kept(1.0) == [True, True, True, True]
    renorm = logits_to_probs(logits, top_p=0.8)[0]
    assert torch.allclose(renorm, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_inverse_cdf_sampling_follows_the_cdf_and_skips_zero_mass():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(5, -1)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1 - 2**-52], dtype=torch.float64)
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_guide_is_uncond_plus_scale_times_difference():
    c, u = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    assert torch.equal(guide(c, u, 0.0), u)
    assert torch.allclose(guide(c, u, 1.0), c)
    assert torch.allclose(guide(c, u, 3.0), torch.tensor([[-1.0, 9.0]]))


def test_combine_adds_each_condition_s_push_from_the_unconditional_logits():
    c, p, u = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    assert torch.equal(combine(torch.stack([c, u]), [3.0]), guide(c, u, 3.0))
    two = torch.cat([c, c]), torch.cat([u, u])
    per_row = combine(torch.stack(two), [torch.tensor([3.0, 0.0])])  # one scale per row
    assert torch.equal(per_row, torch.cat([guide(c, u, 3.0), u]))
    got = combine(torch.stack([c, p, u]), [1.5, 0.5])
    assert torch.allclose(got, u + 1.5 * (c - u) + 0.5 * (p - u))
    with pytest.raises(ValueError, match="expected 2 scales"):
        combine(torch.stack([c, p, u]), [1.0])
    with pytest.raises(ValueError, match="one weight per row"):
        combine(torch.stack([c, u]), [torch.tensor([1.0, 2.0])])


def test_seed_rules_and_streams():
    assert sample_seeds(3, 10) == [10, 11, 12]
    assert sample_seeds(2, [7, 3]) == [7, 3]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sample_seeds(4, generator=g1) == sample_seeds(4, generator=g2)
    a, b = uniforms([1, 2], 8), uniforms([2], 8)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="one seed per sample"):
        sample_seeds(3, [1, 2])


@pytest.mark.parametrize("kind", ["full", "row", "col", "conv"])
def test_fast_decode_step_matches_the_reference(kind):
    lay = Layout(kind, 5, 3, 4, 3)
    n, B, Hh, D = lay.seq_len, 3, 2, 8
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, Hh, n, D, generator=g), torch.randn(B, Hh, n, D, generator=g)
    text_lens = torch.tensor([5, 2, 3])
    for length in range(1, n + 1):
        q = torch.randn(B, Hh, 1, D, generator=g)
        lengths = torch.tensor([length, max(1, length - 2), n])
        got = decode_sdpa(q, k, v, lengths, lay, text_lens)
        want = decode_reference(q, k, v, lengths, lay, text_lens)
        assert torch.allclose(got, want, atol=1e-5)


# -- the loop ----------------------------------------------------------------------------------


def test_cached_sampling_equals_recomputing_the_sequence():
    model = tiny_model()
    ids, lens = prompts()
    kw = dict(text_lens=lens, num_samples=2, seeds=0, top_k=8, temperature=0.9)
    cached = generate_image_tokens(model, ids, **kw)
    full = generate_image_tokens(model, ids, use_cache=False, **kw)
    assert cached.shape == (6, H, W)
    assert torch.equal(cached, full)
    guided = dict(kw, guidance_scale=2.5, empty_ids=EMPTY)
    assert torch.equal(
        generate_image_tokens(model, ids, **guided),
        generate_image_tokens(model, ids, use_cache=False, **guided),
    )


def test_top_k_one_is_greedy():
    model = tiny_model()
    ids, lens = prompts(2)
    got = generate_image_tokens(model, ids, text_lens=lens, top_k=1, seeds=3)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(H * W):
            nxt = model(seq, text_lens=lens).image[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got.flatten(1), seq[:, T:])


def test_guidance_scale_one_is_plain_conditional_sampling():
    """The two-stream loop, written with the public pieces, at scale 1 samples the same codes
    as conditional sampling (which skips the unconditional stream)."""
    model = tiny_model()
    ids, lens = prompts(2)
    plain = generate_image_tokens(model, ids, text_lens=lens, seeds=[4, 9], guidance_scale=1.0)
    B, u = 2, uniforms([4, 9], H * W)
    both = torch.cat([ids, EMPTY.expand(B, -1)])
    both_lens = torch.cat([lens, torch.tensor([2, 2])])
    model.setup_cache(2 * B)
    codes = []
    with torch.no_grad():
        logits = prefill(model, both, text_lens=both_lens)
        for i in range(H * W):
            probs = logits_to_probs(guide(logits[:B], logits[B:], 1.0))
            code = sample_from_probs(probs, u[:, i])
            codes.append(code)
            if i + 1 < H * W:
                pos = torch.tensor([T + i])
                logits = decode_one(model, code.repeat(2)[:, None], pos, text_lens=both_lens)
    model.clear_cache()
    assert torch.equal(plain.flatten(1), torch.stack(codes, 1))
    strong = generate_image_tokens(
        model, ids, text_lens=lens, seeds=[4, 9], guidance_scale=4.0, empty_ids=EMPTY
    )
    assert not torch.equal(strong, plain)  # guidance does change the samples


def test_composed_parts_follow_the_product_of_experts():
    """With parts, each step samples from uncond + g (cond - uncond) + s sum_k w_k (part_k -
    uncond), written here with the public pieces and recomputing the sequence; part_scale 0 is
    plain guidance, and the cached loop equals recomputing."""
    model = tiny_model()
    ids, lens = prompts(2)
    parts_ids, parts_lens = prompts(4, seed=7)
    parts, plens = parts_ids.view(2, 2, T), parts_lens.view(2, 2)
    kw = dict(text_lens=lens, seeds=[4, 9], guidance_scale=1.5, empty_ids=EMPTY)
    weights = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    composed = dict(parts=parts, part_lens=plens, part_scale=0.7, part_weights=weights)
    got = generate_image_tokens(model, ids, **composed, **kw)
    B, u = 2, uniforms([4, 9], H * W)
    streams = torch.cat([ids, parts[:, 0], parts[:, 1], EMPTY.expand(B, -1)])
    slens = torch.cat([lens, plens[:, 0], plens[:, 1], torch.tensor([2, 2])])
    codes = torch.zeros(B, 0, dtype=torch.long)
    with torch.no_grad():
        for i in range(H * W):
            seq = torch.cat([streams, codes.repeat(4, 1)], 1)
            logits = model(seq, text_lens=slens).image[:, -1].view(4, B, -1)
            probs = logits_to_probs(combine(logits, [1.5, *(0.7 * weights.T)]))
            codes = torch.cat([codes, sample_from_probs(probs, u[:, i])[:, None]], 1)
    assert torch.equal(got.flatten(1), codes)
    assert torch.equal(
        got,
        generate_image_tokens(model, ids, **composed, use_cache=False, **kw),
    )
    zero = generate_image_tokens(model, ids, parts=parts, part_lens=plens, part_scale=0.0, **kw)
    assert torch.equal(zero, generate_image_tokens(model, ids, **kw))
    assert not torch.equal(got, zero)  # the parts do change the samples


def test_primed_rows_are_returned_unchanged_and_the_rest_is_sampled():
    model = tiny_model()
    ids, lens = prompts(2)
    prime = torch.randint(0, IV, (2, 2, W), generator=torch.Generator().manual_seed(0))
    kw = dict(text_lens=lens, num_samples=2, seeds=0, prime_codes=prime)
    got = generate_image_tokens(model, ids, **kw)
    assert torch.equal(got[:, :2], prime.repeat_interleave(2, 0))
    assert torch.equal(got, generate_image_tokens(model, ids, use_cache=False, **kw))
    free = generate_image_tokens(model, ids, text_lens=lens, num_samples=2, seeds=0)
    assert not torch.equal(got[:, 2:], free[:, 2:])  # the sampled rows see the primed ones
    full = generate_image_tokens(model, ids, text_lens=lens, prime_codes=free[::2])
    assert torch.equal(full, free[::2])  # all rows primed: nothing left to sample


def test_seeds_reproduce_and_differ():
    model = tiny_model()
    ids, lens = prompts(1)
    a = generate_image_tokens(model, ids, text_lens=lens, num_samples=3, seeds=[1, 2, 3])
    b = generate_image_tokens(model, ids, text_lens=lens, num_samples=3, seeds=[1, 2, 3])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    g = torch.Generator().manual_seed(0)
    c = generate_image_tokens(model, ids, text_lens=lens, generator=g)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(c, generate_image_tokens(model, ids, text_lens=lens, generator=g))


def test_a_sample_does_not_depend_on_its_batch():
    model = tiny_model()
    ids, lens = prompts(3)
    kw = dict(top_p=0.9, guidance_scale=2.0, empty_ids=EMPTY)
    batch = generate_image_tokens(model, ids, text_lens=lens, num_samples=2, seeds=100, **kw)
    for i in range(6):
        p = i // 2
        alone = generate_image_tokens(model, ids[p : p + 1], text_lens=lens[p : p + 1],
                                      seeds=[100 + i], **kw)  # fmt: skip
        assert torch.equal(alone[0], batch[i])


def test_callback_sees_every_step():
    model = tiny_model()
    ids, lens = prompts(1)
    seen = []
    prime = torch.zeros(1, 1, W, dtype=torch.long)
    out = generate_image_tokens(
        model,
        ids,
        text_lens=lens,
        prime_codes=prime,
        seeds=0,
        callback=lambda filled, total, codes: seen.append((filled, total, codes.clone())),
    )
    assert [s[0] for s in seen] == list(range(W + 1, H * W + 1))
    assert all(s[1] == H * W for s in seen)
    assert torch.equal(seen[-1][2], out)
    assert torch.equal(seen[0][2].flatten(1)[:, : W + 1], out.flatten(1)[:, : W + 1])


def test_embedding_conditioned_model_samples_with_guidance():
    model = tiny_model(cond_dim=8, cond_tokens=2)
    ids, lens = prompts(2)
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(text_lens=lens, cond=cond, seeds=0, guidance_scale=2.0, empty_ids=EMPTY)
    got = generate_image_tokens(model, ids, **kw)
    assert torch.equal(got, generate_image_tokens(model, ids, use_cache=False, **kw))


def test_model_whose_embedding_replaces_the_text_samples_from_cond_alone():
    model = tiny_model(cond_dim=8, cond_tokens=2, cond_mode="replace")
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(cond=cond, seeds=0, guidance_scale=2.0)
    got = generate_image_tokens(model, None, **kw)
    assert got.shape == (2, H, W)
    assert torch.equal(got, generate_image_tokens(model, None, use_cache=False, **kw))
    with pytest.raises(ValueError, match="replaces the text"):
        generate_image_tokens(model, torch.zeros(2, T, dtype=torch.long), cond=cond)


def test_model_state_is_left_as_it_was():
    model = tiny_model().train()
    ids, lens = prompts(1)
    generate_image_tokens(model, ids, text_lens=lens, seeds=0)
    assert model.training and model.blocks[0].attn.cache is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(temperature=0.0), "'temperature': must be a finite number >= 0.001"),
        (dict(temperature=1e-45), "'temperature': must be a finite number >= 0.001"),
        (dict(guidance_scale=math.inf), "'guidance_scale': must be a finite number >= 0"),
        (dict(top_p=math.nan), r"'top_p': must be in \(0, 1\]"),
        (dict(top_k=-1), "'top_k': must be an int >= 0"),
        (dict(top_p=0.0), r"'top_p': must be in \(0, 1\]"),
        (dict(top_p=1.5), r"'top_p': must be in \(0, 1\]"),
        (dict(num_samples=0), "num_samples must be an int >= 1"),
        (dict(guidance_scale=3.0), "needs empty_ids"),
        (dict(guidance_scale=-1.0), "'guidance_scale': must be a finite number >= 0"),
        (dict(seeds=[1, 2, 3]), "one seed per sample"),
        (dict(prime_codes=torch.zeros(2, 1, W + 1, dtype=torch.long)), "prime_codes must be"),
        (dict(prime_codes=torch.full((2, 1, W), IV)), r"prime_codes must be in \[0, 16\)"),
        (dict(text_lens=torch.tensor([0, 3])), r"text_lens must be in \[1, 6\]"),
        (dict(cond=torch.zeros(2, 4)), "cond_dim=0"),
        (dict(parts=torch.zeros(2, 1, T - 1, dtype=torch.long)), r"parts must be a \(N=2, K"),
        (dict(parts=torch.zeros(2, 1, T, dtype=torch.long)), "part_lens must have shape"),
        (
            dict(parts=torch.zeros(2, 1, T, dtype=torch.long), part_lens=torch.zeros(2, 1)),
            r"part_lens must be in \[1, 6\]",
        ),
        (dict(part_scale=-1.0), "sampling setting .part_scale.: must be a finite number >= 0"),
        (dict(part_lens=torch.ones(2, 1, dtype=torch.long)), "were given without parts"),
        (dict(cuda_graph=True), "cuda_graph needs a CUDA model"),
    ],
)
def test_bad_input_is_refused_by_name(kw, match):
    model = tiny_model()
    ids, lens = prompts(2)
    with pytest.raises(ValueError, match=match):
        generate_image_tokens(model, ids, **{"text_lens": lens, **kw})


@pytest.mark.parametrize(
    "cls", [ARSampling, PriorSampling, MaskedSampling, RerankSettings, UpsampleSampling]
)
def test_every_float_setting_is_refused_when_not_finite(cls):
    """The one check of each settings dataclass refuses inf, -inf and NaN in every float field,
    naming the field and the value (the CLI, the API and JSON records all come through it)."""
    floats = [f.name for f in dataclasses.fields(cls) if get_type_hints(cls)[f.name] is float]
    for name in floats:
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(ValueError, match=rf"'{name}': must be .*got {bad!r}"):
                cls(**{name: bad}).validate()


def test_probabilities_that_are_not_finite_stop_sampling_naming_the_step():
    """A model (or guidance) whose logits are NaN at a position stops the loop there with an
    error naming the sample and position, instead of drawing the last code everywhere."""
    model = tiny_model()
    ids, lens = prompts(2)
    with torch.no_grad():
        model.image_head.weight[3, 0] = math.nan  # every logit row is NaN from the first code
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="image position 0 of sample 0: the probabilities"):
            generate_image_tokens(model, ids, text_lens=lens, use_cache=use_cache)
    # guidance that overflows float32 stops it too, past primed rows, naming the setting
    prime = torch.zeros(2, 1, W, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position \d+ of sample \d: .*guidance_scale=1e\+38"):
        generate_image_tokens(tiny_model(), ids, text_lens=lens, guidance_scale=1e38,
                              empty_ids=EMPTY, prime_codes=prime)  # fmt: skip


def test_text_of_the_wrong_length_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="text_len 6 columns, got 5"):
        generate_image_tokens(model, torch.zeros(1, T - 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, T\) long tensor"):
        generate_image_tokens(model, torch.zeros(1, T))


def test_sampling_follows_the_model_distribution():
    """Over many seeds, the first code's frequencies match the model's probabilities."""
    model = tiny_model()
    ids, lens = prompts(1)
    n = 400
    with torch.no_grad():
        model.setup_cache(1)
        want = logits_to_probs(prefill(model, ids, text_lens=lens), top_k=4)[0]
        model.clear_cache()
    seen = torch.zeros(IV)
    for s in range(n):
        u = uniforms([s], 1)
        seen[int(sample_from_probs(want[None], u[:, 0]))] += 1
    # binomial standard error at n=400 is at most 0.025; allow 4 of them
    assert (seen / n - want).abs().max() < 4 * math.sqrt(0.25 / n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_graph_sampling_equals_eager_sampling(impl):
    """The decode step captured in a CUDA graph draws the same tokens as the eager loop: plain,
    guided with top-k / top-p, and composed."""
    model = tiny_model(attn_impl=impl).cuda()
    ids, lens = prompts(2)
    parts_ids, parts_lens = prompts(4, seed=7)
    guided = dict(guidance_scale=2.5, empty_ids=EMPTY, top_k=8, top_p=0.9, temperature=0.8)
    composed = dict(guidance_scale=1.5, empty_ids=EMPTY, parts=parts_ids.view(2, 2, T),
                    part_lens=parts_lens.view(2, 2), part_scale=0.7)  # fmt: skip
    for extra in ({}, guided, composed):
        kw = dict(text_lens=lens, num_samples=3, seeds=5, **extra)
        graphed = generate_image_tokens(model, ids, cuda_graph=True, **kw)
        eager = generate_image_tokens(model, ids, cuda_graph=False, **kw)
        assert torch.equal(graphed, eager)
