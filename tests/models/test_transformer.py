"""The transformer: layouts per layer, causality, layout sparsity, cached decode, conditioning,
loss, accounting and persistence. Tiny shapes, seeded, fp32 on the CPU reference path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _pipeline_fixtures import V1_PIPELINE, tiny_transformer_config
from safetensors.torch import load_file

from dalle_ar.config import ConfigError, config_from_dict, load_config
from dalle_ar.models.transformer import Logits, Transformer, TransformerConfig
from dalle_ar.models.vq import VQTokenizer, drawn_masks
from dalle_ar.train.objectives import drop_conditioning, lm_loss

ROOT = Path(__file__).resolve().parents[2]
V1 = V1_PIPELINE  # a mask-input transformer saved without its masks
T, H, W = 5, 3, 4  # text positions, image grid


def tiny(**kw) -> TransformerConfig:
    shape = dict(text_vocab=40, text_len=T, image_vocab=24, grid_h=H, grid_w=W, depth=3)
    cfg = tiny_transformer_config(**{**shape, **kw})
    cfg.validate()
    return cfg


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


def batch(B: int = 2, seed: int = 1, text_lens=(T, 3)):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 40, (B, T), generator=g)
    image = torch.randint(0, 24, (B, H * W), generator=g)
    return text, image, torch.tensor(text_lens[:B])


def per_position(out: Logits, n_text: int = T) -> list[torch.Tensor]:
    """Logits by token position (text logits start at 0, image logits at n_text - 1)."""
    rows = [out.text[:, i] for i in range(out.text.shape[1])]
    return rows + [out.image[:, i] for i in range(out.image.shape[1])]


# -- config ------------------------------------------------------------------------------------


def test_default_schedule_follows_the_paper():
    kinds = tiny(depth=8).layout_kinds()
    assert kinds == ["row", "col", "row", "row", "row", "col", "row", "conv"]


def test_layouts_full_is_one_override_and_a_bad_list_is_refused(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"depth": 3}))
    cfg = load_config(TransformerConfig, p, ["layouts=full"])
    assert cfg.layout_kinds() == ["full"] * 3
    cfg = load_config(TransformerConfig, p, ["layouts=[row, col, conv]"])
    assert cfg.layout_kinds() == ["row", "col", "conv"]
    with pytest.raises(ConfigError, match="layouts"):
        load_config(TransformerConfig, p, ["layouts=[row, col]"])
    with pytest.raises(ConfigError, match="layouts"):
        load_config(TransformerConfig, p, ["layouts=diagonal"])


# -- attention structure -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "row", "col", "conv", "dalle"])
def test_changing_token_j_never_changes_earlier_logits(kind):
    model = build(layouts=kind)
    text, image, lens = batch()
    tokens = torch.cat([text, image[:, :-1]], 1)
    with torch.no_grad():
        base = per_position(model(tokens, text_lens=lens))
        for j in range(1, tokens.shape[1]):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 7) % 24
            out = per_position(model(changed, text_lens=lens))
            for i in range(j):
                torch.testing.assert_close(out[i], base[i], rtol=0, atol=1e-6)
            # the position fed by token j itself does change (the test can fail)
            assert (out[j] - base[j]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("kind", "changed_rc", "query_rc", "unchanged"),
    [
        ("row", (0, 1), (1, 2), True),  # an earlier row: outside the row layout
        ("full", (0, 1), (1, 2), False),
        ("col", (0, 1), (2, 2), True),  # another column
        ("col", (0, 2), (2, 2), False),  # same column, earlier row
        ("conv", (0, 0), (2, 3), True),  # outside the 3x3 neighbourhood
    ],
)
def test_layout_decides_which_image_tokens_matter(kind, changed_rc, query_rc, unchanged):
    # one layer: stacked conv layers widen the neighbourhood (row and col stacks never do)
    model = build(layouts=kind, depth=1)
    text, image, lens = batch()
    j = changed_rc[0] * W + changed_rc[1]
    q = query_rc[0] * W + query_rc[1]
    with torch.no_grad():
        base = model(torch.cat([text, image], 1), text_lens=lens)
        image2 = image.clone()
        image2[:, j] = (image2[:, j] + 5) % 24
        out = model(torch.cat([text, image2], 1), text_lens=lens)
    # image logits index k is token position T-1+k, i.e. the output *at* image position k-1;
    # the hidden state of image position q is image logits index q + 1.
    diff = (out.image[:, q + 1] - base.image[:, q + 1]).abs().max().item()
    assert (diff < 1e-6) if unchanged else (diff > 1e-4)


def test_padded_text_is_invisible():
    model = build()
    text, image, lens = batch(text_lens=(3, 3))
    text2 = text.clone()
    text2[:, 3:] = (text2[:, 3:] + 1) % 40  # only padding positions differ
    with torch.no_grad():
        a = model(torch.cat([text, image], 1), text_lens=lens)
        b = model(torch.cat([text2, image], 1), text_lens=lens)
    # image logits 0 sit on the last (padding) text position, whose own input did change; every
    # image position attends to the text keys only up to text_lens
    torch.testing.assert_close(a.image[:, 1:], b.image[:, 1:], rtol=0, atol=1e-6)
    assert (a.image[:, 0] - b.image[:, 0]).abs().max() > 1e-4


# -- cached decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dalle", "full", "col"])
@pytest.mark.parametrize("prime", [0, W])
def test_cached_decode_equals_full_forward(kind, prime):
    model = build(layouts=kind)
    text, image, lens = batch()
    with torch.no_grad():
        full = model(torch.cat([text, image[:, :-1]], 1), text_lens=lens).image  # (B, hw, V)
        model.setup_cache(2)
        first = torch.cat([text, image[:, :prime]], 1)
        out = model(first, torch.arange(first.shape[1]), text_lens=lens)
        steps = [out.image[:, i] for i in range(out.image.shape[1])]
        for i in range(prime, H * W - 1):
            pos = torch.tensor([T + i])
            step = model(image[:, i : i + 1], pos, text_lens=lens)
            assert step.image.shape == (2, 1, 24)
            steps.append(step.image[:, 0])
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_cache_is_not_saved_and_needs_setup():
    model = build()
    text, _, lens = batch()
    with pytest.raises(ValueError, match="setup_cache"):
        model(text, torch.arange(T), text_lens=lens)
    model.setup_cache(2)
    assert not any("cache" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="batch 2"):
        model(text[:1], torch.arange(T), text_lens=lens[:1])


# -- conditioning embedding ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prepend", "replace", "add"])
def test_cond_embedding_conditions_and_decodes(mode):
    model = build(cond_dim=6, cond_tokens=0 if mode == "add" else 2, cond_mode=mode)
    if mode == "add":  # it starts at zero (the next test): give it weights to read the input
        torch.nn.init.normal_(model.cond_proj.weight, std=0.1)
    text, image, lens = batch()
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 6, generator=g)
    prefix = text[:, :0] if mode == "replace" else text
    lens = None if mode == "replace" else lens
    n_text = prefix.shape[1]
    with torch.no_grad():
        full = model(torch.cat([prefix, image[:, :-1]], 1), text_lens=lens, cond=cond)
        assert full.image.shape == (2, H * W, 24)
        assert full.text.shape[1] == (0 if mode == "replace" else T - 1)
        other = model(torch.cat([prefix, image[:, :-1]], 1), text_lens=lens, cond=cond + 1)
        assert (other.image - full.image).abs().max() > 1e-4
        model.setup_cache(2)
        out = model(prefix, torch.arange(n_text), text_lens=lens, cond=cond)
        steps = [out.image[:, 0]]
        for i in range(H * W - 1):
            step = model(image[:, i : i + 1], torch.tensor([n_text + i]), text_lens=lens)
            steps.append(step.image[:, 0])
    torch.testing.assert_close(torch.stack(steps, 1), full.image, rtol=1e-5, atol=1e-5)


def test_added_embedding_starts_as_the_text_only_model():
    """cond_mode=add: the projection starts at zero, so a model given a text-only model's
    weights draws exactly as it does, whatever the embedding; training then moves it."""
    text_only = build()
    model = build(seed=1, cond_dim=6, cond_mode="add")
    assert model.cfg.cond_len == 0 and model.cfg.prefix_len == T
    missing, unexpected = model.load_state_dict(text_only.state_dict(), strict=False)
    assert sorted(missing) == ["cond_null", "cond_proj.bias", "cond_proj.weight"]
    assert not unexpected
    text, image, lens = batch()
    tokens = torch.cat([text, image[:, :-1]], 1)
    cond = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = text_only(tokens, text_lens=lens)
        got = model(tokens, text_lens=lens, cond=cond)
    torch.testing.assert_close(got.image, want.image, rtol=0, atol=0)
    torch.testing.assert_close(got.text, want.text, rtol=0, atol=0)
    loss = model(tokens, text_lens=lens, cond=cond).image.logsumexp(-1).mean()
    loss.backward()
    assert model.cond_proj.weight.grad.abs().max() > 0  # the embedding is learned from step 1
    with pytest.raises(ConfigError, match=r"cond_mode=add .* \(cond_tokens=0\)"):
        tiny(cond_dim=6, cond_tokens=2, cond_mode="add")
    with pytest.raises(ConfigError, match="'cond_mode': add .* cond_dim > 0"):
        tiny(cond_mode="add")
    assert tiny(cond_dim=6, cond_mode="add").num_params() == model.num_params()


def test_cond_is_required_and_checked():
    model = build(cond_dim=6, cond_tokens=2)
    text, image, lens = batch()
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 6\)"):
        model(torch.cat([text, image], 1), text_lens=lens)
    with pytest.raises(ConfigError, match="cond_tokens"):
        tiny(cond_dim=6, cond_tokens=0)


# -- loss and conditioning dropout -----------------------------------------------------------------


def test_loss_weights_and_padding_exclusion():
    model = build()
    text, image, lens = batch(text_lens=(5, 3))
    out = model(torch.cat([text, image[:, :-1]], 1), text_lens=lens)
    loss, parts = lm_loss(out, text, image, lens, text_weight=0.25, image_weight=0.75)
    ce = torch.nn.functional.cross_entropy
    img = ce(out.image.flatten(0, 1), image.flatten())
    # sample 0: targets text[0, 1:5]; sample 1 (length 3): targets text[1, 1:3] only
    logits = torch.cat([out.text[0, :4], out.text[1, :2]])
    targets = torch.cat([text[0, 1:5], text[1, 1:3]])
    txt = ce(logits, targets)
    torch.testing.assert_close(loss, 0.25 * txt + 0.75 * img)
    torch.testing.assert_close(parts["text_loss"], txt.detach())
    # the logits at a padded target never reach the loss
    out.text.detach_()
    out.text[1, 3] += 100.0
    loss2, _ = lm_loss(out, text, image, lens, text_weight=0.25, image_weight=0.75)
    torch.testing.assert_close(loss2, loss.detach())


def test_drop_conditioning_replaces_text_with_the_empty_caption():
    text, _, lens = batch(B=2)
    empty = torch.tensor([1, 2, 0, 0, 0])
    t, n = drop_conditioning(text, lens, empty, 2, torch.tensor([True, False]))
    assert torch.equal(t[0], empty) and n[0] == 2
    assert torch.equal(t[1], text[1]) and n[1] == lens[1]
    with pytest.raises(ValueError, match="empty_ids must have shape"):
        drop_conditioning(text, lens, empty[:3], 2, torch.tensor([True, False]))


def test_null_rows_take_the_learned_null_embedding():
    model = build(cond_dim=6, cond_tokens=2)
    with torch.no_grad():
        model.cond_null.normal_()
    text, image, lens = batch(B=2)
    tokens = torch.cat([text, image[:, :-1]], 1)
    cond = torch.randn(2, 6)
    rows = torch.tensor([True, False])
    with torch.no_grad():
        got = model(tokens, text_lens=lens, cond=cond, null_rows=rows).image
        null = model(tokens, text_lens=lens, cond=model.null_cond(2)).image
        plain = model(tokens, text_lens=lens, cond=cond).image
    torch.testing.assert_close(got[0], null[0])
    torch.testing.assert_close(got[1], plain[1])
    assert not torch.allclose(null[0], plain[0])
    with pytest.raises(ValueError, match="no conditioning embedding"):
        build().null_cond(1)


# -- training aids, accounting, persistence --------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    text, image, lens = batch()
    grads = []
    for ckpt in (False, True):
        model = build().train()
        model.grad_checkpointing = ckpt
        loss, _ = lm_loss(
            model(torch.cat([text, image[:, :-1]], 1), text_lens=lens), text, image, lens
        )
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_paper_shape_builds_on_meta_with_12b_parameters():
    tree = yaml.safe_load((ROOT / "configs" / "transformer_paper_12b.yaml").read_text())
    cfg = config_from_dict(TransformerConfig, tree["model"])
    assert (cfg.depth, cfg.dim, cfg.heads, cfg.head_dim) == (64, 3968, 62, 64)
    assert (cfg.text_len, cfg.text_vocab, cfg.grid_h, cfg.image_vocab) == (256, 16384, 32, 8192)
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_params()
    assert 11.5e9 < n < 12.5e9, n
    # forward FLOPs per token are at least 2 per non-embedding weight; training is 3x that
    assert model.flops_per_token(backward=False) > 2 * model.num_params(non_embedding=True)
    assert model.flops_per_token() == pytest.approx(3 * model.flops_per_token(backward=False))


def test_sparse_layouts_count_fewer_attention_flops():
    dense, sparse = build(layouts="full"), build(layouts="row")
    assert sparse.flops_per_token() < dense.flops_per_token()
    assert dense.num_params() == sparse.num_params()


def test_save_load_round_trip_and_wrong_shape_refused(tmp_path):
    model = build()
    model.save_pretrained(tmp_path / "t")
    loaded = Transformer.from_pretrained(tmp_path / "t")
    text, image, lens = batch()
    tokens = torch.cat([text, image], 1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(tokens, text_lens=lens).image, model(tokens, text_lens=lens).image
        )
    build(dim=48).save_pretrained(tmp_path / "wide")
    state = Path(tmp_path / "wide" / "model.safetensors").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(state)
    with pytest.raises(ValueError, match="shape mismatch"):
        Transformer.from_pretrained(tmp_path / "t")


def test_code_features_shape_the_code_embeddings_and_are_saved(tmp_path):
    model = build(code_features=6)
    with pytest.raises(ValueError, match=r"shape \(24, 6\)"):
        model.set_code_features(torch.zeros(24, 5))
    feats = torch.randn(24, 6, generator=torch.Generator().manual_seed(3))
    text, image, lens = batch()
    tokens = torch.cat([text, image], 1)
    with torch.no_grad():
        before = model(tokens, text_lens=lens).image
        model.set_code_features(feats)
        after = model(tokens, text_lens=lens).image
    assert (before - after).abs().max() > 1e-4  # the features reach the logits
    model.save_pretrained(tmp_path / "t")
    loaded = Transformer.from_pretrained(tmp_path / "t")
    torch.testing.assert_close(loaded.code_feats, feats)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, text_lens=lens).image, after)
        # the cached path embeds and scores codes the same way
        model.setup_cache(2)
        out = model(tokens[:, : T + 2], torch.arange(T + 2), text_lens=lens)
        step = model(image[:, 2:3], torch.tensor([T + 2]), text_lens=lens)
    torch.testing.assert_close(out.image, after[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.image[:, 0], after[:, 3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="resolved from a VQ"):
        Transformer(tiny(code_features=-1))


def test_mask_input_sees_where_codes_draw_not_which_codes(tmp_path):
    """code_input=mask: an earlier code enters only as the mask of the pixels it draws, so two
    codes of one mask in different colours give the same logits after them, a code with another
    mask does not; the cached path agrees, and the mode is saved."""
    model = build(code_features=12, code_input="mask")  # 2x2 patches: 3 channels x 4 pixels
    assert not hasattr(model, "image_emb")
    white = torch.ones(24, 3, 4)
    feats = white.clone()
    feats[1, :, :2] = torch.tensor([0.9, -0.8, -0.8])[:, None]  # red on the top two pixels
    feats[2, :, :2] = torch.tensor([-0.8, -0.8, 0.9])[:, None]  # blue, same pixels
    feats[3, :, 2:] = torch.tensor([-0.8, -0.8, 0.9])[:, None]  # blue, the bottom two
    model.set_code_features(feats.flatten(1), drawn_masks(feats.flatten(1)))
    text, image, lens = batch()
    with torch.no_grad():
        logits = {}
        for code in (1, 2, 3):
            image[:, 4] = code
            logits[code] = model(torch.cat([text, image], 1), text_lens=lens).image
        assert torch.equal(logits[1], logits[2])
        assert (logits[1][:, 5:] - logits[3][:, 5:]).abs().max() > 1e-4
        model.setup_cache(2)
        model(torch.cat([text, image[:, :4]], 1), torch.arange(T + 4), text_lens=lens)
        step = model(image[:, 4:5], torch.tensor([T + 4]), text_lens=lens)
    torch.testing.assert_close(step.image[:, 0], logits[3][:, 5], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "t")
    assert Transformer.from_pretrained(tmp_path / "t").cfg.code_input == "mask"
    with pytest.raises(ValueError, match=r"needs masks of shape \(24, 4\), got None"):
        model.set_code_features(feats.flatten(1))
    with pytest.raises(ValueError, match=r"needs masks of shape \(24, 4\), got \(24, 12\)"):
        model.set_code_features(feats.flatten(1), feats.flatten(1))
    with pytest.raises(ConfigError, match="code_input"):
        tiny(code_input="mask")  # without code features
    with pytest.raises(ConfigError, match="code_input"):
        tiny(code_input="pixels")


def _old_drawn_rule(feats: torch.Tensor) -> torch.Tensor:
    """The drawn rule as the transformer once computed it from its code features."""
    rgb = feats.view(*feats.shape[:-1], 3, -1)
    return (rgb.amin(-2) < 0.7).to(feats.dtype)


def test_a_mask_folder_saved_without_masks_derives_them_by_the_old_rule():
    assert "code_mask" not in load_file(str(V1 / "transformer" / "model.safetensors"))
    model = Transformer.from_pretrained(V1 / "transformer")
    assert model.code_mask.shape == (32, 16) and model.code_mask.dtype == torch.float32
    assert torch.equal(model.code_mask, _old_drawn_rule(model.code_feats))
    # the same masks the folder's VQ gives for its codes
    assert torch.equal(model.code_mask, VQTokenizer.from_pretrained(V1 / "vq").code_masks())


def test_the_masks_are_saved_and_loaded_as_given(tmp_path):
    model = build(code_features=12, code_input="mask")
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(24, 12, generator=g) * 2 - 1
    masks = (torch.rand(24, 4, generator=g) < 0.5).float()  # not what the default rule gives
    assert not torch.equal(masks, drawn_masks(feats))
    model.set_code_features(feats, masks)
    model.save_pretrained(tmp_path / "t")
    assert torch.equal(load_file(str(tmp_path / "t" / "model.safetensors"))["code_mask"], masks)
    loaded = Transformer.from_pretrained(tmp_path / "t")
    assert torch.equal(loaded.code_mask, masks) and torch.equal(loaded.code_feats, feats)
    text, image, lens = batch()
    tokens = torch.cat([text, image], 1)
    with torch.no_grad():
        assert torch.equal(
            loaded(tokens, text_lens=lens).image, model(tokens, text_lens=lens).image
        )


def test_bad_inputs_are_refused_with_a_message():
    model = build()
    text, image, lens = batch()
    with pytest.raises(ValueError, match=r"image codes must be in \[0, 24\)"):
        model(torch.cat([text, image + 30], 1), text_lens=lens)
    with pytest.raises(ValueError, match="long tensor"):
        model(text.float())
    with pytest.raises(ValueError, match="text_lens must have shape"):
        model(text, text_lens=lens[:1])
