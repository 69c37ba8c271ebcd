"""CLIP's contrastive loss over the global batch: one process with the global batch and two gloo
processes with half each give the same loss and the same gradient on every row."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _pipeline_fixtures import build_components
from _spawn import run_ranks

from dalle_ar.config import ConfigError, load_config
from dalle_ar.data import shapes
from dalle_ar.models.clip import CLIP
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.text import TokenizerConfig, train_tokenizer
from dalle_ar.train import clip as clip_recipe
from dalle_ar.train.clip import CLIPRecipeConfig, contrastive_loss, retrieval
from dalle_ar.train.common import ShardImages

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny" / "clip.yaml"

B, D = 8, 16


def _embeds():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    return img, txt


def _loss_and_grads(img, txt):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = contrastive_loss(img, txt, scale)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}


def _rank(rank, out_dir):
    from dalle_ar.train import dist

    dist.init_distributed("cpu")
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    torch.save(_loss_and_grads(*(t[half] for t in _embeds())), f"{out_dir}/{rank}.pt")


def test_two_ranks_give_the_loss_and_gradients_of_the_global_batch(tmp_path):
    one = _loss_and_grads(*_embeds())
    run_ranks(_rank, 2, str(tmp_path))
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    # DDP averages the ranks' gradients: the mean over ranks is the one-process figure
    mean = {k: (got[0][k] + got[1][k]) / 2 for k in ("loss", "scale")}
    assert torch.allclose(mean["loss"], one["loss"], atol=1e-6)
    assert torch.allclose(mean["scale"], one["scale"], atol=1e-6)
    assert not torch.allclose(got[0]["loss"], got[1]["loss"])  # each rank's share differs
    for rank in range(2):  # a row's gradient, summed over every rank's loss, lands on its rank
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        assert torch.allclose(got[rank]["img"] / 2, one["img"][half], atol=1e-6)
        assert torch.allclose(got[rank]["txt"] / 2, one["txt"][half], atol=1e-6)


def test_the_temperature_is_clamped_at_100():
    img, txt = _embeds()
    at_cap = contrastive_loss(img, txt, torch.tensor(math.log(100.0)))
    assert torch.equal(contrastive_loss(img, txt, torch.tensor(9.0)), at_cap)
    assert not torch.equal(contrastive_loss(img, txt, torch.tensor(2.0)), at_cap)


def test_retrieval_counts_the_right_pairs():
    img = torch.eye(7)
    # texts 4 and 5 point at each other's image, their own second (no ties above it)
    txt = torch.eye(7)[[0, 1, 2, 3, 5, 4, 6]] + 0.1 * torch.eye(7)
    got = {k: float(v) for k, v in retrieval(img, txt).items()}
    assert (got["t2i_top1"], got["i2t_top1"]) == (5.0, 5.0)
    assert (got["t2i_top5"], got["i2t_top5"]) == (7.0, 7.0)


def _run(shards, tok, out, *extra):
    return [f"data.train={shards.train}", f"data.eval={shards.eval}", f"text_tokenizer={tok}",
            f"run.out_dir={out}", *extra]  # fmt: skip


def test_recipe_trains_resumes_exactly_and_writes_a_clip_folder(tmp_path, shapes_shards,
                                                                shapes_captions):  # fmt: skip
    tok = tmp_path / "tok"
    train_tokenizer(shapes_captions, TokenizerConfig(vocab_size=300, text_len=48)).save_pretrained(
        tok
    )
    whole = tmp_path / "whole"
    # both drawn per sample key: exact resume; foil scenes are drawn at >= 21 pixels
    extra = ("hard_negatives=2", "foil_scenes=true", "count_foils=true", "data.image_size=24",
             "model.image_size=24")  # fmt: skip
    m = clip_recipe.train(
        load_config(CLIPRecipeConfig, TINY_CONFIG, _run(shapes_shards, tok, whole, *extra))
    )
    assert m["finished"] and m["step"] == 6
    for split in ("seen", "held_out"):  # attribute binding on the shapes evaluation images
        assert 0 <= m[f"binding_{split}"] <= m[f"binding_color_{split}"] <= 1
        # ... and the other way, the caption choosing its picture among rendered foils
        assert 0 <= m[f"picture_binding_{split}"] <= m[f"picture_binding_shape_{split}"] <= 1
        assert 0 <= m[f"picture_binding_count_{split}"] <= 1  # reported on its own
    for k in ("retrieval_t2i_top1", "retrieval_i2t_top5"):
        assert 0 <= m[k] <= 1
    assert m["retrieval_t2i_top5"] >= m["retrieval_t2i_top1"]
    clip = CLIP.from_pretrained(m["component"])  # an ordinary Hugging Face CLIP folder
    assert clip.eos_id == clip.model.config.text_config.eos_token_id

    halted = tmp_path / "halted"
    argv = ["--config", str(TINY_CONFIG), *_run(shapes_shards, tok, halted, *extra)]
    assert clip_recipe.main([*argv, "halt_after=3"]) == 0
    assert clip_recipe.main(["--resume", *argv]) == 0
    again = CLIP.from_pretrained(halted / "clip")
    for (name, a), b in zip(clip.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name  # the resumed run ends where the whole one did


def _extras(seed: int):
    """Unit embeddings (B, D) of extra captions or pictures, every other one valid, and CLIP's
    starting logit scale."""
    extra = F.normalize(torch.randn(B, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return extra, torch.tensor([True, False] * (B // 2)), torch.tensor(math.log(1 / 0.07))


def test_hard_negatives_are_captions_no_image_matches():
    img, txt = _embeds()
    hard, valid, scale = _extras(1)
    s = scale.exp()
    i2t = torch.cat([s * img @ txt.T, (s * img @ hard[valid].T)], 1)  # image -> every caption
    want = (
        F.cross_entropy(i2t, torch.arange(B)) + F.cross_entropy(s * txt @ img.T, torch.arange(B))
    ) / 2
    got = contrastive_loss(img, txt, scale, hard, valid)
    assert torch.allclose(got, want, atol=1e-6)
    assert got > contrastive_loss(img, txt, scale)  # more captions to tell apart


def test_count_foils_are_pictures_no_caption_matches():
    img, txt = _embeds()
    foil, valid, scale = _extras(2)
    s = scale.exp()
    t2i = torch.cat([s * txt @ img.T, s * txt @ foil[valid].T], 1)  # caption -> every picture
    want = (
        F.cross_entropy(s * img @ txt.T, torch.arange(B)) + F.cross_entropy(t2i, torch.arange(B))
    ) / 2
    got = contrastive_loss(img, txt, scale, foil_embeds=foil, foil_valid=valid)
    assert torch.allclose(got, want, atol=1e-6)
    assert got > contrastive_loss(img, txt, scale)  # more pictures to tell apart
    hard = _extras(1)[0]
    both = contrastive_loss(img, txt, scale, hard, valid, foil, valid)  # each on its own side
    i2t = torch.cat([s * img @ txt.T, s * img @ hard[valid].T], 1)
    want = (F.cross_entropy(i2t, torch.arange(B)) + F.cross_entropy(t2i, torch.arange(B))) / 2
    assert torch.allclose(both, want, atol=1e-6)


def test_count_foil_pictures_come_from_each_samples_spec_and_key():
    from dalle_ar.data.shapes import RELATIONS, count_foils, generate, render

    metas = [m for _, _, m in generate(4, seed=0, split="train")]
    new = {"color": "blue", "shape": "square", "size": "small", "held_out": False}
    assert not any(o["color"] == "blue" for m in metas for o in m["objects"])  # nothing alike
    one = {"objects": [dict(new, row=0, col=0)], "relation": None, "held_out": False}
    twice = random.Random("count-f").choice(count_foils(one))
    # a two-object caption of two like objects describes the one-object scene drawn twice
    a, b = twice["objects"]
    rel = next(r for r in RELATIONS if shapes._holds(r, a, b))
    twin = {"objects": [a, b], "relation": rel, "held_out": False}
    batch = {"image": torch.zeros(7, 3, 32, 32), "caption": ["x"] * 7,
             "meta": [*metas, {}, one, twin], "key": list("abcdefg")}  # fmt: skip
    pictures, valid = clip_recipe.count_foil_pictures(batch, 32)
    assert pictures.shape == (7, 3, 32, 32)
    assert valid == [True] * 4 + [False, False, True]  # no spec; a caption of the batch's
    assert torch.equal(pictures[4], torch.ones(3, 32, 32))  # no spec: a white, unused row
    for i, key in enumerate(batch["key"]):  # each the foil its key draws, rendered
        if batch["meta"][i]:
            foil = random.Random(f"count-{key}").choice(count_foils(batch["meta"][i]))
            want = torch.from_numpy(render(foil, 32)).permute(2, 0, 1).float() / 255
            assert torch.equal(pictures[i], want)
    again, _ = clip_recipe.count_foil_pictures(batch, 32)
    assert torch.equal(again, pictures)  # a resumed run sees the same
    # without the twin's caption in the batch, the one-object scene's foil is a negative
    assert clip_recipe.count_foil_pictures({**batch, "meta": batch["meta"][:6]}, 32)[1][5]


def test_hard_negatives_come_from_each_samples_spec_and_key():
    from dalle_ar.data.shapes import generate, hard_negative

    _, cap, spec = next(generate(1, seed=0, split="train"))
    batch = {"meta": [spec, {}], "key": ["a", "b"], "caption": [cap, "x"]}
    got = clip_recipe.hard_negatives(batch, 3)
    assert len(got) == 6 and got[1::2] == [None] * 3  # draw-major; no spec, no negative
    rng = random.Random("hard-a")  # the sample's key seeds its draws
    assert got[0::2] == [hard_negative(spec, rng) for _ in range(3)]
    assert clip_recipe.hard_negatives(batch, 3) == got  # a resumed run draws the same ones


def test_foil_scenes_join_each_sample_rendered_and_captioned():
    from dalle_ar.data.shapes import generate, render

    scenes = list(generate(3, seed=0, split="train"))
    image = torch.stack([torch.from_numpy(x).permute(2, 0, 1).float() / 255 for x, _, _ in scenes])
    batch = {"image": image, "caption": [c for _, c, _ in scenes],
             "meta": [m for _, _, m in scenes], "key": ["a", "b", "c"]}  # fmt: skip
    got = clip_recipe.with_foil_scenes(batch, 32)
    assert got["image"].shape == (6, 3, 32, 32) and len(got["caption"]) == 6
    assert got["key"] == ["a", "b", "c", "a-foil", "b-foil", "c-foil"]
    assert torch.equal(got["image"][:3], image) and got["caption"][:3] == batch["caption"]
    for i in range(3):  # row 3 + i: the foil of row i, drawn as its spec says
        foil = got["meta"][3 + i]
        want = torch.from_numpy(render(foil, 32)).permute(2, 0, 1).float() / 255
        assert torch.equal(got["image"][3 + i], want) and foil != batch["meta"][i]
    again = clip_recipe.with_foil_scenes(batch, 32)  # each sample's key seeds its foil
    assert again["meta"] == got["meta"] and again["caption"] == got["caption"]
    with pytest.raises(ValueError, match="sample 'x' has none"):
        clip_recipe.with_foil_scenes(dict(batch, meta=[*batch["meta"][:2], {}],
                                          key=["a", "b", "x"]), 32)  # fmt: skip


def test_no_hard_negative_is_true_of_a_picture_in_the_batch():
    from dalle_ar.data.shapes import describes, generate

    scenes = list(generate(64, seed=1, split="train"))
    image = torch.zeros(64, 3, 32, 32)
    batch = {"image": image, "caption": [c for _, c, _ in scenes],
             "meta": [m for _, _, m in scenes], "key": [f"k{i}" for i in range(64)]}  # fmt: skip
    plain = clip_recipe.hard_negatives(batch, 3)
    joined = clip_recipe.with_foil_scenes(batch, 32)
    hard = clip_recipe.hard_negatives(joined, 3)
    # a scene's hard negative is often its foil's own caption: those are dropped, the rest kept
    assert 0 < hard.count(None) < len(hard) // 2 and plain.count(None) < hard.count(None) / 4
    assert hard[:64] == [h if h is None or h in plain[:64] else "?" for h in hard[:64]]
    rngs = {k: random.Random(f"hard-{k}") for k in joined["key"]}
    for d in range(3):  # each kept draw is the scene's own; no dropped one was true of no picture
        for i, (meta, key) in enumerate(zip(joined["meta"], joined["key"])):
            foil = shapes.random_foil(meta, rngs[key])
            text = shapes.caption(foil, rngs[key])
            true_of_some = any(describes(foil, m) for m in joined["meta"])
            assert hard[d * 128 + i] == (None if true_of_some else text)


def test_round_trip_rows_are_each_samples_own_draw():
    keys = [f"s{i:05d}" for i in range(2000)]
    assert clip_recipe.round_trip_rows(keys, 0.0) == []
    assert clip_recipe.round_trip_rows(keys, 1.0) == list(range(2000))
    half = clip_recipe.round_trip_rows(keys, 0.5)
    assert 900 < len(half) < 1100
    assert clip_recipe.round_trip_rows(keys, 0.5) == half  # a resumed run sees the same
    chosen = {keys[i] for i in half}  # a sample's draw does not depend on its batch
    alone = [k for k in keys[::7] if clip_recipe.round_trip_rows([k], 0.5)]
    assert alone == [k for k in keys[::7] if k in chosen]


@pytest.mark.parametrize(
    "extra, match",
    [(["vq_round_trip=0.5"], "config key 'vq': must name a VQ folder"),
     (["vq=somewhere", "vq_round_trip=1.5"], "config key 'vq_round_trip': must be in"),
     (["foil_scenes=true", "data.image_size=8"], "config key 'foil_scenes': renders"),
     (["count_foils=true", "data.image_size=8"], "config key 'count_foils': renders")],
)  # fmt: skip
def test_round_trip_settings_are_checked(tmp_path, extra, match):
    names = SimpleNamespace(train="train-*.tar", eval="eval-*.tar")  # validation reads no data
    with pytest.raises(ConfigError, match=match):
        load_config(CLIPRecipeConfig, TINY_CONFIG, _run(names, "tok", tmp_path, *extra))


class _RoundTripped(ShardImages):
    """The recipe's own batches, every training scene already through the VQ round trip."""

    def __init__(self, cfg, vq):
        super().__init__(cfg)
        self.vq = vq

    def train(self, skip):
        for batch in super().train(skip):
            yield dict(batch, image=self.vq.round_trip(batch["image"]))


