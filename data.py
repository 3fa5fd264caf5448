"""
Data in: the datasets a model trains on and is measured against, the order of the training
batches, and the scaling between uint8 pixels and the model's data range.

`load(spec, root)` reads any of these as a `Dataset` of uint8 images (N, C, H, W) and labels:

    fashion-mnist, mnist, cifar10   by name: torchvision's files in `root` (downloaded there
                                    on first use); FashionMNIST also from Debian's package
    a folder of IDX files           FashionMNIST's four files (.gz or not), read in place
    a folder of images              PNG, JPEG, BMP, WebP, ... searched recursively; first-level
                                    subfolders are classes. Decoded once, cached under `root`
    an .npz file                    a uint8 `images` array (N, H, W[, C]), optional integer
                                    `labels` (N,) and class names `classes`

Named datasets have their own test split; a folder or .npz holds out a fixed HOLDOUT of its
images (drawn by a fixed seed) as its test split. Nothing is ever written into a dataset's own
folder or file.
"""

import gzip
import hashlib
import os
import pickle
import zlib
from dataclasses import dataclass

import numpy as np
import torch

import cli
import files
import sgm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = cli.DATA_ROOT  # the scripts' --data-root
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION = (
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
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NAMES = {  # name: (torchvision class, its folder under root, class names)
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", FASHION),
    "mnist": ("MNIST", "MNIST/raw", tuple("0123456789")),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", CIFAR10),
}
IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".webp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".tga",
)
HOLDOUT = 0.1  # of a folder's or .npz's images, at most 10,000: its test split
MEMORY_SHARE = 0.5  # a dataset may take at most this share of the memory available
CACHE_VERSION = 1


class DataError(sgm.SGMError):
    pass


@dataclass
class Dataset:
    """uint8 images (N, C, H, W), int64 labels (N,) (None: unlabelled) and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple
    source: str  # a name, or the absolute path of a folder or .npz file

    @property
    def shape(self):
        return tuple(self.images.shape[1:])


def describe(spec):
    """What --data names, for messages and checkpoints: a name as it is, a path made absolute."""
    return spec if spec in NAMES else os.path.abspath(spec)


def check_not_into(out, spec, flag="--out"):
    """Refuse an output that is the dataset file `spec` or lies inside its folder: nothing is ever
    written into a user's data (a named dataset lives under --data-root, which is ours)."""
    if spec in NAMES or not os.path.exists(spec):
        return
    data_path, out_path = os.path.realpath(spec), os.path.realpath(out)
    inside = os.path.isdir(data_path) and os.path.commonpath([data_path, out_path]) == data_path
    if inside or out_path == data_path:
        where = "inside the dataset" if inside else "the dataset file"
        raise DataError(f"{flag} {out} is {where} {spec}: nothing is written into your data; "
                        "write elsewhere")  # fmt: skip


def load(spec, root=DATA_DIR, train=True, image_size=None, grayscale=False, note=print):
    """The training (or test) split of the dataset `spec`, at image_size x image_size (the shorter
    side resized, then centre-cropped) or as found, in one channel if `grayscale`. note(text)
    says what takes long (a download, decoding a folder)."""
    check_image_size(image_size)
    if spec in NAMES:
        images, labels = load_named(spec, root, train, note)
        classes = NAMES[spec][2]
    elif os.path.isdir(spec) and find_idx(spec):
        images, labels = read_idx_pair(find_idx(spec), train)
        classes = FASHION
    elif os.path.isdir(spec):
        images, labels, classes = load_folder(spec, root, image_size, grayscale, note)
    elif os.path.isfile(spec) and spec.lower().endswith(".npz"):
        images, labels, classes = load_npz(spec)
    elif not os.path.exists(spec):
        raise DataError(
            f"--data {spec}: no such folder or file; give a folder of images, an "
            f".npz file or one of {', '.join(NAMES)}"
        )
    else:
        raise DataError(f"--data {spec}: not a folder, an .npz file or one of {', '.join(NAMES)}")
    if not (spec in NAMES or find_idx(spec)):
        images, labels = split(images, labels, train, spec)
    images = fit(images, image_size, grayscale)
    if images.shape[-1] != images.shape[-2]:
        raise DataError(
            f"--data {spec}: the images are {images.shape[-1]}x{images.shape[-2]}, "
            "not square: give --image-size to crop them"
        )
    return Dataset(
        images.contiguous(), labels, tuple(classes) if labels is not None else (), describe(spec)
    )


