#!/usr/bin/env bash
# Regenerates every table and figure in the README (about 3 hours on 2 CPU cores).
# First train the three reference models, side by side (62 minutes on 2 cores):
#   for s in ve vp subvp; do OMP_NUM_THREADS=1 python train.py --preset quick --conditional --sde $s \
#       --steps 6000 --ema-decay 0.999 --channels 16 --batch-size 64 --lr-schedule constant \
#       --ema-ramp 0 --out runs/$s > runs/$s.out 2>&1 & done; wait
# Then:  bash assets/make_figures.sh [SDE]      (SDE: the model to ship as checkpoints/fmnist.pt; default subvp)
set -euo pipefail
cd "$(dirname "$0")/.."
BEST=${1:-subvp}
RUNS="runs/ve/ckpt.pt runs/vp/ckpt.pt runs/subvp/ckpt.pt"
SWEEP="heun@5/10/18/50,dpmpp_2m@5/10/20,edm:s_churn=5:s_tmin=0.05:s_tmax=50@10/18"
SWEEP="$SWEEP,edm:s_churn=20:s_tmin=0.05:s_tmax=50@18,dpmpp_2m_sde@10/20/35/50,dpmpp_2m_sde:eta=0.5@35"
SWEEP="$SWEEP,pc@25/100,em@100,pc:snr=0.08@25,pc:snr=0.3@25"

# The SDE x solver table and bits/dim of the three trained models
python evaluate.py compare $RUNS --solvers heun,ode,em,pc --n 256 --out assets/compare.md
for ck in $RUNS; do python evaluate.py bpd --ckpt $ck --n 200 --batch-size 100; done

# Ship the chosen model (EMA weights, fp16; prints the FD before and after), then every figure from it
python evaluate.py export runs/$BEST/ckpt.pt --out checkpoints/fmnist.pt --overwrite --n 1000
CK=checkpoints/fmnist.pt
# FD against NFE (1000 samples per point, labels from the class prior), FD's noise, and the dropped label
python evaluate.py sweep --ckpt $CK --n 1000 --out assets/sweep --solvers "$SWEEP"
for arm in heun@18 dpmpp_2m@10 dpmpp_2m_sde@10 dpmpp_2m_sde@20 dpmpp_2m_sde@35; do
  python evaluate.py fd --ckpt $CK --n 1000 --solver ${arm%@*} --steps ${arm#*@} --seed 1; done
python evaluate.py fd --ckpt $CK --n 1000 --solver heun --steps 18 --labels none
for s in em reverse_diffusion pc ald ode heun edm dpmpp_2m dpmpp_2m_sde; do  # (no ancestral for sub-VP)
  python sample.py --ckpt $CK --solver $s --n 64 --out assets/solver_$s.png; done
python sample.py --ckpt $CK --solver em --steps 500 --n 16 --out assets/trajectory.gif
python sample.py --ckpt $CK --solver heun --label all --n 80 --guidance 1 --out assets/label_all.png
python sample.py --ckpt $CK --solver pc --steps 500 --inpaint left --from-test 0 --n 8 --out assets/inpaint_left.png
python sample.py --ckpt $CK --solver pc --steps 500 --inpaint center --from-test 8 --n 8 --out assets/inpaint_center.png
python sample.py --ckpt $CK --interpolate 0 1 --n 10 --out assets/interpolate.png
python evaluate.py guidance --ckpt $CK --n 100 --out assets/guidance.md
cp runs/$BEST/samples_0006000.png assets/train_grid.png
