#!/usr/bin/env bash
# Set up whatever is missing (a .venv with PyTorch and dalle-ar), then run a job:
#   bash tools/dev.sh main     # the main job: the whole pipeline on the built-in shapes data
#   bash tools/dev.sh test     # ruff + the test suite
#   bash tools/dev.sh setup    # only the setup
# PyTorch: a CPU build on a machine without an NVIDIA GPU (never the multi-GB CUDA wheels), the
# default CUDA build where `nvidia-smi` finds a GPU. Set DALLE_AR_PYTHON to pick the interpreter.
# The demo extra (gradio) is for `dalle-ar serve` and its tests; the main job sets up without it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${DALLE_AR_TORCH:-2.13.0}"
PY="${DALLE_AR_PYTHON:-python3}"
VENV=.venv
job="${1:-main}"
shift || true
case "$job" in
  main | test | setup) ;;
  *) echo "usage: bash tools/dev.sh main|test|setup" >&2; exit 2 ;;
esac

if [[ ! -x $VENV/bin/python ]]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] installing torch==$TORCH_VERSION (CUDA build)"
    pip install -q "torch==$TORCH_VERSION"
  else
    echo "[setup] installing torch==$TORCH_VERSION (CPU build)"
    pip install -q "torch==$TORCH_VERSION" \
      --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 15
  fi
fi

# dalle-ar with its dev and demo extras; the main job needs neither (the test tools, the web
# page), so a venv set up by it holds the package alone until another job asks for the rest.
stamp=$VENV/.dalle_ar-installed
base=$VENV/.dalle_ar-installed-base
fresh() { [[ -f $1 && ! pyproject.toml -nt $1 ]]; }
if [[ $job == main ]]; then
  if ! fresh "$stamp" && ! fresh "$base"; then
    echo "[setup] installing dalle-ar (editable)"
    pip install -q -e .
    touch "$base"
  fi
elif ! fresh "$stamp"; then
  echo "[setup] installing dalle-ar (editable) with its dev and demo extras"
  pip install -q -e '.[dev,demo]'
  touch "$stamp"
fi

case "$job" in
  setup) echo "[setup] done: $(python -c 'import torch; print("torch", torch.__version__)')" ;;
  main) exec dalle-ar pipeline "$@" ;;
  test)
    ruff check .
    exec python -m pytest -q "$@"
    ;;
esac