def check_image_size(size):
    """The U-Net halves an image down to a lowest level of at most 8 pixels (7 for 28, 8 for 32):
    every halving must be exact."""
    if size is None:
        return
    levels = unet_levels(size)
    if levels is None:
        raise DataError(
            f"--image-size {size}: the U-Net halves it down to 8 pixels or fewer, "
            "which needs a size such as 28, 32 or 64"
        )


def unet_levels(size):
    """The U-Net's levels for size x size images: halvings until the side is at most 8, plus one.
    None if a halving is not exact (or the size is not positive)."""
    if type(size) is not int or size < 1:
        return None
    levels = 1
    while size > 8:
        if size % 2:
            return None
        size, levels = size // 2, levels + 1
    return levels


def channel_mult(size, preset_mult, spec="the data"):
    """A preset's channel multipliers, one per level for this size: cut, or the last repeated."""
    levels = unet_levels(size)
    if levels is None:
        raise DataError(
            f"--data {spec}: the U-Net halves {size}x{size} images down to 8 pixels "
            "or fewer, which needs a size such as 28, 32 or 64: give --image-size"
        )
    return tuple(preset_mult[:levels]) + (preset_mult[-1],) * (levels - len(preset_mult))


def fit(images, size, grayscale):
    """uint8 (N, C, H, W) -> (N, C', size, size): the shorter side resized, then centre-cropped;
    one channel if `grayscale`."""
    from torchvision.transforms import functional as TF

    if grayscale and images.shape[1] == 3:
        images = TF.rgb_to_grayscale(images)
    if size is not None and images.shape[-2:] != (size, size):
        images = TF.center_crop(TF.resize(images, size, antialias=True), size)
    return images


def check_count(n, spec):
    if n < 2:
        raise DataError(
            f"--data {spec}: {n} image; at least 2 are needed (a tenth, at least one, "
            "is held out to measure the model)"
        )


def split(images, labels, train, spec):
    """A folder's or .npz's own split: HOLDOUT of the images, drawn with a fixed seed, are its
    test images."""
    n = len(images)
    check_count(n, spec)
    test = torch.zeros(n, dtype=torch.bool)
    n_test = min(10_000, max(1, round(n * HOLDOUT)))
    test[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:n_test]] = True
    keep = ~test if train else test
    return images[keep], None if labels is None else labels[keep]


# ------------------------------------------------------------------------------------------------
# Named datasets and the files in torchvision's layout


def load_named(name, root, train, note):
    """fashion-mnist, mnist or cifar10 from root (torchvision's layout), downloaded on first use.
    FashionMNIST is also read from Debian's package in place."""
    torchvision_class, folder, _ = NAMES[name]
    path = os.path.join(root, folder)
    if name == "cifar10":
        if not os.path.isfile(os.path.join(path, "test_batch")):
            download(name, root, note)
        return read_cifar(path, train)
    fashion = name == "fashion-mnist"  # also its four files in root itself, or Debian's
    found = find_idx(path) or (fashion and (find_idx(root) or find_idx(DEBIAN_DIR))) or None
    if not found:
        download(name, root, note)
        found = find_idx(path)
    return read_idx_pair(found, train)


