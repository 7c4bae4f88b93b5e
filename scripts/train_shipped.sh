#!/usr/bin/env bash
# Rebuild the shipped checkpoints: EC-DiT and its two baselines on Shapes at the paper's 16x16 token grid, same
# data, noise draws, steps, batch, schedule and seed. Run inside the project's .venv (./run.sh sets it up).
# The shipped ones were trained on one H200 (DEVICE=cuda:0), the three side by side in about 5 minutes each
# (scripts/device_train.sh); on a 2-core CPU the same recipe takes 10-12 hours per model (BENCHMARKS.md). A
# killed run continues where it stopped when this script is run again (it passes --resume when a checkpoint
# exists).
#   bash scripts/train_shipped.sh [ec|tc|dense ...]     (default: all three)
#   bash scripts/train_shipped.sh --names                (prints each kind and its directory name, and stops)
# Environment: DEVICE (default cpu; cuda:0 on a GPU), TEXT_TABLE (an `ecviz train --text-table`, where the text
# encoder is missing), EVAL=0 (train and export only), ECVIZ (the command, default ecviz), STEPS, BATCH, LR and
# WARMUP (default 4700, 128, 6e-4 and 400: the recipe of the shipped models), MODEL (`ecviz train --model`
# overrides, e.g. text_refiner=2; default none), SUFFIX (appended to each directory name, so a variant trains
# beside the others: e.g. -refiner), INIT (a directory of checkpoints of the same recipe, e.g. checkpoints: each
# run starts from its kind's weights there, NAME plus INIT_SUFFIX, `ecviz train --init`, to train them on;
# default: fresh weights), SEED (default 0: noise, timesteps, text dropout), DATA_SEED (`ecviz train
# --data-seed`, the Shapes image stream; default SEED when INIT is given, so that a run training checkpoints on
# sees images they have not (SEED alone replays the same images), else 0: the shipped recipe's), RUNS
# (the runs' directory, default runs), CKPTS (where the checkpoints go, default checkpoints) and DATA (`ecviz
# train --data`, default shapes: every caption category alike; e.g. a weighted mix to train checkpoints on with,
# shapes:single_object,colors,counting*2,two_object*2,position*3,color_attr*3).
set -euo pipefail
declare -A PRESET=([ec]=EC-DiT-shapes-8E [tc]=TC-shapes-8E [dense]=DENSE-shapes-matched)
declare -A BASE=([ec]=ec-dit-shapes [tc]=tc-shapes [dense]=dense-shapes)
declare -A NAME=([ec]=ec-dit-shapes${SUFFIX:-} [tc]=tc-shapes${SUFFIX:-} [dense]=dense-shapes${SUFFIX:-})
if [ "${1:-}" = --names ]; then
  for k in ec tc dense; do echo "$k ${NAME[$k]}"; done
  exit 0
fi
ecviz=${ECVIZ:-ecviz}
extra=()
[ -n "${TEXT_TABLE:-}" ] && extra+=(--text-table "$TEXT_TABLE")
[ -n "${MODEL:-}" ] && extra+=(--model "$MODEL")
data_seed=${DATA_SEED:-$([ -n "${INIT:-}" ] && echo "${SEED:-0}" || echo 0)}
[ "$data_seed" != 0 ] && extra+=(--data-seed "$data_seed")
for kind in "${@:-ec tc dense}"; do
  for k in $kind; do
    run=${RUNS:-runs}/${NAME[$k]}
    resume=()
    [ -d "$run/checkpoint" ] && resume=(--resume)
    init=()
    [ -n "${INIT:-}" ] && init=(--init "$INIT/${BASE[$k]}${INIT_SUFFIX:-}")
    $ecviz train --preset "${PRESET[$k]}" --data "${DATA:-shapes}" --steps "${STEPS:-4700}" --batch-size "${BATCH:-128}" \
      --lr "${LR:-6e-4}" --warmup "${WARMUP:-400}" --lr-decay cosine --seed "${SEED:-0}" --probe-every 500 \
      --ckpt-every 100 --log-every 10 --data-cache --device "${DEVICE:-cpu}" --out "$run" "${extra[@]}" "${init[@]}" \
      "${resume[@]}"
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
