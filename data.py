"""
FashionMNIST in and images out, for train.py, sample.py and evaluate.py.

Loading (torchvision, with an offline fallback to the original .gz files), scaling between uint8
pixels and the model's data range (with dequantization) in one place, class names, the devices,
the default checkpoint, the scripts' comma-separated lists, and writing files atomically (PNG
grids, .npz arrays, GIFs, tables and, for checkpoint.py, checkpoints).
"""

import glob
import gzip
import os
import shutil
import tempfile
import zlib

import torch

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
                    try:
                        with gzip.open(path, "rb") as f:
                            atomic_write(os.path.join(raw, name), lambda tmp: copy_to(f, tmp))
                    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not write errors
                        raise DataError(
                            f"{path} cannot be decompressed ({e}): replace it"
                        ) from None
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


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: a file is replaced only by a complete one, and a
    crash never leaves half a file. For checkpoints, images, arrays and tables alike."""
    folder, suffix = os.path.dirname(os.path.abspath(path)), os.path.splitext(path)[1]
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def copy_to(f, path):
    with open(path, "wb") as out:
        shutil.copyfileobj(f, out)


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


def resolve_device(device):
    """'auto' -> 'cuda' if available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise sgm.SGMError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return device


def check_writable(path):
    """Refuse an output path before any work starts: not a folder, and the nearest folder that
    exists on its way can be written to (the writers create the missing ones)."""
    if os.path.isdir(path):
        raise sgm.SGMError(f"{path} is a folder: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise sgm.SGMError(f"{path}: cannot write there ({e.strerror})") from None


def parse_list(text, flag, kind=float, what="numbers"):
    """'0,1,3' -> [0.0, 1.0, 3.0] (or ints with kind=int); one clear line for anything else."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise sgm.SGMError(f"{flag} {text!r}: give {what} separated by commas") from None


def default_checkpoint():
    """The shipped checkpoints/fmnist.pt, else the newest runs/*/ckpt.pt."""
    if os.path.isfile(SHIPPED):
        return SHIPPED
    runs = sorted(glob.glob("runs/*/ckpt.pt"), key=os.path.getmtime)
    if not runs:
        raise sgm.SGMError(
            "no checkpoint given and none found (checkpoints/fmnist.pt, runs/*/ckpt.pt): "
            "train one with `python train.py --preset quick` or pass --ckpt PATH"
        )
    return runs[-1]


def grid_image(images, nrow=8):
    """uint8 (B, C, H, W) -> PIL image of a grid with white 2-pixel gaps."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    return to_pil_image(make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=255))


def save_png(x, data_range, path, nrow=8):
    """Samples x (B, C, H, W) in data_range as a PNG grid."""
    image = grid_image(to_uint8(x, data_range), nrow)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_npz(x, data_range, path, labels=None):
    """Samples as uint8 (N, H, W) (or (N, H, W, C)), with their labels if given."""
    import numpy as np

    images = to_uint8(x, data_range).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    images = images[..., 0] if images.shape[-1] == 1 else images
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz"
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def save_gif(frames, path, nrow):
    """frames: a list of (state, denoised) uint8 pairs (B, C, H, W), shown side by side."""
    from PIL import Image

    images = []
    for state, denoised in frames:
        left, right = grid_image(state, nrow), grid_image(denoised, nrow)
        frame = Image.new("L", (left.width * 2 + 8, left.height), 255)
        frame.paste(left.convert("L"), (0, 0))
        frame.paste(right.convert("L"), (left.width + 8, 0))
        images.append(frame)
    images += [images[-1]] * 10  # hold the result

    def write(tmp):
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=80, loop=0
        )

    atomic_write(path, write)


def save_text(text, path):
    """A table or log, written atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
