#!/usr/bin/env bash
# On the GPU machine, in one device call that carries .device (scripts/device_kit.sh builds it; timeout_s 590):
# train the shipped models side by side on cuda:0 with scripts/train_shipped.sh, evaluate them there
# (ShapesEval on the evaluation set; the text tables stand in for the missing text encoder) and pack each
# checkpoint directory into $OUT/NAME.tar and the logs into $OUT/train-logs.tar (a call returns at most 8 files).
# Untar here into runs/ (ignored: what lies untracked in checkpoints/ travels with every later device call, and
# three more checkpoints would take a call past 64 MiB), score them there, and move them into checkpoints/ only
# to replace the shipped ones, after the session's last device call:
#   mkdir -p runs/device && tar -xf NAME.tar -C runs/device
# STEPS defaults to the shipped recipe's 4700 (batch 128, lr 6e-4, warm-up 400: train_shipped.sh), which took
# 268-335 s side by side on an H200. STEPS=auto first trains each model 100 steps side by side, then picks the steps
# (a multiple of 100) that fill BUDGET_S seconds (default 330) at the slowest model's rate, so that training,
# evaluation and the return fit one call; the command each checkpoint's config.json records rebuilds it on any
# machine.
#   bash scripts/device_train.sh [ec|tc|dense ...]     (default: all three)
# PY (default python3) and DEVICE (default cuda:0) let it run elsewhere; EVAL=0 skips the evaluation. MODEL and
# SUFFIX (train_shipped.sh) train a variant under its own names; INIT, INIT_SUFFIX and SEED train checkpoints on
# with new images (DATA_SEED follows SEED; checkpoints/README.md says which the next GPU session runs), e.g.:
#   MODEL=text_refiner=2 SUFFIX=-refiner EVAL=0 bash scripts/device_train.sh   (a variant under its own names)
#   INIT=checkpoints SEED=1 SUFFIX=-more EVAL=0 bash scripts/device_train.sh
# Give each call its own SUFFIX: a run directory already on a warm machine is resumed, not trained anew.
# DEADLINE_S (default 480) stops training that runs long; each run's last checkpoint (every 100 steps) is then
# exported and returned all the same, and the logs come back whatever happens.
set -euo pipefail
py=${PY:-python3}
[ -d /tmp/site/zarr ] || "$py" -c "import zarr" 2>/dev/null ||  # installed already (device_check.sh, or by hand)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda:0} ECVIZ="$py -m ecviz"
# relative: the command each config.json records then names the same file on any machine
export TEXT_TABLE=.device/shapes_minilm32.safetensors ECVIZ_TEXT_TABLE=.device/shapes_minilm32.safetensors
export ECVIZ_CACHE=/tmp/ecviz-cache RUNS=${RUNS:-runs} CKPTS=${CKPTS:-checkpoints}
out=${OUT:-/tmp/device_train}
logs=$(mktemp -d)
mkdir -p "$out"
trap 'tar -cf "$out/train-logs${SUFFIX:-}.tar" -C "$logs" . 2>/dev/null || true' EXIT  # the logs, whatever fails
nvidia-smi -L || true
read -r -a kinds <<< "${*:-ec tc dense}"
declare -A NAME
while read -r k name; do NAME[$k]=$name; done < <(bash scripts/train_shipped.sh --names)
if [ "${STEPS:-4700}" = auto ]; then
  for k in "${kinds[@]}"; do
    RUNS=/tmp/calibrate CKPTS=/tmp/calibrate/ckpts STEPS=${CAL_STEPS:-100} EVAL=0 bash scripts/train_shipped.sh "$k" \
      > "$logs/calibrate-$k.log" 2>&1 &
  done
  wait || true
  metrics=()
  for k in "${kinds[@]}"; do metrics+=("/tmp/calibrate/${NAME[$k]}/metrics.jsonl"); done
  STEPS=$("$py" - "${BUDGET_S:-330}" "${metrics[@]}" <<'PY'
import json, sys
budget, paths = float(sys.argv[1]), sys.argv[2:]
rates = []
for path in paths:
    rows = [json.loads(line) for line in open(path)]
    rows = rows[2:] or rows  # warm-up rows apart
    rates.append(sorted(r["steps_per_s"] for r in rows)[len(rows) // 2])  # the median
print(max(100, int(min(rates) * budget) // 100 * 100))
PY
)
  echo "calibrated: $STEPS steps of batch ${BATCH:-128} fill ${BUDGET_S:-330} s"
fi
export STEPS=${STEPS:-4700}
pids=()
for k in "${kinds[@]}"; do
  timeout "${DEADLINE_S:-480}" bash scripts/train_shipped.sh "$k" > "$logs/$k.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" && continue
  status=$?
  # 124 would read as the device call itself timing out: say what happened, exit 3
  [ $status = 124 ] && { echo "a run reached DEADLINE_S=${DEADLINE_S:-480}: its last checkpoint is returned"; status=3; }
done
for k in "${kinds[@]}"; do
  run=$RUNS/${NAME[$k]} ck=$CKPTS/${NAME[$k]}
  if [ ! -d "$run/checkpoint" ]; then echo "${NAME[$k]}: no checkpoint (see its log)"; continue; fi
  if [ ! "$ck/model.safetensors" -nt "$run/checkpoint/model.safetensors" ]; then  # stopped before its export
    $ECVIZ export --ckpt "$run" --out "$ck" --overwrite >> "$logs/$k.log" 2>&1 &&
      "$py" - "$ck" "$run/metrics.jsonl" <<'PY' &&
import json, sys
ck, metrics = sys.argv[1:]  # the rows up to the exported checkpoint's step, as a resumed run keeps them
step = json.load(open(f"{ck}/config.json"))["meta"]["step"]
rows = [line for line in open(metrics) if line.strip() and json.loads(line)["step"] <= step]
open(f"{ck}/metrics.jsonl", "w").writelines(rows)
PY
      cp "$run/loss.png" "$ck/" && rm -rf "$ck/routing.zarr" &&
      { [ ! -d "$run/routing.zarr" ] || cp -r "$run/routing.zarr" "$ck/"; } || status=1
  fi
  tar -cf "$out/${NAME[$k]}.tar" -C "$CKPTS" "${NAME[$k]}"
  echo "${NAME[$k]}: $(tail -n 1 "$run/metrics.jsonl" | cut -c1-100)"
  grep -h "overall" "$logs/$k.log" | sed "s/^/${NAME[$k]}: /" || true
done
exit $status