def test_round_tripped_scenes_are_what_clip_trains_on(tmp_path, shapes_shards, shapes_captions):
    tok = tmp_path / "tok"
    train_tokenizer(shapes_captions, TokenizerConfig(vocab_size=300, text_len=48)).save_pretrained(
        tok
    )
    vq = build_components(tmp_path / "parts")["vq"]
    trained = {}
    for name, extra in (("rendered", []), ("by_recipe", [f"vq={vq}", "vq_round_trip=1"]),
                        ("by_hand", [])):  # fmt: skip
        argv = _run(shapes_shards, tok, tmp_path / name, "run.steps=2", *extra)
        cfg = load_config(CLIPRecipeConfig, TINY_CONFIG, argv)
        source = _RoundTripped(cfg, VQTokenizer.from_pretrained(vq)) if name == "by_hand" else None
        m = clip_recipe.train(cfg, source)
        assert m["finished"]
        trained[name] = list(CLIP.from_pretrained(m["component"]).model.state_dict().values())
    # share 1: CLIP learns exactly what it would from the round-tripped scenes themselves ...
    assert all(torch.equal(a, b) for a, b in zip(trained["by_recipe"], trained["by_hand"]))
    # ... and not what it learns from the rendered ones
    assert any(not torch.equal(a, b) for a, b in zip(trained["by_recipe"], trained["rendered"]))


def test_picture_binding_overall_figure_leaves_the_count_kind_out():
    verdicts = [(False, {"shape": True, "count": False}), (True, {"shape": False, "count": True})]
    kinds, cpu = ("shape", "count"), torch.device("cpu")
    got = clip_recipe._tally(verdicts, kinds, "p", cpu, overall=("shape",))
    assert got == {"p_seen": 1.0, "p_shape_seen": 1.0, "p_count_seen": 0.0,
                   "p_held_out": 0.0, "p_shape_held_out": 0.0, "p_count_held_out": 1.0}  # fmt: skip
    assert clip_recipe._tally(verdicts, kinds, "p", cpu)["p_seen"] == 0.0  # every kind at once
