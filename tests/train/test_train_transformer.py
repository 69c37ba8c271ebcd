"""The transformer recipe: overfitting, exact resume, 2-process DDP against one process, skipped
non-finite steps, refusal of another shape, and the CLI end to end on real shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _spawn import run_ranks

from dalle_ar.config import ConfigError, load_config
from dalle_ar.models.transformer import Transformer
from dalle_ar.runtime import autocast_context, cpu_has_bf16, uses_bf16
from dalle_ar.train.common import BudgetBar, schedule_step
from dalle_ar.train.loop import NonFiniteLoss
from dalle_ar.train.transformer import TrainTransformerConfig, train

ROOT = Path(__file__).resolve().parents[2]
T, GH, GW, TV, IV = 6, 3, 3, 20, 12  # text_len, grid, vocabularies
EMPTY = torch.tensor([1, 2, 0, 0, 0, 0])


class MemoryBatches:
    """A deterministic global batch sequence; rank r of `world` takes its slice. Image codes are
    a function of the text so the data can be learned."""

    def __init__(self, batch: int, rank: int = 0, world: int = 1, repeat: bool = False,
                 poison: set[int] | None = None, cond_dim: int = 0) -> None:  # fmt: skip
        self.batch, self.rank, self.world, self.repeat = batch, rank, world, repeat
        self.poison, self.cond_dim = poison or set(), cond_dim
        self.empty_ids, self.empty_len = EMPTY, 2

    def _global(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0 if self.repeat else 1000 + i)
        n = self.batch * self.world
        text = torch.randint(3, TV, (n, T), generator=g)
        lens = torch.randint(3, T + 1, (n,), generator=g)
        text[:, 0] = 1
        text[torch.arange(n), lens - 1] = 2
        text[torch.arange(T)[None, :] >= lens[:, None]] = 0
        image = (text[:, 1:2] * 5 + torch.arange(GH * GW)[None, :]) % IV
        out = {"text": text, "text_lens": lens, "image": image}
        if self.cond_dim:
            cond = torch.randn(n, self.cond_dim, generator=g)
            out["cond"] = cond * (float("nan") if i in self.poison else 1.0)
        return out

    def train(self, skip: int):
        i = skip
        while True:
            b = self._global(i)
            sl = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
            yield {k: v[sl] for k, v in b.items()}
            i += 1

    def eval(self):
        return iter([self._global(10_000)])


def config(out: Path, *extra: str, cls: type = TrainTransformerConfig) -> TrainTransformerConfig:
    base = [
        f"model.text_vocab={TV}", f"model.text_len={T}", f"model.image_vocab={IV}",
        f"model.grid_h={GH}", f"model.grid_w={GW}", "model.dim=32", "model.depth=2",
        "model.heads=2", "model.head_dim=16", "model.attn_impl=torch", "data.batch_size=4",
        "optim.lr=3e-3", "optim.warmup_steps=2", "run.steps=6", "run.log_every=1",
        "run.save_every=3", "run.wandb=disabled", "run.device=cpu", f"run.out_dir={out}",
        "cond_drop=0.25",
    ]  # fmt: skip
    return load_config(cls, None, [*base, *extra])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_tiny_model_overfits_one_batch(tmp_path):
    cfg = config(tmp_path, "run.steps=40", "run.save_every=1000", "cond_drop=0",
                 "optim.lr=1e-2", "optim.warmup_steps=5", "run.log_every=10")  # fmt: skip
    metrics = train(cfg, MemoryBatches(4, repeat=True))
    first, last = losses(tmp_path)[10], metrics["train/image_loss"]
    assert last < 0.05 < first, (first, last)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole = train(config(tmp_path / "a"), MemoryBatches(4))
    train(config(tmp_path / "b", "halt_after=3"), MemoryBatches(4))
    state = torch.load(tmp_path / "b" / "ckpt" / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and state["extra"]["micro_batches"] == 3
    assert not (tmp_path / "b" / "transformer").exists()  # not finished: no final folder yet
    train(config(tmp_path / "b"), MemoryBatches(4), resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert (tmp_path / "b" / "transformer" / "model.safetensors").is_file()
    assert whole["step"] == 6


def _ddp_worker(rank: int, out: str, extra: list[str], resume: bool = False) -> None:
    cfg = config(Path(out), "data.batch_size=2", *extra)
    train(cfg, MemoryBatches(2, rank=rank, world=2), resume=resume)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.usefixtures("one_thread")  # as the workers: one thread count, one summation order
def test_two_process_data_parallel_matches_one_process(tmp_path, parallel):
    # global batch 4 in both runs, with accumulation, caption dropout and uneven text lengths;
    # under FSDP the two-process run also stops after step 2 and resumes from the gathered state
    # (DDP resumes through the same single-process path the resume test covers). fp32: under
    # bf16 autocast (precision=auto on a CPU with bf16) the sums round differently per split.
    extra = ["optim.grad_accum=2", "run.steps=3", f"parallel={parallel}", "run.precision=fp32"]
    train(config(tmp_path / "one", *extra), MemoryBatches(4))
    two = str(tmp_path / "two")
    if parallel == "fsdp":
        run_ranks(_ddp_worker, 2, two, [*extra, "halt_after=2"])
    run_ranks(_ddp_worker, 2, two, extra, parallel == "fsdp")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, one, two)
    w1 = torch.load(tmp_path / "one" / "ckpt" / "last" / "train_state.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "ckpt" / "last" / "train_state.pt", weights_only=True)
    assert w1["step"] == w2["step"] == 3


def test_non_finite_steps_are_skipped_and_many_stop_the_run(tmp_path):
    cond = ["model.cond_dim=4", "model.cond_tokens=2", "cond_drop=0"]
    metrics = train(config(tmp_path / "a", *cond), MemoryBatches(4, poison={2}, cond_dim=4))
    assert metrics["step"] == 6 and metrics["skipped_steps"] == 1

    poison = set(range(4, 100))
    cfg = config(tmp_path / "b", *cond, "max_bad_steps=3", "run.save_every=2")
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        train(cfg, MemoryBatches(4, poison=poison, cond_dim=4))
    state = torch.load(tmp_path / "b" / "ckpt" / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 4  # the last good checkpoint is intact


@pytest.mark.parametrize(
    "name",
    ["tiny/transformer", "shapes/transformer", "transformer_bench_s", "transformer_paper_12b"],
)
def test_shipped_configs_load(name):
    cfg = load_config(TrainTransformerConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.model.seq_len == cfg.model.text_len + cfg.model.grid_h * cfg.model.grid_w


def test_lr_schedule_can_follow_the_time_budget(tmp_path):
    cfg = config(tmp_path, "run.steps=1010", "optim.warmup_steps=10", "run.max_minutes=10",
                 "lr_follows_time=true")  # fmt: skip
    assert schedule_step(cfg, 5, minutes=9.0) == 5  # warmup counts steps
    assert schedule_step(cfg, 20, minutes=5.0) == 10 + 500  # half the time: half the cosine
    assert schedule_step(cfg, 800, minutes=1.0) == 800  # steps ahead of the clock
    assert schedule_step(cfg, 20, minutes=12.0) == 1010
    off = config(tmp_path, "run.steps=1010", "run.max_minutes=10")
    assert schedule_step(off, 20, minutes=5.0) == 20


def test_progress_bar_follows_whichever_budget_is_further_along(tmp_path):
    cfg = config(tmp_path, "run.steps=1000000", "run.max_minutes=10")
    bar = BudgetBar(cfg.run, 0, "t", disable=True, by_time=True)  # lr_follows_time runs
    bar.update(500, minutes=5.0)
    assert bar.percent == pytest.approx(50.0)  # the clock, not 500 of a million steps
    capped = BudgetBar(config(tmp_path, "run.steps=1000", "run.max_minutes=10").run, 0, "t",
                       disable=True)  # fmt: skip
    capped.update(100, minutes=5.0)
    assert capped.percent == pytest.approx(10.0)  # a safety cap does not move the bar
    steps_only = config(tmp_path, "run.steps=200", "run.max_minutes=0")
    bar = BudgetBar(steps_only.run, 50, "t", disable=True)
    assert bar.percent == pytest.approx(25.0)
    bar.update(400, minutes=99.0)
    assert bar.percent == pytest.approx(100.0)  # never past the end


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    train(config(tmp_path, "run.steps=2"), MemoryBatches(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        train(config(tmp_path, "run.steps=4", "model.dim=48"), MemoryBatches(4), resume=True)


def test_cli_end_to_end_on_shards(tmp_path, shapes_shards):
    from dalle_ar.cli import main
    from dalle_ar.models.transformer import Transformer
    from dalle_ar.models.vq import VQConfig, VQTokenizer

    tok, vq = tmp_path / "tok", tmp_path / "vq"
    argv = ["train", "tokenizer", "--config", str(ROOT / "configs" / "tiny" / "tokenizer.yaml"),
            f"data.train={shapes_shards.train}", f"run.out_dir={tok}"]  # fmt: skip
    assert main(argv) == 0
    torch.manual_seed(0)
    vq_cfg = VQConfig(image_size=16, downsample=4, width=8, num_res_blocks=1, latent_dim=8,
                      codebook_size=32, kmeans_init=False)  # fmt: skip
    VQTokenizer(vq_cfg).save_pretrained(vq)
    out = tmp_path / "run"
    argv = ["train", "transformer", "--config", str(ROOT / "configs" / "tiny" / "transformer.yaml"),
            f"data.train={shapes_shards.train}", f"data.eval={shapes_shards.eval}",
            f"text_tokenizer={tok / 'tokenizer'}", f"vq={vq}", f"run.out_dir={out}",
            "data_format=images", "run.steps=6", "run.save_every=3"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["eval/image_loss"] > 0
    assert (out / "samples" / "step_0000006.png").is_file()
    model = Transformer.from_pretrained(out / "transformer")
    assert model.cfg.grid_h == 4
    assert main([*argv, "model.depth=0"]) == 2  # a bad config is refused before any work
    assert main([*argv, f"vq={tmp_path / 'missing'}"]) == 2  # a missing folder, no traceback

    # the same recipe on pretokenized shards (what `dalle-ar tokens` writes)
    from dalle_ar.cli.tokens import tokenize_shards

    tokenize_shards(vq, shapes_shards.train, tmp_path / "tokens", "train", shard_size=64)
    argv = [a for a in argv if not a.startswith(("data.", "data_format", "run.out_dir"))]
    argv += [f"data.train={tmp_path / 'tokens'}", f"run.out_dir={tmp_path / 'run_tokens'}"]
    assert main([*argv, "run.steps=3"]) == 0
    metrics = json.loads((tmp_path / "run_tokens" / "metrics.json").read_text())
    assert metrics["step"] == 3 and "eval/image_loss" not in metrics  # no eval shards given

    # code features from the VQ: the width (3 * 4 * 4) is resolved and the pixels saved
    argv = [a for a in argv if not a.startswith("run.out_dir")]
    feat_run = tmp_path / "run_feats"
    assert main([*argv, f"run.out_dir={feat_run}", "run.steps=2", "model.code_features=-1"]) == 0
    model = Transformer.from_pretrained(feat_run / "transformer")
    assert model.cfg.code_features == 48
    vq_model = VQTokenizer.from_pretrained(vq)
    torch.testing.assert_close(model.code_feats, vq_model.code_pixels())
    assert main([*argv, f"run.out_dir={feat_run}2", "model.code_features=5"]) == 2


def test_precision_auto_uses_bf16_where_the_cpu_multiplies_it():
    cpu = torch.device("cpu")
    assert uses_bf16(cpu, "bf16") and not uses_bf16(cpu, "fp32", cpu_auto=True)
    assert uses_bf16(cpu, "auto", cpu_auto=True) == cpu_has_bf16()
    assert not uses_bf16(cpu, "auto")  # a recipe opts in (the VQ-VAE ran slower in bf16)
    a = torch.ones(4, 4)
    for precision, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast_context(cpu, precision):
            assert (a @ a).dtype == want
    with autocast_context(cpu, "auto", cpu_auto=True):
        assert (a @ a).dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)


def test_masked_generator_trains_on_the_same_recipe(tmp_path):
    from dalle_ar.train.masked import TrainMaskedConfig

    masked = ["optim.lr=1e-2", "optim.warmup_steps=5", "run.steps=200", "run.log_every=10",
              "run.save_every=1000", "cond_drop=0"]  # fmt: skip
    cfg = config(tmp_path, *masked, cls=TrainMaskedConfig)
    assert cfg.model.masked and cfg.model.layouts == "bidir"
    metrics = train(cfg, MemoryBatches(4, repeat=True))
    first, last = losses(tmp_path)[10], metrics["train/image_loss"]
    assert last < first / 4, (first, last)
    model = Transformer.from_pretrained(tmp_path / "masked")  # a transformer folder
    assert model.cfg.masked and not (tmp_path / "transformer").exists()
    with pytest.raises(ConfigError, match="must be 'masked'"):
        config(tmp_path, "model.objective=ar", "model.layouts=full", cls=TrainMaskedConfig)


def test_init_from_starts_an_embedding_conditioned_model_from_a_trained_one(tmp_path):
    """DALL-E 2's decoder fine-tuned from the text-only transformer: every tensor of the folder
    is copied, the conditioning embedding's start fresh; a folder of another shape is refused
    by name before training."""
    from dalle_ar.train.transformer import build

    train(config(tmp_path / "text"), MemoryBatches(4))
    src = Transformer.from_pretrained(tmp_path / "text" / "transformer")
    cond = ["model.cond_dim=5", "model.cond_tokens=2"]
    init = f"init_from={tmp_path / 'text' / 'transformer'}"
    task, _ = build(config(tmp_path / "cond", *cond, init), MemoryBatches(4, cond_dim=5))
    got = task.model.state_dict()
    for name, value in src.state_dict().items():
        assert torch.equal(got[name], value), name
    fresh = set(got) - set(src.state_dict())
    assert fresh == {"cond_proj.weight", "cond_proj.bias", "cond_pos_emb.weight", "cond_null"}
    metrics = train(config(tmp_path / "cond", *cond, init), MemoryBatches(4, cond_dim=5))
    assert metrics["step"] == 6 and Transformer.from_pretrained(tmp_path / "cond" / "transformer")
    # another model is refused by name before any weight is read, a missing folder too
    with pytest.raises(ConfigError, match=r"init_from.*another model \(text_vocab: 20 there, 24"):
        build(config(tmp_path / "wide", init, f"model.text_vocab={TV + 4}"), MemoryBatches(4))
    with pytest.raises(ConfigError, match="init_from.*config.json is missing$"):
        build(config(tmp_path / "none", f"init_from={tmp_path}"), MemoryBatches(4))
    with pytest.raises(ConfigError, match="no such folder: train it first, or init_from=''"):
        build(config(tmp_path / "none", f"init_from={tmp_path / 'gone'}"), MemoryBatches(4))
    # a resumed run reads its checkpoint: the folder it started from may be gone
    (tmp_path / "text" / "transformer" / "model.safetensors").unlink()
    resumed = train(config(tmp_path / "cond", *cond, init, "run.steps=8"),
                    MemoryBatches(4, cond_dim=5), resume=True)  # fmt: skip
    assert resumed["step"] == 8


def test_freeze_body_trains_only_the_added_embedding(tmp_path):
    """cond_mode=add with freeze_body: the body stays the text-only model's, tensor for
    tensor, while the embedding's projection and null embedding learn; asked without init_from
    or without an embedding, it is refused by name."""
    train(config(tmp_path / "text"), MemoryBatches(4))
    src = Transformer.from_pretrained(tmp_path / "text" / "transformer")
    cond = ["model.cond_dim=5", "model.cond_mode=add", "freeze_body=true", "optim.lr=1e-2",
            f"init_from={tmp_path / 'text' / 'transformer'}"]  # fmt: skip
    train(config(tmp_path / "cond", *cond), MemoryBatches(4, cond_dim=5))
    tuned = Transformer.from_pretrained(tmp_path / "cond" / "transformer")
    for name, value in src.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], value), name
    assert tuned.cond_proj.weight.abs().max() > 0  # started at zero, trained
    # resumed with the body unfrozen: refused by name, not with torch's optimizer words
    with pytest.raises(ValueError, match="trained other parameters .*freeze_body"):
        unfrozen = [c for c in cond if not c.startswith("freeze_body")]
        train(config(tmp_path / "cond", *unfrozen, "run.steps=8"),
              MemoryBatches(4, cond_dim=5), resume=True)  # fmt: skip
    with pytest.raises(ConfigError, match="freeze_body.*init_from"):
        config(tmp_path / "x", "model.cond_dim=5", "model.cond_mode=add", "freeze_body=true")
    with pytest.raises(ConfigError, match="freeze_body.*cond_dim > 0"):
        config(tmp_path / "x", "freeze_body=true", cond[-1])


def test_a_masked_model_starts_from_an_autoregressive_one(tmp_path):
    """The body, text and positions of an embedding-conditioned autoregressive model carry over
    into a masked one; its image input (the [MASK] row is new) and the conditioning start fresh
    or are left out; the reverse, an autoregressive model from a masked one, is refused."""
    from dalle_ar.train.masked import TrainMaskedConfig
    from dalle_ar.train.transformer import build

    cond = ["model.cond_dim=5", "model.cond_tokens=2"]
    train(config(tmp_path / "ar", *cond), MemoryBatches(4, cond_dim=5))
    src = Transformer.from_pretrained(tmp_path / "ar" / "transformer").state_dict()
    init = f"init_from={tmp_path / 'ar' / 'transformer'}"
    task, _ = build(config(tmp_path / "masked", init, cls=TrainMaskedConfig), MemoryBatches(4))
    got = task.model.state_dict()
    kept = {k for k in src if not k.startswith(("cond_", "image_emb."))}
    assert kept and all(torch.equal(got[k], src[k]) for k in kept)
    assert set(got) - kept == {"image_emb.weight"}  # (IV + 1, dim): the [MASK] row is new
    assert not torch.equal(got["image_emb.weight"][:IV], src["image_emb.weight"])
    metrics = train(config(tmp_path / "masked", init, cls=TrainMaskedConfig), MemoryBatches(4))
    assert metrics["step"] == 6 and Transformer.from_pretrained(tmp_path / "masked" / "masked")
    # only what is listed is left out: any other tensor of another shape is still refused
    from dalle_ar.checkpoint import init_from_folder

    fresh_model = Transformer(config(tmp_path / "x", cls=TrainMaskedConfig).model)
    with pytest.raises(ValueError, match=r"shape mismatch: image_emb.weight"):
        init_from_folder(fresh_model, tmp_path / "ar" / "transformer", "transformer", ("cond_",))
    back = f"init_from={tmp_path / 'masked' / 'masked'}"
    refused = r"another model \(layouts: 'bidir' there, 'dalle' here; objective: 'masked'"
    with pytest.raises(ConfigError, match=refused):
        build(config(tmp_path / "back", back), MemoryBatches(4))


def test_a_token_record_with_a_code_past_the_codebook_is_skipped_and_counted(
    tmp_path, shapes_shards, caplog
):
    import numpy as np

    from dalle_ar.cli import main
    from dalle_ar.data.shards import write_samples

    tok = tmp_path / "tok"
    argv = ["train", "tokenizer", "--config", str(ROOT / "configs" / "tiny" / "tokenizer.yaml"),
            f"data.train={shapes_shards.train}", f"run.out_dir={tok}"]  # fmt: skip
    assert main(argv) == 0
    rng = np.random.default_rng(0)
    records = [{"__key__": f"r{i:03d}", "txt": "a red circle",
                "codes.npy": rng.integers(0, IV, (GH, GW)).astype(np.int16)}
               for i in range(17)]  # fmt: skip
    records[5]["codes.npy"][1, 2] = IV  # one code past the codebook
    write_samples(records, tmp_path / "tokens", "train", 17)
    cfg = config(tmp_path / "run", f"data.train={tmp_path / 'tokens' / 'train-000000.tar'}",
                 f"text_tokenizer={tok / 'tokenizer'}", "model.text_vocab=512", "run.steps=5",
                 "data.shuffle_buffer=1")  # fmt: skip
    metrics = train(cfg)  # 16 good records: a pass is 4 batches, step 5 starts the next pass
    assert metrics["step"] == 5
    assert "code_out_of_range: 1 [r005]" in caplog.text


def test_a_text_vocab_below_the_tokenizer_s_is_one_line_and_exit_2(tmp_path, capsys):
    import numpy as np

    from dalle_ar.cli import main
    from dalle_ar.data.shards import write_samples
    from dalle_ar.text import TokenizerConfig, train_tokenizer

    caps = ["a red circle", "a blue square", "a green triangle"] * 4
    train_tokenizer(caps, TokenizerConfig(vocab_size=280, text_len=T)).save_pretrained(
        tmp_path / "tok"
    )
    records = [{"__key__": f"r{i}", "txt": caps[i], "codes.npy": np.zeros((GH, GW), np.int16)}
               for i in range(8)]  # fmt: skip
    write_samples(records, tmp_path / "tokens", "train", 8)
    argv = ["train", "transformer", "--config", str(ROOT / "configs" / "tiny" / "transformer.yaml"),
            f"data.train={tmp_path / 'tokens' / 'train-000000.tar'}", f"model.text_len={T}",
            f"model.grid_h={GH}", f"model.grid_w={GW}", f"text_tokenizer={tmp_path / 'tok'}",
            "model.text_vocab=100", f"run.out_dir={tmp_path / 'run'}",
            "run.wandb=disabled"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("model.text_vocab is 100: expected text_vocab >= the tokenizer's vocab")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_model_records_the_tokenizer_and_vq_it_was_trained_on(tmp_path):
    import numpy as np

    from dalle_ar.checkpoint import file_sha256
    from dalle_ar.data.shards import write_samples
    from dalle_ar.models.vq import VQConfig, VQTokenizer
    from dalle_ar.text import TokenizerConfig, train_tokenizer

    caps = ["a red circle", "a blue square", "a green triangle"] * 4
    train_tokenizer(caps, TokenizerConfig(vocab_size=280, text_len=T)).save_pretrained(
        tmp_path / "tok"
    )
    torch.manual_seed(0)
    VQTokenizer(
        VQConfig(
            image_size=12,
            downsample=4,
            width=8,
            num_res_blocks=1,
            latent_dim=8,
            codebook_size=IV,
            kmeans_init=False,
        )
    ).save_pretrained(tmp_path / "vq")
    records = [{"__key__": f"r{i}", "txt": caps[i], "codes.npy": np.zeros((GH, GW), np.int16)}
               for i in range(8)]  # fmt: skip
    write_samples(records, tmp_path / "tokens", "train", 8)
    shards = tmp_path / "tokens" / "train-000000.tar"
    cfg = config(tmp_path / "run", f"data.train={shards}", f"text_tokenizer={tmp_path / 'tok'}",
                 f"vq={tmp_path / 'vq'}", "model.text_vocab=512", "run.steps=1",
                 "sample_prompts=[]")  # fmt: skip
    train(cfg)
    saved = Transformer.from_pretrained(tmp_path / "run" / "transformer").cfg
    assert saved.text_tokenizer_sha256 == file_sha256(tmp_path / "tok" / "tokenizer.json")
    assert saved.vq_sha256 == file_sha256(tmp_path / "vq" / "model.safetensors")
    # token shards whose summary names another VQ than the `vq` folder are refused by name
    (tmp_path / "tokens" / "train-tokens.json").write_text(json.dumps({"vq_sha256": "ab" * 32}))
    cfg = config(tmp_path / "run2", f"data.train={shards}", f"text_tokenizer={tmp_path / 'tok'}",
                 f"vq={tmp_path / 'vq'}", "model.text_vocab=512", "run.steps=1")  # fmt: skip
    with pytest.raises(ValueError, match=r"written by another VQ \(content hash abababababab"):
        train(cfg)