def download(name, root, note):
    """torchvision's download of `name` into root; one line if it fails (offline)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, NAMES[name][0])
    note(f"downloading {name} into {root}")
    try:
        cls(root, train=False, download=True)
    except Exception as e:
        debian = ", or apt-get install -y dataset-fashion-mnist" * (name == "fashion-mnist")
        raise DataError(
            f"{name} is not in {root!r} and its download failed ({cli.first_line(e)})"
            f": run on a machine with internet access, put its files in "
            f"{os.path.join(root, NAMES[name][1])!r}{debian}"
        ) from None


def find_idx(folder):
    """{name: path} of FashionMNIST's four IDX files in folder (or in its FashionMNIST/raw),
    each plain or .gz; None if they are not all there."""
    for where in (folder, os.path.join(folder, "FashionMNIST", "raw")):
        paths = {}
        for name in FILES:
            for path in (os.path.join(where, name), os.path.join(where, name + ".gz")):
                if os.path.isfile(path):
                    paths[name] = path
        if len(paths) == len(FILES):
            return paths
    return None


def read_idx_pair(paths, train):
    """Images (N, 1, H, W) and labels (N,) 0-9 from IDX files, checked."""
    prefix = "train" if train else "t10k"
    images = read_idx(paths[f"{prefix}-images-idx3-ubyte"], 3)
    labels = read_idx(paths[f"{prefix}-labels-idx1-ubyte"], 1).long()
    if len(labels) != len(images):
        raise DataError(
            f"{paths[f'{prefix}-labels-idx1-ubyte']}: {len(labels)} labels for {len(images)} images"
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise DataError(
            f"{paths[f'{prefix}-labels-idx1-ubyte']}: labels outside 0-9 "
            f"(from {int(labels.min())} to {int(labels.max())})"
        )
    return images[:, None], labels


def read_idx(path, dims):
    """A uint8 IDX array with `dims` dimensions (magic 0x0000080<dims>), plain or gzipped."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be decompressed ({e}): replace it") from None
    if len(raw) < 4 + 4 * dims or raw[:4] != bytes([0, 0, 8, dims]):
        raise DataError(f"{path} cannot be read: not an IDX file of {dims}-d uint8 data")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = raw[4 + 4 * dims :]
    if len(body) != torch.Size(shape).numel():
        raise DataError(
            f"{path} cannot be read: {len(body)} bytes for shape {tuple(shape)} "
            "(cut short? replace it)"
        )
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


class NumpyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: only numpy arrays and plain values are let through."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")
        return super().find_class(module, name)


def read_cifar(folder, train):
    """CIFAR-10 in torchvision's layout (cifar-10-batches-py): images (N, 3, 32, 32), labels."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = NumpyUnpickler(f, encoding="latin1").load()
            images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.long).reshape(-1))
        except (
            OSError,
            pickle.UnpicklingError,
            EOFError,
            KeyError,
            TypeError,
            ValueError,
            RuntimeError,
            AttributeError,
        ) as e:
            raise DataError(f"{path}: not a CIFAR-10 batch ({cli.first_line(e)})") from None
    images, labels = torch.cat(images), torch.cat(labels)
    if len(images) != len(labels) or not bool(((labels >= 0) & (labels <= 9)).all()):
        raise DataError(f"{folder}: CIFAR-10 labels do not match the images or lie outside 0-9")
    return images, labels


# ------------------------------------------------------------------------------------------------
# An .npz file


def load_npz(path):
    """images (N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W); labels (N,) checked against the
    classes (`classes`, else 0 to the largest label)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            stored = {key: arrays[key] for key in arrays.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({cli.first_line(e)})") from None
    images = stored.get("images")
    if images is None:
        raise DataError(f"{path}: no 'images' array (it holds {', '.join(stored) or 'nothing'})")
    if (
        images.dtype != np.uint8
        or images.ndim not in (3, 4)
        or images.ndim == 4
        and images.shape[-1] not in (1, 3, 4)
    ):
        raise DataError(
            f"{path}: 'images' must be uint8 (N, H, W) or (N, H, W, C) with C 1, 3 "
            f"or 4, not {images.dtype} {images.shape}"
        )
    check_count(len(images), path)
    images = torch.from_numpy(images.reshape(*images.shape[:3], -1)).permute(0, 3, 1, 2)
    images = on_white(images) if images.shape[1] == 4 else images
    labels, classes = stored.get("labels"), stored.get("classes")
    if labels is None:
        return images.contiguous(), None, ()
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'labels' must be integers, one per image ({len(images)}), not "
            f"{labels.dtype} {labels.shape}"
        )
    labels = torch.from_numpy(labels.astype(np.int64))
    classes = [str(c) for c in classes] if classes is not None else None
    if classes is not None and len(set(classes)) != len(classes):
        raise DataError(f"{path}: 'classes' names a class twice ({', '.join(classes)})")
    top = len(classes) - 1 if classes else int(labels.max()) if len(labels) else 0
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= top:
        raise DataError(
            f"{path}: labels from {int(labels.min())} to {int(labels.max())}, "
            f"outside the classes 0-{top}"
        )
    return images.contiguous(), labels, tuple(classes or map(str, range(top + 1)))


