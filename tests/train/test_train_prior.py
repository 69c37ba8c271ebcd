"""The diffusion prior's recipe (dalle_ar.train.prior): its loss overfits a few pairs, the
embedding statistics, and the recipe on tiny token shards with CLIP embeddings (metrics, the
prior folder, resume, the CLIP checks)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_ar.config import load_config
from dalle_ar.data.shards import write_samples
from dalle_ar.identity import CLIPIdentity
from dalle_ar.models.clip import CLIP
from dalle_ar.models.prior import DiffusionPrior, PriorConfig, train_scheduler
from dalle_ar.sampling.diffusion import sample_prior
from dalle_ar.sampling.settings import PriorSampling
from dalle_ar.text import TokenizerConfig, train_tokenizer
from dalle_ar.train import prior as prior_recipe
from dalle_ar.train.clip import CLIPRecipeConfig
from dalle_ar.train.prior import PriorRecipeConfig, diffusion_loss, embedding_stats

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny" / "prior.yaml"
D = 16  # configs/tiny/clip.yaml's embed_dim


def _pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (image, text) unit embedding pairs, each text near its image."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, D, generator=g) + 0.5, dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, D, generator=g), dim=-1)
    return img, txt


def test_a_tiny_prior_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    img, txt = _pairs(4, seed=0)
    prior = DiffusionPrior(PriorConfig(embed_dim=D, width=64, heads=2, layers=2))
    prior.set_stats(*embedding_stats(img))
    ddpm = train_scheduler(prior.cfg)
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    losses = []
    for _ in range(400):
        loss = diffusion_loss(prior, prior, ddpm, img.repeat(8, 1), txt.repeat(8, 1), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / 5, (first, last)
    got = sample_prior(prior, txt, PriorSampling(prior_steps=25), [0, 1, 2, 3])
    cos = (got * img).sum(-1)
    assert bool((cos > 0.9).all()), cos
    assert bool((cos > (txt * img).sum(-1)).all())  # closer than the caption itself


def test_embedding_stats_are_the_mean_and_floored_std():
    e = torch.randn(40, D, generator=torch.Generator().manual_seed(2))
    e[:, 3] = 0.25  # a dimension the data never moves
    mean, std = embedding_stats(e)
    assert torch.allclose(mean, e.mean(0), atol=1e-6)
    keep = torch.arange(D) != 3
    assert torch.allclose(std[keep], e.std(0)[keep], atol=1e-5)
    assert float(std[3]) == pytest.approx(prior_recipe.STD_FLOOR)


# ----------------------------------------------------------------------------------------------
# The recipe on tiny token shards.


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, shapes_captions) -> Path:
    tok = train_tokenizer(shapes_captions, TokenizerConfig(vocab_size=300, text_len=48))
    sizes = load_config(CLIPRecipeConfig, ROOT / "configs" / "tiny" / "clip.yaml").model
    folder = tmp_path_factory.mktemp("clip") / "clip"
    CLIP.build(sizes, tok, seed=0).save_pretrained(folder)
    return folder


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_tokens(out: Path, prefix: str, n: int, seed: int, identity: dict | None,
                  clip: bool = True) -> str:  # fmt: skip
    img, txt = _pairs(n, seed)
    recs = []
    for i in range(n):
        rec = {"__key__": f"{prefix}{i:05d}", "codes.npy": _npy(np.zeros((2, 2), np.int16)),
               "txt": f"caption {i}", "json": {}}  # fmt: skip
        if clip:
            rec |= {"clip_img.npy": _npy(img[i].numpy()), "clip_txt.npy": _npy(txt[i].numpy())}
        recs.append(rec)
    write_samples(recs, out, prefix, 32)
    (out / f"{prefix}-tokens.json").write_text(json.dumps({"records": n, "clip": identity}))
    return str(out / f"{prefix}-*.tar")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, clip_dir) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("tokens")
    ident = CLIP.from_pretrained(clip_dir).identity() | {"folder": str(clip_dir)}
    return _write_tokens(out, "train", 64, 0, ident), _write_tokens(out, "eval", 16, 1, ident)


def _args(tokens, clip_dir, out, *extra) -> list[str]:
    return [f"data.train={tokens[0]}", f"data.eval={tokens[1]}", f"clip={clip_dir}",
            f"run.out_dir={out}", *extra]  # fmt: skip


def test_recipe_trains_evaluates_and_resumes_exactly(tmp_path, tokens, clip_dir):
    whole = tmp_path / "whole"
    m = prior_recipe.train(load_config(PriorRecipeConfig, TINY_CONFIG,
                                       _args(tokens, clip_dir, whole)))  # fmt: skip
    assert m["finished"] and m["step"] == 6
    saved = json.loads((whole / "metrics.json").read_text())
    for k in ("prior_cosine", "text_cosine", "random_cosine"):
        assert -1 <= saved[k] <= 1
    assert saved["prior_cosine_margin"] == pytest.approx(saved["prior_cosine"] -
                                                         saved["text_cosine"])  # fmt: skip
    _, txt = _pairs(16, 1)
    img, _ = _pairs(16, 1)
    assert saved["text_cosine"] == pytest.approx(float((txt * img).sum(-1).mean()), abs=1e-5)
    assert len(saved["history"]) == 2  # step 3 and the final one

    prior = DiffusionPrior.from_pretrained(whole / "prior")
    assert prior.cfg.clip == CLIPIdentity.from_identity(CLIP.from_pretrained(clip_dir).identity())
    train_img, _ = _pairs(64, 0)  # the stats of the 64 training records are in the folder
    assert torch.allclose(prior.net.clip_mean[0], train_img.mean(0), atol=1e-5)
    assert torch.allclose(prior.net.clip_std[0], train_img.std(0), atol=1e-5)

    halted = tmp_path / "halted"
    argv = ["--config", str(TINY_CONFIG), *_args(tokens, clip_dir, halted)]
    assert prior_recipe.main([*argv, "halt_after=3"]) == 0
    assert not (halted / "prior").exists()
    assert prior_recipe.main(["--resume", *argv]) == 0
    again = DiffusionPrior.from_pretrained(halted / "prior")
    for (name, a), b in zip(prior.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # the resumed run ends where the whole one did


def test_shards_of_another_clip_are_refused_by_name(tmp_path, clip_dir):
    other = {"config_sha256": "a" * 64, "weights_sha256": "b" * 64, "embed_dim": D}
    train = _write_tokens(tmp_path, "train", 8, 0, other)
    cfg = load_config(PriorRecipeConfig, TINY_CONFIG,
                      _args((train, ""), clip_dir, tmp_path / "run"))  # fmt: skip
    with pytest.raises(ValueError, match=r"train-tokens\.json names another CLIP \(config "
                                         r"aaaaaaaaaaaa, weights bbbbbbbbbbbb\)"):  # fmt: skip
        prior_recipe.train(cfg)


def test_shards_without_clip_embeddings_are_refused(tmp_path, clip_dir):
    train = _write_tokens(tmp_path, "train", 8, 0, None, clip=False)
    cfg = load_config(PriorRecipeConfig, TINY_CONFIG,
                      _args((train, ""), clip_dir, tmp_path / "run"))  # fmt: skip
    with pytest.raises(ValueError, match="carry no CLIP embeddings"):
        prior_recipe.train(cfg)


def test_each_rank_draws_its_rows_of_the_global_batch():
    """The mean of 2 ranks' losses on their halves is the one process's loss on the whole batch:
    the same timesteps, noise and caption drops per row."""
    torch.manual_seed(0)
    img, txt = _pairs(8, seed=3)
    prior = DiffusionPrior(PriorConfig(embed_dim=D, width=32, heads=2, layers=1)).eval()
    ddpm = train_scheduler(prior.cfg)
    with torch.no_grad():
        whole = diffusion_loss(prior, prior, ddpm, img, txt, 0.5, torch.Generator().manual_seed(7))
        halves = [
            diffusion_loss(prior, prior, ddpm, img[4 * r : 4 * r + 4], txt[4 * r : 4 * r + 4],
                           0.5, torch.Generator().manual_seed(7), r, 2)
            for r in (0, 1)
        ]  # fmt: skip
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-6)


def test_weight_decay_spares_the_priors_embeddings():
    from dalle_ar.config import OptimConfig
    from dalle_ar.train.common import build_optimizer

    prior = DiffusionPrior(PriorConfig(embed_dim=D, width=32, heads=2, layers=1))
    decay, no_decay = build_optimizer(prior, OptimConfig(weight_decay=0.1)).param_groups
    ids = {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in ("positional_embedding", "prd_embedding"):  # bare parameters, not modules
        assert id(getattr(prior.net, name)) in ids, name
    assert id(prior.net.proj_in.weight) not in ids  # a matrix is decayed
