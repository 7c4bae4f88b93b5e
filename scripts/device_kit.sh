#!/usr/bin/env bash
# Build .device/ (git-ignored), what a session carries to the GPU machine, which cannot fetch anything: the
# wheels of the packages ecviz needs that its image lacks (zarr and its codecs, dask: the versions installed
# here, for its Python 3.12), and the embeddings of every Shapes caption (scripts/text_table.py), since the
# MiniLM package is missing there and its weights do not fit the 64 MiB a call carries. About 25 MB.
#   bash scripts/device_kit.sh          (inside .venv; then name ".device" in the device call's carry)
# On the device, first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD ECVIZ_TEXT_TABLE=.device/shapes_minilm32.safetensors:.device/shapes_minilm16.safetensors
# (the tables stand in for the text encoder in every command: ecviz.text.load_text_encoder)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
mkdir -p .device/whl
pins=$("$py" - <<'PY'
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in
               ("zarr", "numcodecs", "donfig", "google-crc32c", "dask", "partd", "locket")))
PY
)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .device/whl $pins
"$py" scripts/text_table.py --out .device/shapes_minilm32.safetensors   # the Shapes presets' (text_len 32)
# the tiny presets' (text_len 16) for the tests that run on the GPU (scripts/device_check.sh): the bundled Shapes
# prompts and what a short run and its probe draw
"$py" scripts/text_table.py --out .device/shapes_minilm16.safetensors --max-len 16 --items 256 --prompts shapes
du -sh .device
