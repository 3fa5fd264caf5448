#!/usr/bin/env bash
# Quality per CPU-minute: train quick-preset recipes two at a time, side by side on one thread each,
# for the same wall-clock budget, then score every run with evaluate.py runs (FD, heun, 35 NFE,
# 1000 samples, the same noise for every run, at 5 and 10 minutes and at the end).
#
#   bash tools/recipes.sh [MINUTES] [OUT]          # defaults: 20 minutes, runs/recipes
#
# RECIPES is "name:flags|name:flags|..." (an even number of them: they run in pairs, so each pair
# shares the machine equally). The default list is the README's table: F is today's quick preset.
# Needs 2 cores; with MINUTES=20 it takes 80 minutes of training and about 45 of scoring.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-20}
OUT=${2:-runs/recipes}
SEEDS=${SEEDS:-0}
OLD="--channels 16 --batch-size 64 --noise-sampling uniform"  # the quick preset before this table
NEW="--lr-schedule cosine --ema-ramp 0.15 --ema-decay 0.9995"
DEFAULT_RECIPES="A_old_quick:$OLD --lr-schedule constant --ema-ramp 0 --ema-decay 0.995"
DEFAULT_RECIPES+="|B_cosine_ramp:$OLD $NEW"
DEFAULT_RECIPES+="|C_lognormal:$OLD $NEW --noise-sampling lognormal"
DEFAULT_RECIPES+="|D_lognormal_ch12:$OLD $NEW --noise-sampling lognormal --channels 12"
DEFAULT_RECIPES+="|E_ch12:$OLD $NEW --channels 12"
DEFAULT_RECIPES+="|F_ch12_b32:$OLD $NEW --channels 12 --batch-size 32"
DEFAULT_RECIPES+="|G_ch12_b32_const:--channels 12 --batch-size 32 --lr-schedule constant --ema-ramp 0 --ema-decay 0.995"
DEFAULT_RECIPES+="|F2_preset:--channels 12 --batch-size 32 $NEW"
: "${RECIPES:=$DEFAULT_RECIPES}"
export PYTHONUNBUFFERED=1
IFS='|' read -ra ARMS <<< "$RECIPES"
if (( ${#ARMS[@]} % 2 )); then echo "RECIPES must hold an even number of recipes" >&2; exit 2; fi
mkdir -p "$OUT"
folders=()
for ((i = 0; i < ${#ARMS[@]}; i += 2)); do
  pids=()
  for arm in "${ARMS[i]}" "${ARMS[i + 1]}"; do
    name=${arm%%:*}
    flags=${arm#*:}
    folders+=("$OUT/$name")
    # shellcheck disable=SC2086  # the flags split into words on purpose
    OMP_NUM_THREADS=1 python train.py --preset quick --minutes "$MINUTES" --snapshot-minutes 5,10 \
      --sample-every 100000 --log-every 100 --out "$OUT/$name" $flags > "$OUT/$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
done
python evaluate.py runs "${folders[@]}" --seeds "$SEEDS" --out "$OUT/table"
