#!/usr/bin/env bash
# The main job on the embedded default (called by ./run.sh demo inside the project's .venv):
# trace the shipped EC-DiT checkpoint on the bundled Shapes prompts into traces/demo.zarr.
set -euo pipefail
ckpt=checkpoints/ec-dit-small-shapes
out=${ECVIZ_DEMO_OUT:-traces/demo.zarr}  # the tests point it elsewhere
ecviz trace --ckpt "$ckpt" --prompts ecviz/assets/prompts/shapes.jsonl --out "$out" \
  --images-per-prompt 4 --record dispatch,cross_attn,x0 "$@"
python - "$out" <<'PY'
import sys

import ecviz
from ecviz.analysis import trace_object_vs_background

ds = ecviz.open_trace(sys.argv[1])
split = trace_object_vs_background(ds).isel(step=-1)  # (region, layer), conditional branch, last step
r = ds.attrs["routing"]
print(f"experts per token at the last denoising step ({r['experts']} experts, capacity factor "
      f"{r['capacity_factor']:g}, groups of {r['group_size']} tokens), on the generated images:")
for layer in split.layer.values:
    obj, bg = split.sel(layer=layer, region="object").item(), split.sel(layer=layer, region="background").item()
    print(f"  block {layer}: objects {obj:.2f}, background {bg:.2f}")
PY
echo "explore it:  python -c \"import ecviz; print(ecviz.open_trace('$out'))\"   (format: docs/trace-format.md)"
echo "see it:      streamlit run app/main.py -- --trace $out"
