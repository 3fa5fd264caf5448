"""
Data in: FashionMNIST, the order of the training batches, and pixel scaling.

Loading (torchvision, with an offline fallback to the original .gz files) and the order of the
training batches, scaling between uint8 pixels and the model's data range (with dequantization)
in one place, class names, the devices (and whether bf16 pays), the default checkpoint, writing
files atomically (PNG grids, .npz arrays, GIFs, tables and, for checkpoint.py, checkpoints), and
the scripts' edge: their one error handler, the click type of every number, and the solver
options with their checks, read from the samplers' signatures.
"""

import gzip
import os
import shutil
import zlib

import torch

import files
import sgm

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "checkpoints", "fmnist.pt")
DATA_DIR = os.path.join(HERE, "data")  # the scripts' default, wherever they are run from
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


class DataError(sgm.SGMError):
    pass


def load_fashion_mnist(root=DATA_DIR, train=True):
    """FashionMNIST images (N, 1, 28, 28) uint8 and labels (N,) int64 through torchvision. Offline,
    the original .gz files are taken from `root` or from Debian's dataset-fashion-mnist package."""
    from torchvision.datasets import FashionMNIST

    raw = os.path.join(root, "FashionMNIST", "raw")
    if not all(os.path.isfile(os.path.join(raw, name)) for name in FILES):
        for source in (raw, root, DEBIAN_DIR):
            if all(os.path.isfile(os.path.join(source, name + ".gz")) for name in FILES):
                for name in FILES:
                    path = os.path.join(source, name + ".gz")
                    target = os.path.join(raw, name)
                    files.atomic_write(target, lambda tmp, path=path: gunzip(path, tmp))
                break
    try:
        download = not os.path.isdir(raw) or not os.listdir(raw)
        dataset = FashionMNIST(root, train=train, download=download)
    except Exception:
        if all(os.path.isfile(os.path.join(raw, name)) for name in FILES):
            raise DataError(
                f"the FashionMNIST files in {raw} cannot be read (cut short by an interrupted "
                "first run?): delete that folder and run again"
            ) from None
        raise DataError(
            f"FashionMNIST not found in {root!r} and the download failed. Either run on a machine "
            f"with internet access, put the four .gz files from "
            f"https://github.com/zalandoresearch/fashion-mnist into {root!r}, or install Debian's "
            f"package: apt-get install -y dataset-fashion-mnist"
        ) from None
    return dataset.data[:, None].contiguous(), dataset.targets.long()


def gunzip(source, path):
    """Decompress `source` into `path`; a damaged .gz file is named in one line."""
    try:
        with gzip.open(source, "rb") as f, open(path, "wb") as out:
            shutil.copyfileobj(f, out)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not write errors
        raise DataError(f"{source} cannot be decompressed ({e}): replace it") from None


def training_data(data_dir, limit, global_batch):
    """Training images (N, C, H, W) uint8 and labels (N,): the first `limit`, if set."""
    images, labels = load_fashion_mnist(data_dir, train=True)
    if limit:
        images, labels = images[:limit], labels[:limit]
    if len(images) < global_batch:
        raise DataError(f"{len(images)} images are fewer than one global batch of {global_batch}")
    return images, labels


def batch_indices(step, batch_size, n, seed, rank=0, world=1):
    """This rank's indices of the global batch `step`: each epoch is a permutation drawn from
    (seed, epoch), so the data order follows from the step alone and --resume sees the same
    batches."""
    epoch, pos = divmod(step, n // (batch_size * world))
    start = (pos * world + rank) * batch_size
    return epoch_permutation(n, seed, epoch)[start : start + batch_size]


_permutation = {}


def epoch_permutation(n, seed, epoch):
    key = (n, seed, epoch)
    if key not in _permutation:  # one epoch's permutation, cached: drawn once per epoch
        _permutation.clear()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        _permutation[key] = torch.randperm(n, generator=generator)
    return _permutation[key]


def to_model_range(images, data_range, dequantize=False):
    """uint8 (B, C, H, W) -> float in data_range. Dequantization adds U(0, 1) before dividing by
    256; without it each pixel goes to the middle of its bin."""
    lo, hi = data_range
    offset = torch.rand_like(images, dtype=torch.float) if dequantize else 0.5
    return lo + (hi - lo) * (images.float() + offset) / 256


def to_uint8(x, data_range):
    """float in data_range (B, C, H, W) -> uint8, the inverse of to_model_range."""
    lo, hi = data_range
    return ((x - lo) / (hi - lo) * 256).floor().clamp(0, 255).to(torch.uint8)
