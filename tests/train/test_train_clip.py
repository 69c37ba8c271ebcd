"""CLIP's contrastive loss over the global batch: one process with the global batch and two gloo
processes with half each give the same loss and the same gradient on every row."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from _spawn import run_ranks

from dalle_ar.clip import CLIP
from dalle_ar.config import load_config
from dalle_ar.text import TokenizerConfig, train_tokenizer
from dalle_ar.train import clip as clip_recipe
from dalle_ar.train.clip import CLIPRecipeConfig, contrastive_loss, retrieval

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "clip_tiny.yaml"

B, D = 8, 16


def _embeds():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    return img, txt


def _one_process():
    img, txt = (t.clone().requires_grad_() for t in _embeds())
    loss = contrastive_loss(img, txt, torch.tensor(math.log(1 / 0.07)))
    loss.backward()
    return loss.detach(), img.grad, txt.grad


def _rank(rank, out_dir):
    from dalle_ar.train import dist

    dist.init_distributed("cpu")
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    img, txt = (t[half].clone().requires_grad_() for t in _embeds())
    loss = contrastive_loss(img, txt, torch.tensor(math.log(1 / 0.07)))
    loss.backward()
    torch.save({"loss": loss.detach(), "img": img.grad, "txt": txt.grad}, f"{out_dir}/{rank}.pt")


def test_two_ranks_give_the_loss_and_gradients_of_the_global_batch(tmp_path):
    loss, g_img, g_txt = _one_process()
    run_ranks(_rank, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        assert torch.allclose(got["loss"], loss, atol=1e-6)
        assert torch.allclose(got["img"], g_img[half], atol=1e-6)
        assert torch.allclose(got["txt"], g_txt[half], atol=1e-6)


def test_the_temperature_is_clamped_at_100():
    img, txt = _embeds()
    at_cap = contrastive_loss(img, txt, torch.tensor(math.log(100.0)))
    assert torch.equal(contrastive_loss(img, txt, torch.tensor(9.0)), at_cap)
    assert not torch.equal(contrastive_loss(img, txt, torch.tensor(2.0)), at_cap)


def test_retrieval_counts_the_right_pairs():
    img = torch.eye(6)
    txt = torch.eye(6)[[0, 1, 2, 3, 5, 4]]  # texts 4 and 5 point at each other's image
    got = retrieval(img, txt)
    assert (float(got["t2i_top1"]), float(got["i2t_top1"])) == (4.0, 4.0)
    assert float(got["t2i_top5"]) == 6.0  # every right image is among the 5 best


def _run(shards, tok, out, *extra):
    return [f"data.train={shards.train}", f"data.eval={shards.eval}", f"text_tokenizer={tok}",
            f"run.out_dir={out}", *extra]  # fmt: skip


def test_recipe_trains_resumes_exactly_and_writes_a_clip_folder(tmp_path, shapes_shards,
                                                                shapes_captions):  # fmt: skip
    tok = tmp_path / "tok"
    train_tokenizer(shapes_captions, TokenizerConfig(vocab_size=300, text_len=24)).save_pretrained(
        tok
    )
    whole = tmp_path / "whole"
    m = clip_recipe.train(
        load_config(CLIPRecipeConfig, TINY_CONFIG, _run(shapes_shards, tok, whole))
    )
    assert m["finished"] and m["step"] == 6
    for k in ("retrieval_t2i_top1", "retrieval_i2t_top5"):
        assert 0 <= m[k] <= 1
    assert m["retrieval_t2i_top5"] >= m["retrieval_t2i_top1"]
    clip = CLIP.from_pretrained(m["component"])  # an ordinary Hugging Face CLIP folder
    assert clip.eos_id == clip.model.config.text_config.eos_token_id

    halted = tmp_path / "halted"
    argv = ["--config", str(TINY_CONFIG), *_run(shapes_shards, tok, halted)]
    assert clip_recipe.main([*argv, "halt_after=3"]) == 0
    assert clip_recipe.main(["--resume", *argv]) == 0
    again = CLIP.from_pretrained(halted / "clip")
    for (name, a), b in zip(clip.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name  # the resumed run ends where the whole one did
