#!/usr/bin/env bash
# The main job on the embedded default (called by ./run.sh demo inside the project's .venv):
# trace the shipped EC-DiT checkpoint on the bundled Shapes prompts into traces/.
set -euo pipefail
ckpt=checkpoints/ec-dit-small-shapes
if [ ! -f "$ckpt/model.safetensors" ]; then
  ckpt=runs/demo-init
  echo "no shipped checkpoint yet: tracing a freshly initialised EC-DiT-small-8E instead"
  [ -f "$ckpt/model.safetensors" ] || ecviz init --preset EC-DiT-small-8E --out "$ckpt"
fi
out=traces/demo.zarr
ecviz trace --ckpt "$ckpt" --prompts ecviz/assets/prompts/shapes.jsonl --out "$out" \
  --images-per-prompt 4 --record dispatch,cross_attn,x0 "$@"
echo "next: explore it with  python -c \"import ecviz; print(ecviz.open_trace('$out'))\""
