#!/usr/bin/env bash
# The main job on the embedded default (called by ./run.sh demo inside the project's .venv).
set -euo pipefail
ckpt=${ECVIZ_CKPT:-runs/demo-init}
if [ ! -f "$ckpt/model.safetensors" ]; then
  ecviz init --preset EC-DiT-small-8E --out "$ckpt"
fi
ecviz sample --ckpt "$ckpt" --prompt "a red circle left of a blue square" --out runs/demo.png --steps 10 "$@"
