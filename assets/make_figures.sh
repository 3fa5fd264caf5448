#!/usr/bin/env bash
# Regenerates every table and figure of docs/results.md (and the README's pictures), in three parts.
#
#   bash assets/make_figures.sh sdes     # the SDE study (about 1 hour after its training)
#   bash assets/make_figures.sh ship     # FD against training time, then export runs/ref (30 minutes)
#   bash assets/make_figures.sh figures  # every table and figure of the shipped model (2 hours)
#
# The SDE study first trains the three SDEs side by side (62 minutes on 2 cores):
#   for s in ve vp subvp; do OMP_NUM_THREADS=1 python train.py --preset quick --conditional --sde $s \
#       --steps 6000 --ema-decay 0.999 --channels 16 --batch-size 64 --lr-schedule constant \
#       --ema-ramp 0 --out runs/$s > runs/$s.out 2>&1 & done; wait
# The shipped model is the reference run (122 minutes on 2 cores, nothing else running):
#   python train.py --preset quick --sde subvp --channels 16 --batch-size 64 --ema-decay 0.999 \
#       --steps 13126 --snapshot-minutes 30,60,90 --out runs/ref > runs/ref.log 2>&1
# `ship` replaces checkpoints/fmnist.pt with runs/ref's EMA weights (REF=folder for another run);
# `figures` needs checkpoints/fmnist.pt, and checkpoints/fmnist_likelihood.pt for one grid.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:?"which part: sdes, ship or figures"}
REF=${REF:-runs/ref}
CK=checkpoints/fmnist.pt
SWEEP="heun@5/10/18/50,dpmpp_2m@5/10/20,edm:s_churn=5:s_tmin=0.05:s_tmax=50@10/18"
SWEEP="$SWEEP,edm:s_churn=20:s_tmin=0.05:s_tmax=50@18,dpmpp_2m_sde@10/20/35/50,dpmpp_2m_sde:eta=0.5@35"
SWEEP="$SWEEP,pc@25/100,em@100,pc:snr=0.08@25,pc:snr=0.3@25"

if [ "$PART" = sdes ]; then  # the SDE x solver table and bits/dim of the three models
  RUNS="runs/ve/ckpt.pt runs/vp/ckpt.pt runs/subvp/ckpt.pt"
  python evaluate.py compare $RUNS --solvers heun,ode,em,pc --n 256 --out assets/compare.md
  for ck in $RUNS; do python evaluate.py bpd --ckpt $ck --n 200 --batch-size 100; done
  exit 0
fi
if [ "$PART" = ship ]; then  # FD against training time (snapshots, two seeds), then ship the EMA
  python evaluate.py runs "$REF" --seeds 0,1 --out assets/ref_runs  # weights in fp16 (prints the
  python evaluate.py export "$REF/ckpt.pt" --out $CK --overwrite --n 1000  # FD before and after)
  cp "$(ls "$REF"/samples_*.png | tail -1)" assets/train_grid.png
  exit 0
fi
[ "$PART" = figures ] || { echo "make_figures.sh: the part is sdes, ship or figures" >&2; exit 2; }

# bits/dim on the first 1000 test images, then every picture
python evaluate.py bpd --ckpt $CK --n 1000 --batch-size 250
for s in em reverse_diffusion pc ald ode heun edm dpmpp_2m dpmpp_2m_sde; do  # (no ancestral for sub-VP)
  python sample.py --ckpt $CK --solver $s --n 64 --out assets/solver_$s.png; done
python sample.py --ckpt checkpoints/fmnist_likelihood.pt --solver dpmpp_2m_sde --n 64 \
  --out assets/likelihood_dpmpp_2m_sde.png  # beside solver_dpmpp_2m_sde.png, on the same noise
python sample.py --ckpt $CK --solver em --steps 500 --n 16 --out assets/trajectory.gif
python sample.py --ckpt $CK --solver heun --label all --n 80 --guidance 1 --out assets/label_all.png
python sample.py --ckpt $CK --solver pc --steps 500 --inpaint left --from-test 0 --n 8 --out assets/inpaint_left.png
python sample.py --ckpt $CK --solver pc --steps 500 --inpaint center --from-test 8 --n 8 --out assets/inpaint_center.png
python sample.py --ckpt $CK --interpolate 0 1 --n 10 --out assets/interpolate.png
# FD against NFE (1000 samples per point, labels from the class prior), FD's noise, and the dropped label
python evaluate.py sweep --ckpt $CK --n 1000 --out assets/sweep --solvers "$SWEEP"
for arm in heun@18 dpmpp_2m@10 dpmpp_2m_sde@10 dpmpp_2m_sde@20 dpmpp_2m_sde@35; do
  python evaluate.py fd --ckpt $CK --n 1000 --solver ${arm%@*} --steps ${arm#*@} --seed 1; done
python evaluate.py fd --ckpt $CK --n 1000 --solver heun --steps 18 --labels none
python evaluate.py guidance --ckpt $CK --n 100 --out assets/guidance.md
