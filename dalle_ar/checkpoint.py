"""Checkpoints: Hugging Face-style component folders and resumable training state.

A component folder holds `config.json` (the model config as a dict, plus `"component"`) and
`model.safetensors` (no pickle). Loading builds the model on the meta device and assigns the
tensors strictly, so a checkpoint of another shape is refused with the names that differ.
Training state (optimizer, step, RNG, data position) lives beside it in `train_state.pt`, loaded
with `weights_only=True`. Every write goes to a temporary folder that is renamed into place, so a
killed process never leaves a half-written checkpoint, and never loses the last whole one
(`complete_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dalle_ar.config import ConfigError, config_from_dict, to_dict

M = TypeVar("M", bound=torch.nn.Module)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path` through a temporary file and one rename, so a
    reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks: the content identity of a component whose
    behaviour one file defines (a tokenizer's tokenizer.json, a VQ's model.safetensors), which
    what is trained on it records. FileNotFoundError without the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DONE = ".complete"  # written last into a temporary folder of `atomic_dir`: its write finished


def inside(folder: str | Path, name: Any, what: str) -> Path:
    """`folder / name` for a relative path `name` read from a file a user may have been handed (a
    samples.json, a pipeline.json): ValueError naming `what` and the value when it is not a
    non-empty relative path that stays in `folder` (absolute, "..", a drive, a NUL byte), so
    such a file never makes a command read or write outside its folder. Symbolic links inside
    `folder` are followed as they are (a linked component folder is the folder's own choice)."""
    ok = isinstance(name, str) and name.strip() and "\0" not in name and "\\" not in name
    parts = Path(name).parts if ok else ()
    if not ok or Path(name).is_absolute() or ".." in parts or not parts or ":" in parts[0]:
        raise ValueError(f"{what} must be a relative path inside {folder}, got {name!r}")
    return Path(folder) / name


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`.

    The files are synced and a marker (`DONE`) is written last, so a finished temporary folder
    is recognisable: a process killed between the two renames (the old `path` moved aside, the
    new folder not yet moved in) loses nothing, and `complete_dir` finds the newest whole
    version. Once the new folder is in place, what killed writes left beside it is removed (one
    writer per folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        with open(tmp / DONE, "w") as f:
            os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old is not None and not path.exists():
                old.rename(path)  # the version before stays in place
            raise
        (path / DONE).unlink(missing_ok=True)
        for left in _leftovers(path):
            shutil.rmtree(left, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _leftovers(path: Path) -> list[Path]:
    """The temporary and moved-aside folders of `atomic_dir` writes of `path`."""
    if not path.parent.is_dir():
        return []
    names = (f".{path.name}.tmp-", f".{path.name}.old-")
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(names) and p.is_dir())


def complete_dir(path: str | Path) -> Path | None:
    """The newest whole version of a folder `atomic_dir` writes, or None: `path` itself, or, after
    a process was killed while replacing it, a temporary folder whose write finished (it holds the
    `DONE` marker) or the previous version moved aside. Reads only; the next write of `path`
    removes the leftovers."""
    path = Path(path)
    # (time, preference on a tie, folder). A finished temporary folder wins a tie with `path`:
    # `path` took its time when it was put in place, which a finished write comes after, unless
    # a later write's clean-up was killed, a far less likely moment
    found: list[tuple[int, int, Path]] = []
    if path.is_dir():
        found.append((path.stat().st_mtime_ns, 1, path))
    for left in _leftovers(path):
        if left.name.startswith(f".{path.name}.tmp-"):
            if (left / DONE).is_file():
                found.append(((left / DONE).stat().st_mtime_ns, 2, left))
        elif not path.is_dir():  # a moved-aside version counts only without `path`
            found.append((left.stat().st_mtime_ns, 0, left))
    return max(found)[2] if found else None


def save_pretrained(model: torch.nn.Module, config: Any, path: str | Path, component: str) -> None:
    """Write `config.json` + `model.safetensors` for `model` atomically."""
    with atomic_dir(path) as tmp:
        write_component(model, config, tmp, component)


def write_component(model: torch.nn.Module, config: Any, folder: Path, component: str) -> None:
    """Write the component files into an existing folder (used inside `atomic_dir`)."""
    meta = {"component": component, "config": to_dict(config)}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_untie(state), str(folder / "model.safetensors"))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory; tied weights are saved as copies and
    # re-tied on load (`load_pretrained` ties what the model's constructor tied).
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def read_component_config(path: str | Path, component: str, config_cls: type) -> Any:
    """Read and validate the config of a component folder, before anything is built from it:
    ConfigError naming the folder and the field for an impossible value, including a model too
    large for this machine's memory (`config.require_fits_memory`, where the config counts its
    size); ValueError for a folder of another kind; FileNotFoundError without config.json."""
    meta = _component_meta(Path(path), component)
    try:
        cfg = config_from_dict(config_cls, meta["config"])
        check = getattr(cfg, "check_fits_memory", None)
        if check is not None:  # its model is about to be built here
            check()
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{Path(path) / 'config.json'}: {e}") from None


def _component_meta(path: Path, component: str) -> dict[str, Any]:
    """A component folder's config.json; FileNotFoundError without one, ValueError for a folder
    of another kind."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a {component} folder: config.json is missing")
    meta = json.loads(cfg_file.read_text())
    found = meta.get("component")
    if found != component:
        raise ValueError(f"{path} holds a '{found}' component, expected '{component}'")
    return meta


def load_state_strict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    assign: bool = True,
    allow_missing: bool = False,
) -> list[str]:
    """Strict load that names every missing, unexpected or mis-shaped tensor.

    `assign=True` (loading onto a meta-device model) swaps the tensors in; `assign=False` copies
    into the existing parameters, which an optimizer may already hold (resume). `allow_missing`:
    the model's tensors that `state` lacks keep their values (fine-tuning a larger model from a
    smaller one's folder); returns their names (empty otherwise).
    """
    own = model.state_dict()
    missing = [] if allow_missing else sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:8]))
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]))
        raise ValueError(f"checkpoint {where} does not fit this model ({' | '.join(parts)})")
    model.load_state_dict(state, strict=not allow_missing, assign=assign)
    return sorted(set(own) - set(state))


def load_pretrained(
    build: Callable[[Any], M], config_cls: type, path: str | Path, component: str
) -> M:
    """Build the model from the folder's config on the meta device and load its weights."""
    path = Path(path)
    cfg = read_component_config(path, component, config_cls)
    weights = _weights_file(path)
    with torch.device("meta"):
        model = build(cfg)
    tied = _tied_names(model)
    # load_file's tensors are views into one mapping of the file, most at unaligned addresses: a
    # copy of each gives the loaded model the 64-byte-aligned memory a freshly built one has (on
    # some CPUs the same weights unaligned take other kernel paths and compute results 1e-6 off
    # the model that was saved) and leaves no file mapped behind the model
    state = {k: v.clone() for k, v in load_file(str(weights)).items()}
    load_state_strict(model, state, str(path))
    # `assign=True` gives every name its own tensor; tie the shared parameters again.
    for name, first in tied:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
    # Buffers that are not saved (persistent=False) are still on meta: rebuild them for real.
    reset = getattr(model, "init_non_persistent_buffers", None)
    if reset is not None:
        reset()
    return model.eval()


def init_from_folder(
    model: torch.nn.Module, path: str | Path, component: str, leave_out: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """Start a model from a trained component folder's weights (fine-tuning): every tensor of
    the folder is copied into the model's tensor of the same name; the model's tensors the folder
    lacks keep their initialisation. `leave_out`: name prefixes of the folder's tensors that are
    not copied where the model lacks them or holds them in another shape (the parts a recipe
    replaces). Returns (the model's tensors left as initialised, the folder's tensors left out).
    A folder of another component, or with any other tensor the model lacks or holds in another
    shape, is refused by name (ValueError), as `load_state_strict` does; FileNotFoundError for a
    folder without weights."""
    path = Path(path)
    _component_meta(path, component)
    state = load_file(str(_weights_file(path)))
    own = model.state_dict()
    dropped = sorted(
        k for k in state
        if k.startswith(leave_out) and (k not in own or own[k].shape != state[k].shape)
    )  # fmt: skip
    for k in dropped:
        del state[k]
    with torch.no_grad():
        fresh = load_state_strict(model, state, str(path), assign=False, allow_missing=True)
    return fresh, dropped


def _weights_file(path: Path) -> Path:
    """A component folder's `model.safetensors`; FileNotFoundError without it."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: model.safetensors is missing")
    return weights


def _tied_names(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, first name) for every parameter that is the same object as an earlier one."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


# ----------------------------------------------------------------------------------------------
# Training state.


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(_np_state_bytes(), dtype=np.uint8).copy()),
        "python": torch.tensor(list(_py_state_ints()), dtype=torch.int64),
        # random.gauss caches the second value of each pair; NaN when none is cached.
        "python_gauss": torch.tensor(_py_gauss(), dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_state_bytes() -> bytes:
    return json.dumps(_jsonable(np.random.get_state())).encode()


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return {"__nd__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _py_state_ints() -> list[int]:
    version, internal, gauss = random.getstate()
    return [version, *internal, -1 if gauss is None else 1]


def _py_gauss() -> float:
    gauss = random.getstate()[2]
    return float("nan") if gauss is None else gauss


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = json.loads(bytes(state["numpy"].tolist()).decode())
    np_state[1] = np.array(np_state[1]["__nd__"], dtype=np_state[1]["dtype"])
    np.random.set_state(tuple(np_state))
    ints = state["python"].tolist()
    gauss = float(state["python_gauss"]) if "python_gauss" in state else float("nan")
    random.setstate((ints[0], tuple(ints[1:-1]), None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config: Any,
    component: str,
    train_state: dict[str, Any],
) -> None:
    """Write weights (component folder) + `train_state.pt` together, atomically."""
    with atomic_dir(path) as tmp:
        write_component(model, config, tmp, component)
        torch.save(train_state, tmp / "train_state.pt")


def fsync_dir(folder: Path) -> None:
    """Flush every file under `folder` to disk."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def load_train_state(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "train_state.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no training state to resume from at {p}")
    return torch.load(p, map_location="cpu", weights_only=True)
