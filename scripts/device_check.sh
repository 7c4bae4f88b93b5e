#!/usr/bin/env bash
# The GPU checks of issue 11 in one device call: the kernel tests compiled for the GPU, the tests that need CUDA
# (every command with --device cuda, devices and dtypes), then benchmarks/gpu.py. The GPU machine lacks zarr and
# the text encoder: run `bash scripts/device_kit.sh` here first and name ".device" in the call's carry, with
# timeout_s 540. Logs and gpu.json come back in $OUT; copy gpu.json to benchmarks/results/ and its table to
# BENCHMARKS.md.
#   bash scripts/device_check.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export ECVIZ_TEXT_TABLE=.device/shapes_minilm32.safetensors:.device/shapes_minilm16.safetensors
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra --durations=10" tests/test_kernels.py \
  tests/test_dist.py -k "kernel or fused or cuda or device or dtype or bf16" 2>&1 | tee "$out/tests.log"
timeout 300 python3 benchmarks/gpu.py --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
