#!/usr/bin/env bash
# On the GPU machine, in one device call that carries .device (scripts/device_kit.sh builds it; timeout_s 590):
# train the shipped models side by side on cuda:0 with scripts/train_shipped.sh, evaluate them there
# (ShapesEval on the evaluation set; the text tables stand in for the missing text encoder) and pack each
# checkpoint directory into $OUT/NAME.tar, its log beside it (a call returns at most 8 files). Untar here:
#   tar -xf NAME.tar -C checkpoints
# Without STEPS, it first trains each model 100 steps side by side, then picks the steps (a multiple of 100) that
# fill BUDGET_S seconds (default 330) at the slowest model's rate, so that training, evaluation and the return fit
# one call; the command each checkpoint's config.json records rebuilds it on any machine. BATCH, LR and WARMUP
# as in train_shipped.sh (defaults here: 128, 6e-4 and 400: a GPU step of these small models costs about the
# same at batch 32 and 128, so 4x the images; the learning rate grows with the square root of the batch).
#   bash scripts/device_train.sh [ec|tc|dense ...]     (default: all three)
# PY (default python3) and DEVICE (default cuda:0) let it run elsewhere; EVAL=0 skips the evaluation.
set -euo pipefail
py=${PY:-python3}
"$py" -c "import zarr" 2>/dev/null ||
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda:0} ECVIZ="$py -m ecviz"
export TEXT_TABLE=.device/shapes_minilm32.safetensors ECVIZ_TEXT_TABLE=.device/shapes_minilm32.safetensors
export BATCH=${BATCH:-128} LR=${LR:-6e-4} WARMUP=${WARMUP:-400} ECVIZ_CACHE=/tmp/ecviz-cache
out=${OUT:-/tmp/device_train}
mkdir -p "$out"
nvidia-smi -L || true
declare -A NAME=([ec]=ec-dit-shapes [tc]=tc-shapes [dense]=dense-shapes)
read -r -a kinds <<< "${*:-ec tc dense}"
if [ -z "${STEPS:-}" ]; then
  for k in "${kinds[@]}"; do
    RUNS=/tmp/calibrate CKPTS=/tmp/calibrate/ckpts STEPS=100 EVAL=0 bash scripts/train_shipped.sh "$k" \
      > "$out/calibrate-$k.log" 2>&1 &
  done
  wait
  STEPS=$("$py" - "${BUDGET_S:-330}" "${kinds[@]}" <<'PY'
import json, sys
names = {"ec": "ec-dit-shapes", "tc": "tc-shapes", "dense": "dense-shapes"}
budget, kinds = float(sys.argv[1]), sys.argv[2:]
rates = []
for k in kinds:
    rows = [json.loads(line) for line in open(f"/tmp/calibrate/{names[k]}/metrics.jsonl")]
    rates.append(sorted(r["steps_per_s"] for r in rows[2:])[len(rows[2:]) // 2])  # median, warm-up rows apart
print(max(100, int(min(rates) * budget) // 100 * 100))
PY
)
  echo "calibrated: $STEPS steps of batch $BATCH fill ${BUDGET_S:-330} s"
fi
export STEPS
for k in "${kinds[@]}"; do
  bash scripts/train_shipped.sh "$k" > "$out/$k.log" 2>&1 &
done
wait
for k in "${kinds[@]}"; do
  tar -cf "$out/${NAME[$k]}.tar" -C "${CKPTS:-checkpoints}" "${NAME[$k]}"
done
