"""The masked generator and its sampler: no causal shift, bidirectional attention over the image,
the cosine unmasking schedule (one step unmasks exactly the scheduled count), guidance 1 equals
plain sampling, batch independence, kept codes untouched (inpainting), the training masks."""

from __future__ import annotations

import math

import pytest
import torch
from _pipeline_fixtures import peaked, tiny_transformer_config

from dalle_ar import runtime
from dalle_ar.config import ConfigError
from dalle_ar.models.transformer import Transformer, TransformerConfig
from dalle_ar.sampling.logits import logits_to_probs
from dalle_ar.sampling.masked import (
    MaskGITScheduler,
    corrector_groups,
    generate_masked,
    masked_precision,
)
from dalle_ar.sampling.settings import MaskedSampling
from dalle_ar.train.objectives import mask_codes, masked_loss

T, H, W, TV, IV = 6, 3, 4, 40, 16
EMPTY = torch.tensor([1, 2] + [0] * (T - 2))
pytestmark = pytest.mark.usefixtures("one_thread")


def masked_model(seed: int = 0) -> Transformer:
    cfg = tiny_transformer_config(text_vocab=TV, text_len=T, image_vocab=IV, grid_h=H, grid_w=W,
                                  layouts="bidir", objective="masked")  # fmt: skip
    torch.manual_seed(seed)
    return peaked(Transformer(cfg).eval())


def prompts(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TV, (n, T), generator=g)
    lens = torch.tensor([T, 2, 4, 5][:n])
    ids[:, 0] = 1
    for i, k in enumerate(lens.tolist()):
        ids[i, k - 1], ids[i, k:] = 2, 0
    return ids, lens


def test_the_masked_objective_reads_every_code_and_predicts_its_own_position():
    model = masked_model()
    ids, lens = prompts(2)
    codes = torch.randint(0, IV, (2, H * W))
    codes[:, 5] = model.cfg.mask_id
    with torch.no_grad():
        out = model(torch.cat([ids, codes], 1), text_lens=lens).image
        later = codes.clone()
        later[:, -1] = (later[:, -1] + 1) % IV  # a later code changes an earlier prediction
        other = model(torch.cat([ids, later], 1), text_lens=lens).image
    assert out.shape == (2, H * W, IV)  # one logit row per image position: no shift
    assert not torch.allclose(out[:, 0], other[:, 0])
    with pytest.raises(ConfigError, match="bidir"):
        TransformerConfig(objective="masked", layouts="full").validate()
    with pytest.raises(ConfigError, match="objective=masked"):
        TransformerConfig(layouts="bidir").validate()


def test_one_step_unmasks_exactly_the_scheduled_count():
    B, n, steps = 3, H * W, 5
    sched = MaskGITScheduler(mask_id=IV, confidence_temperature=4.5)
    codes = torch.full((B, n), IV)
    codes[2, :4] = 3  # an inpainting row: 4 codes kept, 8 to draw
    sched.set_timesteps(steps, codes)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        probs = torch.softmax(torch.randn(B, n, IV, generator=g), -1)
        before = codes.clone()
        codes = sched.step(probs, t, codes, torch.rand(B, n, generator=g),
                           torch.rand(B, n, generator=g))  # fmt: skip
        start = torch.tensor([n, n, n - 4])
        want = (start * math.cos(math.pi / 2 * (t + 1) / steps)).floor().long()
        assert torch.equal((codes == IV).sum(1), want)
        kept = before != IV
        assert torch.equal(codes[kept], before[kept])  # a drawn code is never masked again
    assert not (codes == IV).any() and torch.equal(codes[2, :4], torch.full((4,), 3))


