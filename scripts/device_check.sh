#!/usr/bin/env bash
# The GPU checks of issue 11 for one device call: benchmarks/gpu.py (40 s on an H200 with layers of 4096 tokens;
# they are now 32,768 by default), benchmarks/gpu_anatomy.py
# (the EC layer's stages alone and the fused kernel's tile sweep), the kernel tests compiled for the GPU with the
# tests that need CUDA (every command with --device cuda, devices and dtypes: 92 s), and
# benchmarks/gpu_profile.py (the layers' kernel tables at the training group). Run the timed stages with
# nothing else on the GPU. The GPU machine lacks zarr and the text encoder: run `bash scripts/device_kit.sh`
# here first and name ".device" in the call's carry (timeout_s 540). Logs, gpu.json, gpu_anatomy.json and
# profile.txt come back in $OUT (7 files); copy the JSON to benchmarks/results/ and the tables to BENCHMARKS.md.
#   bash scripts/device_check.sh [bench] [anatomy] [tests] [profile]     (default: all four, in that order)
# The stages' timeouts add up to 680 s with all four, more than one call may run (600 s): run `bench anatomy
# profile` (480 s at most) in one call and `tests` in another.
set -uo pipefail
if [[ " ${*:-tests} " == *" tests "* ]] && [ ! -d /tmp/site/zarr ]; then  # only the tests need zarr and dask
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export ECVIZ_TEXT_TABLE=$PWD/.device/shapes_minilm32.safetensors:$PWD/.device/shapes_minilm16.safetensors
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
for stage in ${*:-bench anatomy tests profile}; do
  case $stage in
    bench)
      nvidia-smi -L
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      timeout 240 python3 benchmarks/gpu.py --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log" ;;
    anatomy)
      timeout 150 python3 benchmarks/gpu_anatomy.py --out "$out/gpu_anatomy.json" 2>&1 | tee "$out/anatomy.log" ;;
    tests)
      timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra --durations=10" tests/test_kernels.py \
        tests/test_dist.py -k "kernel or fused or cuda or device or dtype or bf16" 2>&1 | tee "$out/tests.log" ;;
    profile)
      timeout 90 python3 benchmarks/gpu_profile.py --out "$out/profile.txt" > /dev/null 2> "$out/profile.err" ;;
    *) echo "device_check.sh: unknown stage $stage (bench, anatomy, tests, profile)" >&2; exit 2 ;;
  esac
done