def on_white(rgba):
    """uint8 (N, 4, H, W) -> (N, 3, H, W), composited on white."""
    alpha = rgba[:, 3:].float() / 255
    return (rgba[:, :3].float() * alpha + 255 * (1 - alpha)).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# A folder of images


def scan(folder):
    """The image files under folder, sorted (hidden ones skipped), and their classes: the
    first-level subfolders, when every image sits in one and there are at least two."""
    paths, seen = [], set()
    for where, dirs, names in os.walk(folder, followlinks=True):  # linked folders once each
        seen.add(os.path.realpath(where))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and
                         os.path.realpath(os.path.join(where, d)) not in seen)  # fmt: skip
        for name in sorted(names):
            path = os.path.join(where, name)
            image = not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
            if image and os.path.isfile(path):  # no FIFO, device or dangling link: reads block
                paths.append(os.path.relpath(path, folder))
    if not paths:
        raise DataError(
            f"--data {folder}: no image files in it (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}, in subfolders too)"
        )
    tops = [path.split(os.sep)[0] if os.sep in path else None for path in paths]
    classes = sorted(set(tops)) if None not in tops and len(set(tops)) > 1 else []
    return paths, classes, [classes.index(top) for top in tops] if classes else None


def load_folder(folder, root, size, grayscale, note):
    """A folder of images, decoded once: later runs read the cache under `root`, keyed by the
    files' names and bytes and by size and grayscale."""
    real = os.path.realpath(folder)
    if os.path.commonpath([os.path.realpath(root), real]) == real:
        raise DataError(f"--data-root {root} lies inside --data {folder}: the cache would be "
                        "written into your images; give another --data-root")  # fmt: skip
    paths, classes, labels = scan(folder)
    check_count(len(paths), folder)
    key = hashlib.sha256(repr((CACHE_VERSION, size, grayscale)).encode())
    for path in paths:
        key.update(path.encode() + b"\0")
        with open(os.path.join(folder, path), "rb") as f:
            key.update(hashlib.sha256(f.read()).digest())
    cache = os.path.join(root, "cache", f"folder-{key.hexdigest()[:24]}.pt")
    images = read_cache(cache, len(paths))
    if images is None:
        images = decode_folder(folder, paths, size, grayscale, note, cache)
        try:
            files.save_torch({"images": images}, cache)
        except (OSError, sgm.SGMError) as e:
            note(f"the cache was not written ({cli.first_line(e)}); the next run decodes again")
    labels = torch.tensor(labels) if labels is not None else None
    return images, labels, classes


def read_cache(path, n):
    """The cached images (n, C, H, W) uint8, or None (absent, or not what this code writes)."""
    if not os.path.isfile(path):
        return None
    try:
        images = torch.load(path, weights_only=True)["images"]
        ok = images.dtype == torch.uint8 and images.ndim == 4 and len(images) == n
        return images if ok else None
    except Exception:
        return None


