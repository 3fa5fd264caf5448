"""
The predicted classes of the images in an .npz file (sample.py --out x.npz), by an FD feature
network: how many of them each class got, and the share of --label's class.

    python sample.py --label sneaker --n 200 --out sneakers.npz [--classifier ...]
    python tools/classify.py sneakers.npz --label sneaker [--classifier FEATURES]
"""

import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--label", required=True, help="The class the images should show.")
@click.option("--classifier", type=click.Path(dir_okay=False), help="[FashionMNIST's]")
def main(path, label, classifier):
    net, meta = evaluate.load_classifier(classifier)
    images = torch.from_numpy(np.load(path, allow_pickle=False)["images"])
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    _, predicted = evaluate.features_and_classes(net, images)
    counts = torch.bincount(predicted, minlength=len(meta["classes"])).tolist()
    share = counts[list(meta["classes"]).index(label)] / len(images)
    shown = ", ".join(f"{c} {k}" for c, k in zip(meta["classes"], counts, strict=True) if k)
    print(f"{len(images)} images of {path}: {share:.3f} classified as {label} ({shown})")


if __name__ == "__main__":
    main()
