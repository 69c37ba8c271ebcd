"""Dataclass configs: YAML files plus dotted command-line overrides (`model.depth=8`).

Every config is a tree of small dataclasses. Loading walks the tree with the declared types, so an
unknown key, a value of the wrong type or an impossible value is rejected with a `ConfigError`
naming the full dotted key, before any work starts. Each dataclass may define `validate(self)`
that raises `ConfigError` for impossible values (use `require`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or holds an impossible value."""


def require(cond: bool, key: str, msg: str, kind: str = "config key") -> None:
    """Raise `ConfigError` for `key` unless `cond` holds: "{kind} '{key}': {msg}". Inside a
    config tree the key is given its full dotted name (`validate`)."""
    if not cond:
        raise ConfigError(f"{kind} '{key}': {msg}")


@functools.lru_cache(maxsize=1)
def memory_bytes() -> int | None:
    """This machine's memory in bytes: psutil's total where it is installed, else MemTotal of
    /proc/meminfo; None where neither tells (then no size is checked against it)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


TOO_MANY = 2**63 - 1  # the count of numbers of a model with a tensor too large to describe


def require_fits_memory(
    cfg: Any, values: int, what: str, sizes: tuple[str, ...], prefix: str = ""
) -> None:
    """The one check of a model's size, made from its config before anything is built:
    ConfigError when the `values` numbers it holds (parameters and saved buffers, counted from
    `cfg` without building), at 4 bytes each (fp32), are more than this machine's memory
    (`memory_bytes`), which it could then not even hold. The error names the field of `sizes`
    furthest above its default (the likely typo; as `prefix` + name, e.g. "model.depth"), then
    every size, the count and the bound."""
    mem = memory_bytes()
    if mem is None or values * 4 <= mem:
        return

    def size(value: Any) -> float:  # a list of sizes (an upsampler's channels) by its largest
        return float(max(value, default=0) if isinstance(value, (list, tuple)) else value)

    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else
                f.default_factory() for f in dataclasses.fields(cfg)}  # fmt: skip

    def ratio(name: str) -> float:  # a default of 0 (a feature off) counts as 1
        return size(getattr(cfg, name)) / max(size(defaults[name]), 1.0)

    worst = max(sizes, key=ratio)
    listed = ", ".join(f"{k}={getattr(cfg, k)}" for k in sizes)
    held = (f"{values:,} numbers, {_gb(values * 4)} in fp32" if values < TOO_MANY
            else "tensors too large to describe")  # fmt: skip
    require(False, prefix + worst, f"{what} of {listed} holds {held}, more than this machine's "
            f"memory ({_gb(mem)})")  # fmt: skip


def require_fits(
    count: int, each_bytes: int, key: str, what: str, kind: str = "config key"
) -> None:
    """The one memory check of things held at once (a batch when its config is read, a
    generation call's output): ConfigError for `key` ("{kind} '{key}'") when `count` of them
    (`what`), `each_bytes` bytes each, are more than this machine's memory (`memory_bytes`)."""
    mem = memory_bytes()
    if mem is None or count * each_bytes <= mem:
        return
    require(False, key, f"{count:,} {what} ({each_bytes:,} bytes each) need "
            f"{_gb(count * each_bytes)}, more than this machine's memory ({_gb(mem)})",
            kind)  # fmt: skip


# run.precision, the main job's precision and the masked mode's sampling precision: auto (bf16
# autocast where the device has bf16), fp32 or bf16 (`dalle_ar.runtime.uses_bf16`)
PRECISIONS = ("auto", "fp32", "bf16")


def require_precision(value: str, key: str = "precision", kind: str = "config key") -> None:
    """ConfigError unless `value` is one of `PRECISIONS`."""
    names = f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}"
    require(value in PRECISIONS, key, f"must be {names}, got {value!r}", kind)


# ----------------------------------------------------------------------------------------------
# Shared config blocks used by several recipes.