def decode_folder(folder, paths, size, grayscale, note, cache):
    """Decode every image: gray or RGB (transparency on white), at one size."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    headers = [image_header(folder, path) for path in paths]
    sizes = sorted({wh for wh, _ in headers})
    if size is None and (len(sizes) > 1 or sizes[0][0] != sizes[0][1]):
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + ", ..." * (len(sizes) > 4)
        what = f"images of {len(sizes)} sizes ({shown})" if len(sizes) > 1 else f"{shown} images"
        raise DataError(
            f"--data {folder}: {what}; they need one size: train.py --image-size S resizes and "
            "crops them to SxS"
        )
    color = not grayscale and any(mode not in GRAY_MODES for _, mode in headers)
    side = size or sizes[0][0]
    check_memory(len(paths), (3 if color else 1) * side * side, folder)
    note(f"decoding {len(paths)} images in {folder} (once: cached in {cache})")
    images = np.empty((len(paths), side, side, 3 if color else 1), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(os.path.join(folder, path)) as image:
            image = flatten(image, "RGB" if color else "L", os.path.join(folder, path))
        if size is not None:
            image = TF.center_crop(TF.resize(image, size), size)
        images[i] = np.asarray(image).reshape(side, side, -1)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def image_header(folder, path):
    """((width, height), mode) of an image file, read from its header; one line if it is not an
    image."""
    from PIL import Image

    try:
        with Image.open(os.path.join(folder, path)) as image:
            mode = "RGB" if image.mode == "P" and image.palette.mode != "L" else image.mode
            return image.size, mode
    except Exception as e:
        raise DataError(
            f"{os.path.join(folder, path)}: not a readable image ({cli.first_line(e)})"
        ) from None


def flatten(image, mode, path):
    """A PIL image in mode "RGB" or "L": transparency composited on white, CMYK, palettes and
    16-bit gray converted. A truncated file is named in one line."""
    from PIL import Image

    try:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float gray
            image = image.point(lambda v: v / 256 if image.mode != "F" else v * 255).convert("L")
        if "transparency" in image.info or image.mode in ("RGBA", "LA", "La", "PA", "RGBa"):
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, "white")
            image.alpha_composite(rgba)
        return image.convert(mode)
    except Exception as e:
        raise DataError(
            f"{path}: cannot be decoded ({cli.first_line(e)}); truncated? Remove or replace it"
        ) from None


def available_memory():
    """Bytes of memory available (Linux's MemAvailable; elsewhere free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(n, pixels, spec):
    """Refuse a dataset whose uint8 images would take more than MEMORY_SHARE of the memory
    available, before decoding it."""
    need, have = n * pixels, available_memory()
    if have is not None and need > MEMORY_SHARE * have:
        raise DataError(
            f"--data {spec}: {n} images take {need / 1e9:.1f} GB, more than "
            f"{MEMORY_SHARE:.0%} of the {have / 1e9:.1f} GB of memory available: "
            "use a smaller --image-size or fewer images"
        )


# ------------------------------------------------------------------------------------------------
# Training batches and pixel scaling


def training_data(dataset, limit, global_batch):
    """The first `limit` images and labels (all if 0), at least one global batch of them."""
    images, labels = dataset.images, dataset.labels
    if limit:
        images, labels = images[:limit], None if labels is None else labels[:limit]
    if len(images) < global_batch:
        raise DataError(
            f"--data {dataset.source}: {len(images)} training images are fewer than "
            f"one global batch of {global_batch}: give a smaller --batch-size"
        )
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


def shape_text(shape):
    return "x".join(map(str, shape))


def load_shaped(spec, root, train, image_size, grayscale, shape, what, note=print):
    """`load` with a model's own settings (image_size 0: as found), refused in one line unless
    the images come out at the model's shape (C, S, S): no model is run on images of another."""
    dataset = load(spec, root, train, image_size or None, grayscale, note)
    if dataset.shape != tuple(shape):
        raise DataError(f"--data {spec} gives {shape_text(dataset.shape)} images, but {what} is "
                        f"for {shape_text(shape)}")  # fmt: skip
    return dataset


def same_data(a, b):
    """Whether two --data values name the same dataset (FashionMNIST's IDX files are
    fashion-mnist)."""
    identity = lambda spec: "fashion-mnist" if os.path.isdir(spec) and find_idx(spec) else spec
    return identity(describe(a)) == identity(describe(b))
