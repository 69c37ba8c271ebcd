"""The pipeline folder: `pipeline.json` plus one subfolder per component.

    pipe/
      pipeline.json  {"format": "dalle_ar.pipeline", "version": 2, "class": "ARPipeline",
                      "components": {"text_tokenizer": ["dalle_ar", "TextTokenizer"],
                                     "vq": ["dalle_ar", "VQTokenizer"],
                                     "transformer": ["dalle_ar", "Transformer"],
                                     "clip": null},
                      "defaults": {"ar": {"guidance_scale": 1.5, ...}, "rerank": {...}}}
      text_tokenizer/  vq/  transformer/          one folder per component, named as its key

As diffusers' `model_index.json`: each component is a (library, class) pair, loaded with that
class's `from_pretrained(subfolder)`; an optional component the pipeline class declares but the
folder lacks is null. Libraries are limited to `LIBRARIES` (a folder never names code to import
beyond them). Version 1 folders (`{"components": {"vq": "vq", ...}, "defaults": {flat}}`, the AR
pipeline only) are read as the version 2 they stand for.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dalle_ar.checkpoint import atomic_dir, inside
from dalle_ar.models.clip import CLIP
from dalle_ar.models.prior import DiffusionPrior
from dalle_ar.models.transformer import Transformer
from dalle_ar.models.upsampler import Upsampler
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.text import TextTokenizer

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
FORMAT = "dalle_ar.pipeline"
VERSION = 2
LIBRARIES = ("dalle_ar", "transformers", "diffusers")  # where a component class may come from
# This project's component classes: name -> class (each has from_pretrained and save_pretrained).
OWN_CLASSES: dict[str, type] = {
    c.__name__: c
    for c in (TextTokenizer, VQTokenizer, Transformer, CLIP, DiffusionPrior, Upsampler)
}
# The autoregressive pipeline's components and their classes: all that a version-1 folder held.
AR_COMPONENTS = {
    "text_tokenizer": "TextTokenizer", "vq": "VQTokenizer", "transformer": "Transformer"
}  # fmt: skip
V1_CLASS = "ARPipeline"


@dataclasses.dataclass
class FolderSpec:
    """What a pipeline.json says, in version 2 terms."""

    folder: Path
    pipeline_class: str  # e.g. "ARPipeline"
    components: dict[str, tuple[str, str]]  # present components: name -> (library, class)
    paths: dict[str, Path]  # name -> its folder
    defaults: dict[str, Any]  # as written (version 1: the flat sampling defaults)
    version: int


def read_folder(folder: str | Path) -> FolderSpec:
    """Read and check `folder/pipeline.json`: format, version, (library, class) pairs, and every
    named component's folder present with its config.json. FileNotFoundError / ValueError name
    the folder and the component; ValueError for a component folder named outside `folder`
    (an absolute path or "..": `checkpoint.inside`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder {folder} does not exist")
    f = folder / PIPELINE_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{folder} is not a pipeline folder: {PIPELINE_FILE} is missing "
            "(write one with dalle_ar.pipelines.assemble or Pipeline.save_pretrained)"
        )
    meta = json.loads(f.read_text())
    comps = meta.get("components")
    if meta.get("format") != FORMAT or not isinstance(comps, dict):
        raise ValueError(f"{f}: expected format {FORMAT!r} with a 'components' mapping")
    version = meta.get("version", 1)
    if version == 1:
        spec = _from_v1(folder, f, comps, meta.get("defaults") or {})
    elif version == VERSION:
        spec = _from_v2(folder, f, meta, comps)
    else:
        raise ValueError(f"{f}: version {version!r} is not one this code reads (1 or {VERSION})")
    for name, path in spec.paths.items():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"pipeline folder {folder}: the {name} component ({path.name}/) is missing or "
                "has no config.json"
            )
    return spec


