#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (each stage time-boxed, a failing stage does not
# stop the next):
#   1. the kernel tests, the `gpu`-marked full sizes included (compiled, not interpreted);
#   2. tools/bench_attention.py with its launch-settings sweep -> attention_<gpu>.json;
#   3. tools/bench_train.py at shape S on the GPU, Triton attention and PyTorch attention;
#   4. tools/bench_sampling.py on the GPU;
#   5. tools/bench_masked.py on the GPU, batch 1 and 16: masked against autoregressive sampling
#      at 8x8, 16x16 and 32x32 grids -> masked_b1_<gpu>.json, masked_b16_<gpu>.json.
# Output goes to $OUT (default tools/results/<gpu>); logs beside the JSON.
#   bash tools/gpu_check.sh                      # every stage (up to 14 min of time boxes)
#   bash tools/gpu_check.sh tests attention      # some: tests attention attention_quick (no
#                                                #   sweep) train_triton train_torch sampling masked
# Within a 10-minute call: `tests masked sampling` (at most 380 s), then `attention train_triton
# train_torch` (at most 420 s).
# Uses the python3 on PATH (PYTHON overrides) and installs dalle-ar into it without dependencies
# if it is missing: the kernels need only torch and triton; the tests need pytest and hypothesis,
# and the sampling tests the VQ's packages: wheels in .whl/ (a machine without an index) are
# installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
name_gpu='import re, torch; m = re.search(r"\b([A-Z]+[0-9]+)\b", torch.cuda.get_device_name())
print(m.group(1).lower() if m else "gpu")'
gpu=$($PY -c "$name_gpu" 2>/dev/null) || {
  echo "gpu_check: needs a CUDA GPU" >&2
  exit 2
}
out=${OUT:-tools/results/$gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import dalle_ar.kernels" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
{
  nvidia-smi -L
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/env.txt"

failed=()
stage() { # name seconds command...: stdout and stderr to $out/name.log
  local name=$1 secs=$2
  shift 2
  echo "== $name (at most ${secs}s)"
  local t0=$SECONDS rc=0
  timeout "$secs" "$@" >"$out/$name.log" 2>&1 || rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$out/$name.log"
  [[ $rc -eq 0 ]] || failed+=("$name")
}

xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
run_stage() {
  case $1 in
    tests) stage tests 150 $PY -m pytest -q -rs -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} \
      tests/kernels/test_kernels.py tests/kernels/test_layouts.py tests/kernels/test_kernel_backend.py \
      tests/kernels/test_kernel_compile.py tests/sampling/test_sampling.py tests/sampling/test_masked.py ;;
    attention) stage attention 330 $PY tools/bench_attention.py --sweep \
      --out "$out/attention_$gpu.json" ;;
    attention_quick) stage attention 200 $PY tools/bench_attention.py \
      --out "$out/attention_$gpu.json" ;;
    train_triton | train_torch) # the JSON on stdout, the log on stderr
      stage "$1" 45 sh -c "$PY tools/bench_train.py --steps 20 --compare-bf16 run.device=cuda \
        model.attn_impl=${1#train_} data.batch_size=64 >'$out/${1}_$gpu.json'" ;;
    sampling) stage sampling 50 $PY tools/bench_sampling.py --device cuda \
      --out "$out/sampling_$gpu.json" ;;
    masked) stage masked 180 sh -c "$PY tools/bench_masked.py --device cuda --batch 1 --repeats 3 \
      --out '$out/masked_b1_$gpu.json' && $PY tools/bench_masked.py --device cuda --batch 16 \
      --repeats 3 --out '$out/masked_b16_$gpu.json'" ;;
    *)
      echo "gpu_check: unknown stage $1" >&2
      failed+=("$1")
      ;;
  esac
}
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(tests attention train_triton train_torch sampling masked)
for s in "${stages[@]}"; do run_stage "$s"; done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check: failed: ${failed[*]}" >&2
  exit 1
fi
