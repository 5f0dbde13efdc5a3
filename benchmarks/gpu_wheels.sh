#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/run_gpu.sh installs on a GPU machine that cannot
# reach PyPI (its image has torch, transformers, pytest but not tensorly-torch): into .whl/
# (gitignored; carry it along with the command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PYVER=${PYVER:-3.12}  # the GPU image's Python
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "tensorly-torch==0.5.0" "tensorly==0.10.0"
ls -l .whl
