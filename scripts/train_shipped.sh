#!/usr/bin/env bash
# Rebuild the shipped checkpoints: EC-DiT and its two baselines on Shapes, same data, steps and batch.
# Run inside the project's .venv (./run.sh sets it up). About 40 min per model on a 2-core CPU; a killed run
# continues where it stopped when this script is run again (it passes --resume when a checkpoint exists).
#   bash scripts/train_shipped.sh [ec|tc|dense ...]     (default: all three)
set -euo pipefail
STEPS=${STEPS:-6000}
declare -A PRESET=([ec]=EC-DiT-small-8E [tc]=TC-small-8E [dense]=DENSE-small-matched)
declare -A NAME=([ec]=ec-dit-small-shapes [tc]=tc-small-shapes [dense]=dense-small-shapes)
for kind in "${@:-ec tc dense}"; do
  for k in $kind; do
    run=runs/${NAME[$k]}
    resume=()
    [ -d "$run/checkpoint" ] && resume=(--resume)
    ecviz train --preset "${PRESET[$k]}" --data shapes --steps "$STEPS" --batch-size 32 --lr 1e-4 --warmup 200 \
      --seed 0 --probe-every 250 --ckpt-every 500 --log-every 10 --out "$run" "${resume[@]}"
    out=checkpoints/${NAME[$k]}
    mkdir -p "$out"
    ecviz export --ckpt "$run" --out "$out" --overwrite   # float16 weights: what ships, and what is scored
    cp "$run/metrics.jsonl" "$run/loss.png" "$out/"
    if [ -d "$run/routing.zarr" ]; then rm -rf "$out/routing.zarr"; cp -r "$run/routing.zarr" "$out/"; fi
    ecviz eval --ckpt "$out" --images-per-prompt 4 --json "$out/shapes_eval.json" --grid "$out/samples.png" --quiet
  done
done
