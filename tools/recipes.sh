#!/usr/bin/env bash
# Quality per CPU-minute: train quick-preset recipes two at a time, side by side on one thread each,
# for the same wall-clock budget, then score every run with evaluate.py runs (FD, heun, 35 NFE,
# 1000 samples, the same noise for every run; snapshots are kept at 5 and 10 minutes).
#
#   bash tools/recipes.sh [MINUTES] [OUT]          # defaults: 20 minutes, runs/recipes
#
# RECIPES is "name:flags|name:flags|..." (an even number of them: they run in pairs, so each pair
# shares the machine equally). The default list is docs/results.md's table: K is the quick preset.
# Needs 2 cores; with MINUTES=20 it takes 160 minutes of training and about 40 of scoring (final
# checkpoints; add the snapshots with SNAPSHOTS=--snapshots).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-20}
OUT=${2:-runs/recipes}
SEEDS=${SEEDS:-0}
# Each arm states how it differs from today's quick preset (conditional, 8 channels, batch 32, constant lr
# 2e-3 after 100 warm-up steps, EMA 0.995); arms run in the pairs of the table in docs/results.md.
OLD="--no-conditional --channels 16 --batch-size 64"  # the quick preset before this table
RAMP="--lr-schedule cosine --ema-ramp 0.15 --ema-decay 0.9995"
DEFAULT_RECIPES="A_old_quick:$OLD"
DEFAULT_RECIPES+="|B_cosine_ramp:$OLD $RAMP"
DEFAULT_RECIPES+="|C_lognormal:$OLD $RAMP --noise-sampling lognormal"
DEFAULT_RECIPES+="|D_lognormal_ch12:$OLD $RAMP --noise-sampling lognormal --channels 12"
DEFAULT_RECIPES+="|E_ch12:$OLD $RAMP --channels 12"
DEFAULT_RECIPES+="|F_ch12_b32:$OLD $RAMP --channels 12 --batch-size 32"
DEFAULT_RECIPES+="|G_ch12_b32_const:--no-conditional --channels 12"
DEFAULT_RECIPES+="|F2_again:--no-conditional $RAMP --channels 12"
DEFAULT_RECIPES+="|G_again:--no-conditional --channels 12"
DEFAULT_RECIPES+="|H_cond:--channels 12"
DEFAULT_RECIPES+="|I_cond_lr4:--channels 12 --lr 4e-3"
DEFAULT_RECIPES+="|J_cond_b16:--channels 12 --batch-size 16"
DEFAULT_RECIPES+="|K_cond_ch8:"
DEFAULT_RECIPES+="|L_cond_ch8_lr1:--lr 1e-3"
DEFAULT_RECIPES+="|M_ch8_cosine:--lr-schedule cosine"
DEFAULT_RECIPES+="|N_ch8_ema999:--ema-decay 0.999"
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
    OMP_NUM_THREADS=1 python train.py --preset quick --sde vp --time-limit "$MINUTES" --snapshot-minutes 5,10 \
      --sample-every 100000 --log-every 100 --out "$OUT/$name" $flags > "$OUT/$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
done
python evaluate.py runs "${folders[@]}" --seeds "$SEEDS" ${SNAPSHOTS:---no-snapshots} --out "$OUT/table"