@dataclasses.dataclass
class DataConfig:
    train: str = ""  # training shards: path, brace glob (shards-{000..009}.tar), dir or pipe: URL
    eval: str = ""  # held-out shards, same forms; empty = no evaluation
    image_size: int = 32  # images are resized (shorter side) and centre-cropped to this
    batch_size: int = 64  # per process (per DDP rank)
    num_workers: int = 0  # DataLoader workers; shards are split across ranks and workers
    shuffle_buffer: int = 1000  # samples held in the shuffle buffer (0 = no shuffling)
    random_crop: bool = False  # random instead of centre crop (training only)

    def validate(self) -> None:
        require(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        # every recipe holds a batch of decoded images (fp32) at least; what the data set allows
        # is checked by the loader, which knows the records of a pass (`dalle_ar.data.loader`)
        s = self.image_size
        require_fits(self.batch_size, 3 * s * s * 4, "batch_size",
                     f"samples of {s}x{s} RGB images in fp32")  # fmt: skip
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.01  # applied to matrices only, never to norms, biases, embeddings
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step

    def validate(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")


@dataclasses.dataclass
class RunConfig:
    out_dir: str = "runs/default"  # run folder: config, checkpoints, samples, metrics
    steps: int = 1000  # optimizer steps in total
    # A safety cap, not a budget: stop (and save) after this wall time, counted over every
    # resume of the run; a run it stops is reported under-trained. 0 = no cap. The budget is
    # `steps` (x the batch): the same config trains the same model on any machine.
    max_minutes: float = 0.0
    seed: int = 0  # seeds torch, numpy and python
    log_every: int = 10  # steps between metric logs
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    save_every: int = 200  # steps between checkpoints (always one at the end)
    sample_every: int = 0  # steps between sample / reconstruction grids (0 = only at the end)
    device: str = "auto"  # auto | cpu | cuda
    # torch CPU threads; 0 = the CPUs free at the start, followed while it runs (runtime.CPUShare)
    threads: int = 0
    compile: bool = False  # torch.compile the training forward, where the recipe supports it
    # auto: bf16 autocast on a GPU with bf16 (and, for the transformer, a CPU with bf16
    # instructions: dalle_ar.runtime.uses_bf16) | fp32 | bf16
    precision: str = "auto"
    wandb: Literal["offline", "online", "disabled"] = "offline"  # wandb mode
    wandb_project: str = "dalle_ar"  # wandb project name

    def validate(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.max_minutes >= 0, "max_minutes", "must be >= 0")
        require(self.threads >= 0, "threads", "must be >= 0 (0 = the free CPUs)")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.save_every >= 1, "save_every", "must be >= 1")
        require(self.eval_every >= 0, "eval_every", "must be >= 0")
        require(self.sample_every >= 0, "sample_every", "must be >= 0")
        require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        require_precision(self.precision)


# ----------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the declared type `tp` (with the few safe widenings) or raise."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"config key '{key}': must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} does not match {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = get_args(tp)
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type[T], values: dict, prefix: str = "") -> T:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"'{prefix}{k}'" if prefix else f"'{k}'"
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {where} (known here: {known})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _coerce(_onto_default(fields[k], hints[k], v), hints[k], f"{prefix}{k}")
    obj = cls(**kwargs)
    return obj


def _onto_default(field: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A partial mapping for a nested config field, laid over that field's own default (its
    `default_factory`), so that `sampling.top_k=64` keeps the parent's other sampling values."""
    if not (dataclasses.is_dataclass(tp) and isinstance(value, dict)):
        return value
    if field.default_factory is not dataclasses.MISSING:
        base = to_dict(field.default_factory())
    elif field.default is not dataclasses.MISSING and dataclasses.is_dataclass(field.default):
        base = to_dict(field.default)
    else:
        return value
    return _merge(base, value)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: Any, prefix: str = "") -> None:
    """Run every `validate()` in the tree; errors name the full dotted key."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, f"{prefix}{f.name}.")
    check = getattr(cfg, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            msg = str(e)
            kind, quote, rest = msg.partition(" '")
            if prefix and quote and kind.endswith(("config key", "setting")):
                msg = f"config key '{prefix}{rest}"
            raise ConfigError(msg) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.depth=8` -> (['model', 'depth'], 8). The value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if not raw.strip():
        return key.split("."), ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a brace glob "{000..009}.tar"): the plain string
    return key.split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = ()
) -> T:
    """Build `cls` from defaults, then the YAML file at `path`, then dotted overrides; validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    for text in overrides:
        keys, value = parse_override(text)
        _set(tree, keys, value)
    cfg = _build(cls, tree)
    validate(cfg)
    return cfg


def config_from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a config saved with `to_dict` (used by checkpoints); validated."""
    cfg = _build(cls, values)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out))  # tuples -> lists, so a reload compares equal


def settings_help(cls: type, width: int = 79) -> str:
    """The keys a config dataclass takes on the command line, with their defaults, for a
    command's --help: `key=default` for the top-level fields, then each nested section's
    `section.key=default` in a paragraph of its own, wrapped at `width` columns."""
    import textwrap

    def shown(v: Any) -> str:
        return v if isinstance(v, str) and v else json.dumps(v)

    flat, sections = [], []
    for key, value in to_dict(cls()).items():
        if isinstance(value, dict):
            sections.append([f"{key}.{k}={shown(v)}" for k, v in value.items()])
        else:
            flat.append(f"{key}={shown(value)}")
    wrap = functools.partial(textwrap.fill, width=width, initial_indent="  ",
                             subsequent_indent="  ", break_long_words=False,
                             break_on_hyphens=False)  # fmt: skip
    return "\n".join(wrap("  ".join(items)) for items in [flat, *sections])


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with `load_config`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)
