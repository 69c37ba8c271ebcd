"""The repository's kernels/ folder ships as dalle_ar.kernels; imported by the bare name from the
repository root it must not stand in for the `kernels` package transformers imports."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bare_name_from_the_repository_root_is_not_this_folder() -> None:
    code = "import kernels, sys; print(kernels.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # no other package of that name: ours stays
        want = ROOT / "kernels" / "__init__.py"
    else:
        want = Path(dist.locate_file("kernels/__init__.py")).resolve()
    assert Path(run.stdout.strip()).resolve() == want


def test_transformers_imports_from_the_repository_root() -> None:
    code = "from dalle_ar.models.clip import CLIP; import dalle_ar.kernels.attention"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
