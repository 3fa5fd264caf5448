#!/usr/bin/env bash
# Regenerates every figure in the README from a checkpoint (default: the quick preset's run).
# First train the model they show:  python train.py --preset quick --conditional --out runs/quick
# (its last grid, runs/quick/samples_0002500.png, is assets/quick_grid.png). Then:
# Usage: bash assets/make_figures.sh [CKPT]     (about 40 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
CK=${1:-runs/quick/ckpt.pt}
for model in default quick tutorial; do python evaluate.py speed --model $model --batch-size 128 --iters 5 --device cpu; done
for s in em reverse_diffusion ancestral pc ald ode heun; do python sample.py --ckpt $CK --solver $s --n 64 --out assets/solver_$s.png; done
python sample.py --ckpt $CK --solver em --steps 500 --n 16 --out assets/trajectory.gif
python sample.py --ckpt $CK --solver heun --label all --n 80 --guidance 1 --out assets/label_all.png
python sample.py --ckpt $CK --solver pc --steps 500 --inpaint left --from-test 0 --n 8 --out assets/inpaint_left.png
python sample.py --ckpt $CK --solver pc --steps 500 --inpaint center --from-test 8 --n 8 --out assets/inpaint_center.png
python sample.py --ckpt $CK --interpolate 0 1 --n 10 --out assets/interpolate.png
python evaluate.py guidance --ckpt $CK --n 100 --out assets/guidance.md
python evaluate.py fd --ckpt $CK --solver heun --n 1000
python evaluate.py fd --ckpt $CK --solver ode --n 1000
python evaluate.py bpd --ckpt $CK --n 200 --batch-size 100
python evaluate.py sweep --ckpt $CK --n 256 --solvers heun,ode,em --max-steps 100 --out assets/sweep