def test_a_pass_that_unmasks_nothing_gives_the_codes_back_and_is_not_run(monkeypatch):
    sched = MaskGITScheduler(mask_id=IV, confidence_temperature=4.5)
    codes = torch.randint(0, IV, (1, H * W))
    codes[0, :3] = IV  # an inpainting of 3 codes in 12 passes: most unmask nothing
    sched.set_timesteps(12, codes)
    left = [3] + [int(sched.still_masked(t)[0]) for t in range(12)]
    idle = [t for t in range(12) if left[t + 1] == left[t]]
    assert len(idle) == 9  # 3 codes in 12 passes: 3 passes unmask one each
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, H * W, IV, generator=g), -1)
    u = torch.rand(2, 1, H * W, generator=g)
    t = idle[0]
    now = codes.clone()
    now[0, : 3 - left[t]] = 5  # the codes as they stand before that pass
    assert torch.equal(sched.step(probs, t, now, u[0], u[1]), now)
    # generate_masked runs only the passes that unmask something, and a sample draws the same
    # whether a batch beside it needs the passes it skips or not
    model = masked_model()
    ids, lens = prompts(2)
    init = torch.randint(0, IV, (2, H, W))
    init[0].view(-1)[:3] = IV
    init[1].view(-1)[:] = IV
    passes = []
    real = model.forward_image
    monkeypatch.setattr(model, "forward_image", lambda c, text_lens: passes.append(1) or real(
        c, text_lens=text_lens))  # fmt: skip
    kw = dict(text_lens=lens[:1], seeds=[0], steps=12)
    alone = generate_masked(model, ids[:1], init_codes=init[:1], **kw)
    assert len(passes) == 12 - len(idle) == 3
    both = generate_masked(model, ids, init_codes=init, text_lens=lens, seeds=[0, 1], steps=12)
    other = generate_masked(model, ids[1:], init_codes=init[1:], text_lens=lens[1:], seeds=[1],
                            steps=12)  # fmt: skip
    assert torch.equal(both, torch.cat([alone, other])) and not (both == IV).any()


def test_guidance_one_equals_plain_sampling():
    model = masked_model()
    ids, lens = prompts(2)
    s = MaskedSampling(steps=4, guidance_scale=1.0, temperature=0.8)
    got = generate_masked(model, ids, s, text_lens=lens, empty_ids=EMPTY, seeds=[3, 4])
    # by hand: the scheduler over the conditional logits alone
    from dalle_ar.runtime import uniforms

    n = H * W
    u = uniforms([3, 4], 2 * s.steps * n).view(2, 2, s.steps, n)
    sched = MaskGITScheduler(IV, s.confidence_temperature)
    codes = torch.full((2, n), IV)
    sched.set_timesteps(s.steps, codes)
    with torch.no_grad():
        for t in range(s.steps):
            logits = model(torch.cat([ids, codes], 1), text_lens=lens).image.float()
            codes = sched.step(logits_to_probs(logits, 0.8, 0), t, codes, u[:, 0, t], u[:, 1, t])
    assert torch.equal(got.view(2, n), codes)
    guided = generate_masked(model, ids, s, text_lens=lens, empty_ids=EMPTY, seeds=[3, 4],
                             guidance_scale=3.0)  # fmt: skip
    assert not torch.equal(got, guided)


