"""
How close `sgm.colorize` comes to the true colours of held-out images: the RMSE (in 0-255 pixel
levels, over RGB) of the colourings against the originals, beside that of the gray inputs.

    python tools/colorize_error.py --ckpt runs/icons --n 64 [--steps 1000] [--seed 0]
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import sgm  # noqa: E402


@click.command(cls=cli.Command)
@click.option("--ckpt", "ckpt_path", required=True, help="An RGB checkpoint or run folder.")
@click.option("--n", type=click.IntRange(1, 10_000), default=64, help="Held-out images.")
@click.option("--steps", type=click.IntRange(1, 10_000), default=1000, help="pc steps.")
@click.option("--seed", type=cli.SEED, default=0)
@click.option("--data-root", type=click.Path(file_okay=False), default=data.DATA_DIR)
def main(ckpt_path, n, steps, seed, data_root):
    ckpt = checkpoint.load(cli.find_checkpoint(ckpt_path))
    cfg = ckpt.train_config
    test = data.load_shaped(cfg.data, data_root, False, cfg.image_size, cfg.grayscale,
                            ckpt.shape, "the checkpoint", note=print).images[:n]  # fmt: skip
    x = data.to_model_range(test, ckpt.data_range)
    gray = x.mean(1, keepdim=True).expand_as(x)
    generator = torch.Generator().manual_seed(seed)
    colored, _ = sgm.colorize(ckpt.score_fn(), ckpt.sde, gray, "pc", steps, generator=generator)
    rmse = lambda images: (images.float() - test.float()).pow(2).mean().sqrt().item()
    gray_rmse = rmse(data.to_uint8(gray, ckpt.data_range))
    color_rmse = rmse(data.to_uint8(colored, ckpt.data_range))
    print(f"{len(test)} held-out images of {cfg.data}, pc {steps} steps, seed {seed}: RMSE "
          f"{color_rmse:.1f} for the colourings, {gray_rmse:.1f} for the gray inputs | "
          f"{cli.machine()}")  # fmt: skip


if __name__ == "__main__":
    main()