def _from_v1(folder: Path, f: Path, comps: dict, defaults: dict) -> FolderSpec:
    pairs, paths = {}, {}
    for name, sub in comps.items():
        if name in ("clip", "prior"):  # version 1 could name them but never loaded them
            log.warning("%s: the %s component of a version-1 folder is not loaded", f, name)
            continue
        if name not in AR_COMPONENTS:
            raise ValueError(f"{f}: unknown component {name!r}; known: {list(AR_COMPONENTS)}")
        pairs[name] = ("dalle_ar", AR_COMPONENTS[name])
        paths[name] = inside(folder, sub, f"{f}: the {name} component's folder")
    return FolderSpec(folder, V1_CLASS, pairs, paths, defaults, 1)


def _from_v2(folder: Path, f: Path, meta: dict, comps: dict) -> FolderSpec:
    pairs, paths = {}, {}
    for name, pair in comps.items():
        if pair is None:
            continue  # an optional component this folder does not hold
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok or pair[0] not in LIBRARIES:
            raise ValueError(
                f"{f}: component {name!r} must be a [library, class] pair with the library one "
                f"of {LIBRARIES}, got {pair!r}"
            )
        if pair[0] == "dalle_ar" and pair[1] not in OWN_CLASSES:
            raise ValueError(f"{f}: component {name!r} names an unknown class dalle_ar.{pair[1]}")
        pairs[name] = (pair[0], pair[1])
        paths[name] = inside(folder, name, f"{f}: component name (its folder's name)")
        if len(Path(name).parts) != 1:
            raise ValueError(f"{f}: component name {name!r} must be a folder name, not a path")
    cls = meta.get("class")
    if not isinstance(cls, str):
        raise ValueError(f"{f}: expected a 'class' naming the pipeline class, got {cls!r}")
    return FolderSpec(folder, cls, pairs, paths, meta.get("defaults") or {}, VERSION)


def load_component(library: str, name: str, path: Path, device: str | torch.device) -> Any:
    """`library.name.from_pretrained(path)`, on `device`. Our own classes load strictly (every
    tensor named on a mismatch, no pickle)."""
    if library == "dalle_ar":
        cls = OWN_CLASSES[name]
        if cls in (VQTokenizer, CLIP):
            return cls.from_pretrained(path, device=device)
        obj = cls.from_pretrained(path)
    else:
        obj = getattr(importlib.import_module(library), name).from_pretrained(path)
    return obj.to(device) if isinstance(obj, torch.nn.Module) else obj


def library_of(obj: Any) -> tuple[str, str]:
    """The (library, class) pair that names `obj` in pipeline.json; ValueError for a class
    no folder could load again."""
    lib = type(obj).__module__.split(".")[0]
    name = type(obj).__name__
    if lib not in LIBRARIES or (lib == "dalle_ar" and name not in OWN_CLASSES):
        raise ValueError(f"cannot save a {lib}.{name} component: not a loadable class")
    return lib, name


def write_json(
    folder: Path,
    pipeline_class: str,
    components: dict[str, tuple[str, str]],
    optional: tuple[str, ...],
    defaults: dict[str, Any],
) -> None:
    """Write pipeline.json (version 2) into `folder`: the held components' (library, class)
    pairs, and null for each `optional` one it does not hold."""
    pairs: dict[str, list[str] | None] = {k: list(v) for k, v in components.items()}
    pairs.update({k: None for k in optional if k not in components})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "class": pipeline_class,
        "components": pairs,
        "defaults": defaults,
    }
    (folder / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))


def write_folder(
    folder: str | Path,
    pipeline_class: str,
    sources: dict[str, tuple[tuple[str, str], Path]],
    optional: tuple[str, ...],
    defaults: dict[str, Any],
    link: bool = False,
) -> Path:
    """A pipeline folder from component folders, atomically: `sources` maps each component name
    to its (library, class) pair and trained folder, copied (or, with `link`, symlinked by
    absolute path) in; `optional` names the declared components left null when absent."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for name, (_, src) in sources.items():
            if link:
                os.symlink(Path(src).resolve(), tmp / name, target_is_directory=True)
            else:
                shutil.copytree(src, tmp / name)
        pairs = {k: v[0] for k, v in sources.items()}
        write_json(tmp, pipeline_class, pairs, optional, defaults)
    return folder
