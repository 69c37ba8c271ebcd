"""Tests for dalle_ar.checkpoint: component folders, strict loading, atomic writes, train state."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle_ar.checkpoint import (
    atomic_dir,
    load_pretrained,
    load_train_state,
    read_component_config,
    rng_state,
    save_checkpoint,
    save_pretrained,
    set_rng_state,
)
from dalle_ar.config import require


@dataclasses.dataclass
class ToyConfig:
    dim: int = 4  # hidden width
    vocab: int = 7  # embedding rows

    def validate(self) -> None:
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")


class Toy(torch.nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(cfg.vocab, cfg.dim)
        self.proj = torch.nn.Linear(cfg.dim, cfg.dim)
        self.head = torch.nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as in weight-tied language models
        self.register_buffer("scale", torch.full((cfg.dim,), 2.0))
        self.register_buffer("cache", torch.zeros(cfg.dim), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        self.cache = torch.zeros(self.proj.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.emb(x)) * self.scale + self.cache)


def _toy(seed: int = 0, **kw: int) -> Toy:
    torch.manual_seed(seed)
    return Toy(ToyConfig(**kw))


def test_save_load_round_trip_identical_tensors(tmp_path: Path) -> None:
    model = _toy(dim=4, vocab=7)
    save_pretrained(model, ToyConfig(dim=4, vocab=7), tmp_path / "toy", "toy")
    assert {p.name for p in (tmp_path / "toy").iterdir()} == {"config.json", "model.safetensors"}
    back = load_pretrained(Toy, ToyConfig, tmp_path / "toy", "toy")
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert not back.training and back.cache.device.type == "cpu"
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(x), back(x))


def test_load_keeps_tied_weights_tied(tmp_path: Path) -> None:
    save_pretrained(_toy(), ToyConfig(), tmp_path / "toy", "toy")
    back = load_pretrained(Toy, ToyConfig, tmp_path / "toy", "toy")
    assert back.head.weight is back.emb.weight


def test_config_stored_and_read_back(tmp_path: Path) -> None:
    save_pretrained(_toy(dim=6), ToyConfig(dim=6), tmp_path / "toy", "toy")
    meta = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert meta == {"component": "toy", "config": {"dim": 6, "vocab": 7}}
    assert read_component_config(tmp_path / "toy", "toy", ToyConfig) == ToyConfig(dim=6)
    with pytest.raises(ValueError, match="holds a 'toy' component, expected 'vq'"):
        read_component_config(tmp_path / "toy", "vq", ToyConfig)


def test_other_shape_refused_naming_tensor(tmp_path: Path) -> None:
    save_pretrained(_toy(dim=4), ToyConfig(dim=4), tmp_path / "toy", "toy")
    # A folder whose config says dim=8 but whose weights are dim=4: the build uses dim=8.
    meta = json.loads((tmp_path / "toy" / "config.json").read_text())
    meta["config"]["dim"] = 8
    (tmp_path / "toy" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shape mismatch: emb\.weight: checkpoint \(7, 4\)"):
        load_pretrained(Toy, ToyConfig, tmp_path / "toy", "toy")


def test_missing_tensor_refused_naming_it(tmp_path: Path) -> None:
    class Bigger(Toy):
        def __init__(self, cfg: ToyConfig) -> None:
            super().__init__(cfg)
            self.extra = torch.nn.Linear(cfg.dim, 1)

    save_pretrained(_toy(), ToyConfig(), tmp_path / "toy", "toy")
    with pytest.raises(ValueError, match=r"missing: extra\.bias, extra\.weight"):
        load_pretrained(Bigger, ToyConfig, tmp_path / "toy", "toy")


def test_atomic_dir_leaves_nothing_when_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_old_folder_when_body_raises(tmp_path: Path) -> None:
    save_pretrained(_toy(seed=1), ToyConfig(), tmp_path / "toy", "toy")
    before = (tmp_path / "toy" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "toy") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert (tmp_path / "toy" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_atomic_dir_replaces_on_success(tmp_path: Path) -> None:
    save_pretrained(_toy(seed=1), ToyConfig(), tmp_path / "toy", "toy")
    save_pretrained(_toy(seed=2), ToyConfig(), tmp_path / "toy", "toy")
    back = load_pretrained(Toy, ToyConfig, tmp_path / "toy", "toy")
    assert torch.equal(back.proj.weight, _toy(seed=2).proj.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def _draws() -> tuple[list[float], list[float], list[float]]:
    return (
        torch.rand(3).tolist() + torch.randn(2).tolist(),
        np.random.rand(3).tolist() + np.random.standard_normal(2).tolist(),
        [random.random(), random.gauss(0.0, 1.0), random.gauss(0.0, 1.0), random.random()],
    )


@pytest.mark.parametrize("cached_gauss", [False, True])
def test_rng_state_reproduces_draws(cached_gauss: bool) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    if cached_gauss:
        # Leave a cached second normal in both numpy and python, which the state must carry.
        np.random.standard_normal(1)
        random.gauss(0.0, 1.0)
    state = rng_state()
    first = _draws()
    set_rng_state(state)
    assert _draws() == first


def test_train_state_loads_with_weights_only(tmp_path: Path) -> None:
    model = _toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    state = {"step": 5, "optimizer": opt.state_dict(), "rng": rng_state(), "extra": {"shard": 2}}
    save_checkpoint(tmp_path / "ckpt", model, ToyConfig(), "toy", state)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "config.json",
        "model.safetensors",
        "train_state.pt",
    }
    back = load_train_state(tmp_path / "ckpt")  # uses torch.load(weights_only=True)
    assert back["step"] == 5 and back["extra"] == {"shard": 2}
    opt2 = torch.optim.AdamW(_toy().parameters(), lr=1e-2)
    opt2.load_state_dict(back["optimizer"])
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    # The same file must also load with the strict loader called directly.
    torch.load(tmp_path / "ckpt" / "train_state.pt", weights_only=True)


def test_load_train_state_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        load_train_state(tmp_path)


def test_complete_dir_takes_only_a_finished_write(tmp_path: Path) -> None:
    from dalle_ar.checkpoint import DONE, complete_dir

    assert complete_dir(tmp_path / "toy") is None
    save_pretrained(_toy(seed=1), ToyConfig(), tmp_path / "toy", "toy")
    unfinished = tmp_path / ".toy.tmp-0000"  # killed while writing: no marker
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"half")
    assert complete_dir(tmp_path / "toy") == tmp_path / "toy"
    finished = tmp_path / ".toy.tmp-1111"  # killed after its marker, before its renames
    finished.mkdir()
    (finished / DONE).touch()
    assert complete_dir(tmp_path / "toy") == finished
    os.utime(finished / DONE, ns=(1, 1))  # older than the folder in place: a stale leftover
    assert complete_dir(tmp_path / "toy") == tmp_path / "toy"
    (finished / DONE).touch()
    (tmp_path / "toy").rename(tmp_path / ".toy.old-2222")
    assert complete_dir(tmp_path / "toy") == finished
    save_pretrained(_toy(seed=2), ToyConfig(), tmp_path / "toy", "toy")  # a newer one in place
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    assert not (tmp_path / "toy" / DONE).exists()


def test_a_config_counts_the_numbers_its_model_holds_without_building_it() -> None:
    from dalle_ar.models.transformer import Transformer, TransformerConfig
    from dalle_ar.models.vq import VQConfig, VQTokenizer

    for cfg in (VQConfig(width=8, latent_dim=8), VQConfig(width=8, codebook_dim=4, norm="none"),
                VQConfig(width=8, encoder="patch", quantizer="fsq", codebook_size=27,
                         fsq_levels=[3, 3, 3])):  # fmt: skip
        built = sum(v.numel() for v in VQTokenizer(cfg).state_dict().values())
        assert cfg.num_values() == built
    for cfg in (TransformerConfig(dim=16, depth=2, head_dim=8, attn_impl="torch"),
                TransformerConfig(dim=16, depth=2, head_dim=8, cond_dim=8, cond_tokens=2,
                                  code_features=12, attn_impl="torch"),
                TransformerConfig(dim=16, depth=2, head_dim=8, objective="masked",
                                  layouts="bidir", attn_impl="torch")):  # fmt: skip
        assert cfg.num_params() == Transformer(cfg).num_params()


def test_prior_upsampler_and_clip_sizes_count_the_numbers_their_models_hold() -> None:
    import itertools

    from dalle_ar.models.clip import CLIPSizes, clip_config, clip_values
    from dalle_ar.models.prior import DiffusionPrior, PriorConfig
    from dalle_ar.models.upsampler import Upsampler, UpsamplerConfig
    from dalle_ar.runtime import values_by_depth
    from dalle_ar.text import TokenizerConfig, train_tokenizer

    def held(model: torch.nn.Module) -> int:
        return sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))

    prior = PriorConfig(embed_dim=8, width=16, heads=2, layers=3)
    rebuilt = values_by_depth(lambda n: DiffusionPrior(dataclasses.replace(prior, layers=n)), n=3)
    assert rebuilt == held(DiffusionPrior(prior))
    up = UpsamplerConfig(low_size=16, channels=[8, 16], norm_groups=4, layers_per_block=3)
    rebuilt = values_by_depth(lambda n: Upsampler(dataclasses.replace(up, layers_per_block=n)), n=3)
    assert rebuilt == held(Upsampler(up))
    tok = train_tokenizer(["a red circle", "a blue square"] * 20,
                          TokenizerConfig(vocab_size=300, text_len=8))  # fmt: skip
    sizes = CLIPSizes(image_size=16, vision_width=16, vision_layers=3, vision_heads=2,
                      text_width=16, text_layers=2, text_heads=2, embed_dim=8)  # fmt: skip
    config = clip_config(sizes, tok)
    from transformers import CLIPModel

    assert clip_values(config) == held(CLIPModel(config))
    assert CLIPSizes.of(config) == dataclasses.replace(sizes, text_len=8)


def test_a_prior_upsampler_or_clip_folder_of_absurd_sizes_is_refused_before_it_is_built(
    tmp_path: Path,
) -> None:
    from dalle_ar.config import ConfigError
    from dalle_ar.models.clip import CLIP, CLIPSizes
    from dalle_ar.models.prior import DiffusionPrior, PriorConfig
    from dalle_ar.models.upsampler import Upsampler, UpsamplerConfig
    from dalle_ar.text import TokenizerConfig, train_tokenizer

    DiffusionPrior(PriorConfig(embed_dim=8, width=16, heads=2, layers=1)).save_pretrained(
        tmp_path / "prior"
    )
    Upsampler(UpsamplerConfig(low_size=16, channels=[8], norm_groups=4)).save_pretrained(
        tmp_path / "up"
    )
    tok = train_tokenizer(["a red circle"] * 20, TokenizerConfig(vocab_size=300, text_len=8))
    sizes = CLIPSizes(image_size=16, vision_width=16, vision_layers=1, vision_heads=2,
                      text_width=16, text_layers=1, text_heads=2, embed_dim=8)  # fmt: skip
    CLIP.build(sizes, tok).save_pretrained(tmp_path / "clip")
    cases = ((DiffusionPrior, "prior", ("config", "layers"), "a prior"),
             (Upsampler, "up", ("config", "layers_per_block"), "an upsampler"),
             (CLIP, "clip", ("text_config", "num_hidden_layers"), "a CLIP"))  # fmt: skip
    for cls, name, (section, key), what in cases:
        f = tmp_path / name / "config.json"
        meta = json.loads(f.read_text())
        meta[section][key] = 10**9
        f.write_text(json.dumps(meta))
        named = "text_layers" if cls is CLIP else key  # a CLIP folder's sizes as clip.yaml's
        with pytest.raises(ConfigError, match=rf"{name}/config.json.*config key '{named}': "
                           rf"{what} of .* more than this machine's memory"):  # fmt: skip
            cls.from_pretrained(tmp_path / name)


def test_a_folder_of_absurd_sizes_is_refused_before_its_model_is_built(tmp_path: Path) -> None:
    from _pipeline_fixtures import build_tiny_pipeline

    from dalle_ar.config import ConfigError
    from dalle_ar.pipelines import ARPipeline

    pipe = build_tiny_pipeline(tmp_path)
    for part, key, value in (("vq", "codebook_size", 10**11), ("transformer", "depth", 10**9)):
        f = pipe / part / "config.json"
        good = f.read_text()
        meta = json.loads(good)
        meta["config"][key] = value
        f.write_text(json.dumps(meta))
        with pytest.raises(ConfigError, match=rf"{part}/config.json: config key '{key}': a "
                           rf"(VQ|transformer) of .*{key}={value}.* more than this machine's "
                           "memory"):  # fmt: skip
            ARPipeline.from_pretrained(pipe)
        f.write_text(good)
    assert ARPipeline.from_pretrained(pipe).vq.codebook_size == 32
