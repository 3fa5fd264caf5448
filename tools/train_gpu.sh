#!/usr/bin/env bash
# Train on one GPU for a fixed wall-clock budget, export the EMA weights in fp16 and measure them.
#
#   bash tools/train_gpu.sh [MINUTES] [DATA] [OUT]        # defaults: 6 minutes, data, runs/gpu
#
# Written for a GPU machine with PyTorch but no internet: DATA must hold the four FashionMNIST .gz
# files (from /usr/share/datasets/fashion-mnist/ or the dataset's GitHub page). Several recipes of the
# default preset (sub-VP, class-conditional) train side by side on the one GPU, since a 6 M-parameter
# U-Net on 28x28 images leaves most of a large GPU idle; each gets MINUTES of training. OUT/<recipe>/
# holds each run, OUT/<recipe>.pt its export (EMA, fp16, 12 MB), and OUT/results.tar.gz the logs,
# sample grids, the solo training throughput (speed.txt), FD and bits/dim of each export (eval.txt),
# with the shipped model's FD for pc at 1000 steps and dpmpp_2m_sde at 35.
# Set RECIPES to "name:flags|name:flags|..." to train others.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-6}
DATA=${2:-data}
OUT=${3:-runs/gpu}
DEVICE=${DEVICE:-cuda}
FD_N=${FD_N:-2000}     # samples per FD (heun, 35 NFE)
BPD_N=${BPD_N:-500}    # test images for bits/dim
SPEED_ITERS=${SPEED_ITERS:-20}
DEFAULT_RECIPES="base:--lr 2e-4"
DEFAULT_RECIPES+="|lr5e-4:--lr 5e-4 --warmup 1000 --ema-decay 0.9995"
DEFAULT_RECIPES+="|lr5e-4_b256:--lr 5e-4 --batch-size 256 --warmup 1000 --ema-decay 0.9995"
DEFAULT_RECIPES+="|lr1e-3_b512:--lr 1e-3 --batch-size 512 --warmup 1000 --ema-decay 0.9995"
: "${RECIPES:=$DEFAULT_RECIPES}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p "$OUT"
python -c "import data; data.load('fashion-mnist', '$DATA'); data.load('fashion-mnist', '$DATA', False)"
python -c "import torch as t; print(t.__version__, t.cuda.is_available() and t.cuda.get_device_name())" \
  | tee "$OUT/speed.txt"
for b in 128 512; do  # one process alone on the device
  python evaluate.py speed --device "$DEVICE" --batch-size $b --iters "$SPEED_ITERS" 2>&1 \
    | tee -a "$OUT/speed.txt"
done

IFS='|' read -ra LIST <<< "$RECIPES"
pids=()
for recipe in "${LIST[@]}"; do
  name=${recipe%%:*}
  flags=${recipe#*:}
  # shellcheck disable=SC2086
  python train.py --preset default --sde subvp --conditional --device "$DEVICE" --data-root "$DATA" \
    --time-limit "$MINUTES" --steps 1000000 --overwrite --log-every 200 $flags --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

pids=()
for recipe in "${LIST[@]}"; do
  name=${recipe%%:*}
  tail -n 2 "$OUT/$name.log"
  [ -f "$OUT/$name/ckpt.pt" ] || continue
  (python evaluate.py export "$OUT/$name/ckpt.pt" --out "$OUT/$name.pt" --overwrite --n 0 \
     --device "$DEVICE" &&
   python evaluate.py fd --ckpt "$OUT/$name.pt" --n "$FD_N" --device "$DEVICE" --data-root "$DATA" &&
   python evaluate.py bpd --ckpt "$OUT/$name.pt" --n "$BPD_N" --batch-size 500 --device "$DEVICE" \
     --data-root "$DATA") > "$OUT/$name.eval.txt" 2>&1 &
  pids+=($!)
done
# The shipped model: pc at 1000 steps (2000 NFE), too slow for the CPU, against dpmpp_2m_sde at 35
(for arm in pc@1000 dpmpp_2m_sde@35; do
   python evaluate.py fd --n 1000 --solver "${arm%@*}" --steps "${arm#*@}" --device "$DEVICE" \
     --data-root "$DATA"; done) > "$OUT/shipped.eval.txt" 2>&1 &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
cat "$OUT"/*.eval.txt | grep -v "━" > "$OUT/eval.txt" || true
cat "$OUT/eval.txt"
tar czf /tmp/results.tar.gz -C "$OUT" --exclude='*.pt' .
mv /tmp/results.tar.gz "$OUT/"
exit $status
