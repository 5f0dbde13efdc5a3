#!/usr/bin/env bash
# The CPU benchmark runs whose JSON is committed under results/benchmarks/ (docs/benchmarks.md).
# Run on a quiet machine: the numbers are ratios of interleaved medians within each run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=results/benchmarks
mkdir -p "$OUT"
$PY benchmarks/bench_mpo_linear.py --repeats 9 --json "$OUT/mpo_linear_cpu.json"
$PY benchmarks/bench_rebuild.py --repeats 9 --json "$OUT/rebuild_cpu.json"
$PY benchmarks/bench_moe_layer.py --tokens 4096 --repeats 5 --json "$OUT/moe_layer_cpu_4096.json"
$PY benchmarks/bench_moe_layer.py --tokens 4096 --repeats 5 --allocator default \
  --json "$OUT/moe_layer_cpu_4096_default_allocator.json"
$PY benchmarks/bench_moe_layer.py --tokens 4096 --accumulate 4 --repeats 3 --json "$OUT/moe_layer_cpu_4096_acc4.json"
$PY benchmarks/bench_moe_layer.py --tokens 16384 --repeats 3 --json "$OUT/moe_layer_cpu_16384.json"
$PY benchmarks/bench_decode.py --json "$OUT/decode_cpu.json"