def test_a_linear_guidance_schedule_starts_unguided_and_ends_at_the_scale():
    s = MaskedSampling(steps=5, guidance_scale=3.0, guidance_schedule="linear")
    assert [s.guidance_at(t) for t in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert {MaskedSampling(steps=5, guidance_scale=3.0).guidance_at(t) for t in range(5)} == {3.0}
    one_pass = MaskedSampling(steps=1, guidance_scale=3.0, guidance_schedule="linear")
    assert one_pass.guidance_at(0) == 3.0
    model = masked_model()
    ids, lens = prompts(2)

    def passes(**kw) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        generate_masked(model, ids, MaskedSampling(steps=2, temperature=0.8, **kw),
                        text_lens=lens, empty_ids=EMPTY, seeds=[3, 4],
                        callback=lambda t, n, codes: seen.append(codes.clone()))  # fmt: skip
        return seen

    plain, linear = passes(), passes(guidance_scale=3.0, guidance_schedule="linear")
    constant = passes(guidance_scale=3.0)
    assert torch.equal(linear[0], plain[0])  # the first pass is drawn at scale 1
    assert not torch.equal(constant[0], plain[0])
    assert not torch.equal(linear[-1], plain[-1])  # and the later ones are guided
    with pytest.raises(ConfigError, match="guidance_schedule"):
        MaskedSampling(guidance_schedule="cosine").validate()


@pytest.mark.parametrize("bf16", [False, True])
def test_a_pass_over_the_image_after_a_prefilled_caption_equals_the_whole_pass(bf16):
    # the sampler computes the text once and each pass over the image positions only
    model = masked_model()
    ids, lens = prompts(3)
    codes = torch.randint(0, IV + 1, (3, H * W))  # mask_id (IV) included
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        whole = model(torch.cat([ids, codes], 1), text_lens=lens).image
        model.setup_cache(3, dtype=torch.bfloat16 if bf16 else None)
        model(ids, torch.arange(T), text_lens=lens)
        first = model.forward_image(codes, text_lens=lens)
        again = model.forward_image(codes.flip(1), text_lens=lens)  # overwrites the image keys
        back = model.forward_image(codes, text_lens=lens)
    tol = 2e-2 if bf16 else 1e-5
    assert torch.allclose(first, whole, atol=tol) and torch.equal(back, first)
    assert not torch.allclose(again, whole, atol=1e-1)
    with pytest.raises(ValueError, match="for sampling: call it under torch.no_grad"):
        model.forward_image(codes, text_lens=lens)  # gradients on
    with torch.no_grad():
        with pytest.raises(ValueError, match="KV cache holds batch 3, got batch 2"):
            model.forward_image(codes[:2], text_lens=lens[:2])
        model.setup_cache(3)
        with pytest.raises(ValueError, match="prefill them first"):
            model.forward_image(codes, text_lens=lens)
        model.clear_cache()
        with pytest.raises(ValueError, match="no KV cache is set up"):
            model.forward_image(codes, text_lens=lens)


@pytest.mark.parametrize("precision,guidance", [("fp32", 1.0), ("fp32", 2.0), ("bf16", 2.0)])
def test_the_cached_caption_draws_the_codes_whole_passes_draw(precision, guidance, monkeypatch):
    model = masked_model()
    ids, lens = prompts(3)  # padded captions: text_lens 6, 2, 4
    s = MaskedSampling(steps=4, guidance_scale=guidance, corrector_steps=1, precision=precision)
    kw = dict(text_lens=lens, empty_ids=EMPTY, seeds=[0, 1, 2])
    cached = generate_masked(model, ids, s, **kw)
    text = torch.cat([ids, EMPTY.expand(3, -1)]) if guidance != 1 else ids
    monkeypatch.setattr(model, "forward_image", lambda codes, text_lens: model(
        torch.cat([text, codes], 1), text_lens=text_lens).image)  # fmt: skip
    assert torch.equal(generate_masked(model, ids, s, **kw), cached)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cached_caption_through_the_triton_kernels_equals_the_whole_pass():
    cfg = tiny_transformer_config(text_vocab=TV, text_len=T, image_vocab=IV, grid_h=H,
                                  grid_w=W, layouts="bidir", objective="masked",
                                  attn_impl="triton")  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().eval()
    ids, lens = (t.cuda() for t in prompts(3))
    codes = torch.randint(0, IV + 1, (3, H * W), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        whole = model(torch.cat([ids, codes], 1), text_lens=lens).image.float()
        model.setup_cache(3, dtype=torch.bfloat16)
        model(ids, torch.arange(T, device="cuda"), text_lens=lens)
        chunk = model.forward_image(codes, text_lens=lens).float()
    model.clear_cache()
    assert torch.allclose(chunk, whole, atol=5e-2, rtol=5e-2)


def test_the_prefix_is_computed_once_per_call_not_once_per_pass():
    model = masked_model()
    ids, lens = prompts(2)
    rows = []
    model.text_emb.register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    generate_masked(model, ids, MaskedSampling(steps=4, guidance_scale=2.0), text_lens=lens,
                    empty_ids=EMPTY, seeds=[0, 1])  # fmt: skip
    assert rows == [4]  # one prefill of the 2 captions and their 2 empty ones, for 4 passes
    assert model.blocks[0].attn.cache is None  # the cache is released


def test_probabilities_that_are_not_finite_stop_the_pass_naming_it():
    model = masked_model()
    ids, lens = prompts(2)
    with torch.no_grad():
        model.image_head.weight[3, 0] = math.nan
    with pytest.raises(ValueError, match="pass 1 of 4: the probabilities of sample 0 are not"):
        generate_masked(model, ids, MaskedSampling(steps=4), text_lens=lens)
    assert model.blocks[0].attn.cache is None  # released on the error too


CASES = [("fp32", True, "fp32"), ("bf16", False, "bf16"), ("auto", True, "bf16"),
         ("auto", False, "fp32")]  # fmt: skip


@pytest.mark.parametrize("precision,has_bf16,ran", CASES)
def test_the_passes_run_in_the_precision_asked_for_even_inside_an_autocast(
    precision, has_bf16, ran, monkeypatch
):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert masked_precision(torch.device("cpu"), precision) == ran
    model = masked_model()
    ids, lens = prompts(2)
    seen = []
    model.image_head.register_forward_hook(  # the passes' (the prefill's covers no image)
        lambda m, i, out: seen.append(out.dtype) if out.numel() else None
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's: fp32 stays fp32
        codes = generate_masked(model, ids, MaskedSampling(steps=2, precision=precision),
                                text_lens=lens, seeds=[0, 1])  # fmt: skip
    assert seen == [torch.bfloat16 if ran == "bf16" else torch.float32] * 2
    assert codes.dtype == torch.long and not (codes == IV).any()


def test_a_precision_other_than_auto_fp32_or_bf16_is_refused():
    with pytest.raises(ConfigError, match="sampling setting 'precision': must be auto, fp32"):
        MaskedSampling(precision="fp16").validate()


@pytest.mark.parametrize("corrector,precision", [(0, "fp32"), (3, "fp32"), (3, "bf16")])
def test_a_sample_is_the_same_alone_and_in_a_batch(corrector, precision):
    model = masked_model()
    ids, lens = prompts(3)
    kw = dict(steps=4, guidance_scale=2.0, empty_ids=EMPTY, corrector_steps=corrector,
              precision=precision)  # fmt: skip
    batch = generate_masked(model, ids, text_lens=lens, seeds=[7, 8, 9], **kw)
    alone = generate_masked(model, ids[1:2], text_lens=lens[1:2], seeds=[8], **kw)
    assert torch.equal(batch[1], alone[0])
    assert not (batch == IV).any() and batch.max() < IV


@pytest.mark.parametrize("corrector", [0, 2])
def test_inpainting_keeps_the_codes_outside_the_mask(corrector):
    model = masked_model()
    ids, lens = prompts(2)
    init = torch.randint(0, IV, (2, H, W))
    region = torch.zeros(H, W, dtype=torch.bool)
    region[1:, :2] = True
    init[:, region] = IV
    out = generate_masked(model, ids, text_lens=lens, seeds=[0, 1], init_codes=init, steps=3,
                          corrector_steps=corrector)  # fmt: skip
    assert torch.equal(out[:, ~region], init[:, ~region])
    assert not (out == IV).any()
    with pytest.raises(ValueError, match="init_codes must be"):
        generate_masked(model, ids, text_lens=lens, init_codes=init[:1])


def test_training_masks_follow_the_cosine_share_and_the_global_draw():
    image = torch.randint(0, IV, (8, H * W))
    whole, masked = mask_codes(image, IV, torch.Generator().manual_seed(5))
    assert (masked.sum(1) >= 1).all() and torch.equal(
        whole[masked], torch.full_like(whole[masked], IV)
    )
    assert torch.equal(whole[~masked], image[~masked])
    for rank in (0, 1):  # each of 2 ranks draws its rows of the global batch's draw
        rows = slice(4 * rank, 4 * rank + 4)
        half, m2 = mask_codes(image[rows], IV, torch.Generator().manual_seed(5), rank, 2)
        assert torch.equal(half, whole[rows]) and torch.equal(m2, masked[rows]), rank
    logits = torch.randn(8, H * W, IV)
    loss, parts = masked_loss(logits, image, masked)
    ce = torch.nn.functional.cross_entropy(logits[masked], image[masked])
    assert torch.allclose(loss, ce) and 0 < parts["masked_share"] <= 1


def test_the_corrector_splits_the_drawn_codes_into_even_groups_and_redraws_them():
    """corrector_groups: every drawn position in exactly one of k groups whose sizes differ by
    at most one, kept positions in none; the corrector passes change the draw (a random model
    redraws some code) and leave the unmasking passes' stream alone (corrector_steps=0 is the
    sampler without them)."""
    drawn = torch.tensor([[True] * 7 + [False] * 3, [False, True] * 5])
    u = torch.rand(2, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    group = corrector_groups(drawn, u, 3)
    assert bool((group[~drawn] == 3).all()) and bool((group[drawn] < 3).all())
    for b in range(2):
        sizes = torch.bincount(group[b][drawn[b]], minlength=3)
        assert int(sizes.sum()) == int(drawn[b].sum()) and int(sizes.max() - sizes.min()) <= 1
    model = masked_model()
    ids, lens = prompts(3)
    kw = dict(text_lens=lens, seeds=[4, 5, 6], steps=3, guidance_scale=1.5, empty_ids=EMPTY)
    plain = generate_masked(model, ids, **kw)
    seen = {}
    keep = lambda t, n, c: seen.update({t: c.clone()})
    corrected = generate_masked(model, ids, corrector_steps=4, callback=keep, **kw)
    assert torch.equal(seen[3], plain)  # the unmasking passes draw what they drew without it
    assert not torch.equal(corrected, plain)
    with pytest.raises(ConfigError, match="corrector_steps"):
        generate_masked(model, ids, corrector_steps=-1, **kw)
