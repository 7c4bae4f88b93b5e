#!/usr/bin/env bash
# Rebuild the shipped checkpoints: EC-DiT and its two baselines on Shapes at the paper's 16x16 token grid, same
# data, noise draws, steps, batch, schedule and seed. Run inside the project's .venv (./run.sh sets it up).
# About 1.7-1.9 hours per model on a 2-core CPU (BENCHMARKS.md); a killed run continues where it stopped when this script is run
# again (it passes --resume when a checkpoint exists).
#   bash scripts/train_shipped.sh [ec|tc|dense ...]     (default: all three)
# Environment: DEVICE (default cpu; cuda:0 on a GPU), TEXT_TABLE (an `ecviz train --text-table`, where the text
# encoder is missing), EVAL=0 (train and export only), ECVIZ (the command, default ecviz), STEPS (default 3400),
# BATCH, LR and WARMUP (default 32, 3e-4 and 200: the recipe of the shipped models), RUNS (the runs' directory,
# default runs) and CKPTS (where the checkpoints go, default checkpoints).
set -euo pipefail
declare -A PRESET=([ec]=EC-DiT-shapes-8E [tc]=TC-shapes-8E [dense]=DENSE-shapes-matched)
declare -A NAME=([ec]=ec-dit-shapes [tc]=tc-shapes [dense]=dense-shapes)
ecviz=${ECVIZ:-ecviz}
extra=()
[ -n "${TEXT_TABLE:-}" ] && extra+=(--text-table "$TEXT_TABLE")
for kind in "${@:-ec tc dense}"; do
  for k in $kind; do
    run=${RUNS:-runs}/${NAME[$k]}
    resume=()
    [ -d "$run/checkpoint" ] && resume=(--resume)
    $ecviz train --preset "${PRESET[$k]}" --data shapes --steps "${STEPS:-3400}" --batch-size "${BATCH:-32}" \
      --lr "${LR:-3e-4}" --warmup "${WARMUP:-200}" --lr-decay cosine --seed 0 --probe-every 500 --ckpt-every 100 \
      --log-every 10 --data-cache --device "${DEVICE:-cpu}" --out "$run" "${extra[@]}" "${resume[@]}"
    out=${CKPTS:-checkpoints}/${NAME[$k]}
    mkdir -p "$out"
    $ecviz export --ckpt "$run" --out "$out" --overwrite   # float16 weights: what ships, and what is scored
    cp "$run/metrics.jsonl" "$run/loss.png" "$out/"
    if [ -d "$run/routing.zarr" ]; then rm -rf "$out/routing.zarr"; cp -r "$run/routing.zarr" "$out/"; fi
    if [ "${EVAL:-1}" != 0 ]; then
      # ShapesEval on the evaluation set: 48 prompts per category x 4 images = 192 images per category
      $ecviz eval --ckpt "$out" --prompts shapes-eval --images-per-prompt 4 --json "$out/shapes_eval.json" \
        --grid "$out/samples.png" --device "${DEVICE:-cpu}" --dtype float32 --quiet  # scored as on the CPU
    fi
  done
done
