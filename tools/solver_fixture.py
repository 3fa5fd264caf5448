"""
Write testdata/solvers.pt: every solver's samples on the shipped model for one seed, which
test_sgm.py holds later versions of sgm.py to (within 1e-4 per pixel).

    python tools/solver_fixture.py      # a few seconds on a CPU

Run it again only when a change to a solver's numbers is intended.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import sgm  # noqa: E402

OUT = os.path.join(os.path.dirname(cli.SHIPPED), "..", "testdata", "solvers.pt")
CASES = {  # name: (solver, steps, options); 10 steps for the paper's 1000-step solvers
    "em": ("em", 10, {}),
    "reverse_diffusion": ("reverse_diffusion", 10, {}),
    "pc": ("pc", 10, {}),
    "pc_em_ald": ("pc", 10, dict(predictor="euler_maruyama", corrector="ald", snr=0.1)),
    "ald": ("ald", 10, dict(corrector_steps=2)),
    "ode": ("ode", None, dict(rtol=1e-3, atol=1e-3)),
    "heun": ("heun", None, {}),
    "edm": ("edm", None, dict(s_churn=5.0)),
    "dpmpp_2m": ("dpmpp_2m", None, {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", None, {}),
    "inpaint_pc": ("pc", 10, {}),
}


def run_case(ckpt, name):
    solver, steps, options = CASES[name]
    labels = torch.tensor([3, 7])
    score_fn = ckpt.score_fn(labels, 1.0)
    generator = torch.Generator().manual_seed(0)
    shape = (2, 1, 28, 28)
    if name.startswith("inpaint"):
        images = data.to_model_range(
            torch.arange(784, dtype=torch.uint8).reshape(1, 1, 28, 28).expand(2, 1, 28, 28) % 251,
            ckpt.data_range,
        )
        mask = torch.zeros(1, 28, 28)
        mask[..., 14:] = 1
        return sgm.inpaint(
            score_fn, ckpt.sde, images, mask, solver, steps, generator=generator, **options
        )
    return sgm.sample(score_fn, ckpt.sde, shape, solver, steps, generator=generator, **options)


def main():
    torch.set_num_threads(1)
    ckpt = checkpoint.load(cli.SHIPPED)
    results = {}
    for name in CASES:
        x, nfe = run_case(ckpt, name)
        results[name] = {"x": x, "nfe": nfe}
        print(f"{name}: {nfe} NFE, mean {x.mean():.4f}")
    torch.save(results, OUT)


if __name__ == "__main__":
    main()
