#!/usr/bin/env bash
# The GPU check in one command (docs/benchmarks.md): the CUDA tests, then the benchmark suite on
# the GPU, fp32 and bf16 at 4,096 / 16,384 / 65,536 tokens, `--accumulate 4`, and MPOLinear vs
# nn.Linear and tensorly-torch. Writes results/benchmarks/*_cuda*.json and tests_cuda.log; with
# OUT set (the device tool's output folder) it also packs them into $OUT/gpu_results.tar.gz after
# every step (a run stopped by a time limit still returns what it measured).
#
# Packages the GPU image may lack (tensorly-torch, tensorly) are installed from wheels in .whl/
# when that folder exists (benchmarks/gpu_wheels.sh downloads them). Then, from the repo root:
#   bash benchmarks/run_gpu.sh
#   python results/make_tables.py benchmarks     # the docs/benchmarks.md tables, GPU rows included
# With this workplace's device tool: bash benchmarks/gpu_wheels.sh here, then run
#   `bash benchmarks/run_gpu.sh` there with carry [".whl"] and unpack $OUT's tarball into $RES.
# A dry run on a machine without a GPU (checks this script; writes nothing under results/):
#   DEVICE=cpu TOKENS=64 REPEATS=1 RES=/tmp/dry bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-"4096 16384 65536"}
REPEATS=${REPEATS:-20}
RES=${RES:-results/benchmarks}
mkdir -p "$RES"
pack() {  # after every step, so a run stopped by a time limit still brings back what it measured
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tar.gz" -C "$RES" $(cd "$RES" && ls ./*"$DEVICE"*.json "tests_$DEVICE.log" 2>/dev/null)
  fi
}
if compgen -G ".whl/*.whl" > /dev/null; then  # optional: only the tensorly-torch comparison needs them
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tnmoe-site .whl/*.whl; then
    export PYTHONPATH=/tmp/tnmoe-site:${PYTHONPATH:-}
  else
    echo "WARNING: installing the carried wheels failed; the tensorly-torch comparison will be skipped"
  fi
fi
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE  # the tests compare true float32
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1  # tnmoe from this checkout
if [ "$DEVICE" = cuda ]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import triton" || echo "WARNING: no triton: the torch.compile test will fail for that reason"
fi

failed=0
TNMOE_TEST_DEVICE=$DEVICE $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$RES/tests_$DEVICE.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
pack

bench() {  # bench NAME ARGS...: one benchmark run; a failure is reported and the rest still run
  local name=$1; shift
  echo "== $name: $*"
  $PY benchmarks/bench_moe_layer.py --device "$DEVICE" --repeats "$REPEATS" --warmup 5 "$@" \
    --json "$RES/moe_layer_${DEVICE}_$name.json" \
    || { echo "FAILED: $name"; failed=1; }
  pack
}
for dtype in float32 bfloat16; do
  for tokens in $TOKENS; do
    bench "${dtype}_${tokens}" --tokens "$tokens" --dtype "$dtype"
  done
done
first=${TOKENS%% *}
bench "bfloat16_${first}_acc4" --tokens "$first" --accumulate 4 --dtype bfloat16
$PY benchmarks/bench_mpo_linear.py --device "$DEVICE" --tokens "$first" --repeats "$REPEATS" \
  --json "$RES/mpo_linear_$DEVICE.json" \
  || { echo "FAILED: mpo_linear"; failed=1; }
pack
[ -n "${OUT:-}" ] && echo "packed into $OUT/gpu_results.tar.gz"
exit $failed
