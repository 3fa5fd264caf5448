"""
FashionMNIST in and images out, for train.py, sample.py and evaluate.py.

Loading (torchvision, with an offline fallback to the original .gz files) and the order of the
training batches, scaling between uint8 pixels and the model's data range (with dequantization)
in one place, class names, the devices (and whether bf16 pays), the default checkpoint, writing
files atomically (PNG grids, .npz arrays, GIFs, tables and, for checkpoint.py, checkpoints), and
the scripts' edge: their one error handler, the click type of every number, and the solver
options with their checks, read from the samplers' signatures.
"""

import contextlib
import errno
import glob
import gzip
import inspect
import math
import os
import re
import shutil
import tempfile
import time
import zlib

import click
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


class Command(click.Command):
    """The scripts' one error handler: library errors (a bad checkpoint, missing data, ...) and I/O
    errors (a full disk, a read-only folder: the files written stay intact) become one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except sgm.SGMError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or 'I/O'}: {e.strerror or e}") from None


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
                    atomic_write(os.path.join(raw, name), lambda tmp, path=path: gunzip(path, tmp))
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


TMP_PREFIX = ".sgm-tmp-"  # atomic_write's temporary files: .sgm-tmp-<pid>-<random>.tmp
STALE_SECONDS = 60


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: a file is replaced only by a complete one, and a
    crash never leaves half a file. For checkpoints, images, arrays and tables alike. On failure
    the temporary file goes, and so do the folders this call created; an OS error names `path`.
    Temporary files that a killed write left in the folder are removed first (`remove_stale`)."""
    folder = os.path.dirname(os.path.abspath(path))
    created, missing = [], folder  # the folders to create, deepest first
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException as e:
        for leftover, remove in [(tmp, os.remove), *((made, os.rmdir) for made in created)]:
            if leftover is not None:
                with contextlib.suppress(OSError):
                    remove(leftover)
        if isinstance(e, OSError) and e.errno:  # an error about the temporary file names `path`
            if e.filename in (None, tmp, *created) or TMP_PREFIX in str(e.filename):
                raise OSError(e.errno, e.strerror, path) from None
        raise


def remove_stale(folder):
    """Remove atomic_write's temporary files in `folder` that a killed write left: those of a
    process no longer running on this machine, untouched for STALE_SECONDS (a live write from
    another machine keeps its file fresh). Nothing else is ever removed."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-\w+\.tmp", name)
            path = os.path.join(folder, name)
            if match and not running(int(match[1])):
                with contextlib.suppress(OSError):
                    if time.time() - os.path.getmtime(path) > STALE_SECONDS:
                        os.remove(path)


def running(pid):
    """Whether process `pid` runs on this machine (when unsure: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no such number
        return True
    return True


def save_torch(obj, path):
    """torch.save through atomic_write. torch's writer reports a full disk as a RuntimeError
    ("unexpected pos ..."), not an OSError: it becomes one line too."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as e:
        raise sgm.SGMError(
            f"{path}: cannot be written ({first_line(e)}); is the disk full? An earlier file "
            "there is untouched"
        ) from None


def first_line(error, limit=100):
    """An exception's message cut to one short line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


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


def use_bf16(device, amp):
    """bf16 autocast (fp32 master weights) when `amp`, on CUDA and on CPUs with native bf16
    (AVX-512 BF16 or AMX); emulated bf16 is about 10x slower than fp32."""
    if not amp or device.startswith("cuda"):
        return amp
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_writable(path):
    """Refuse an output path before any work starts: a folder, a name too long, or a place that
    cannot be written to. The file itself is created and removed when its folder exists;
    nothing is left behind (the writers create the missing folders)."""
    if os.path.isdir(path):
        raise sgm.SGMError(f"{path} is a folder: give a file name")
    folder, names = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    while not os.path.exists(folder):
        folder, name = os.path.split(folder)
        names.append(name)
    try:
        if any(len(os.fsencode(name)) > os.pathconf(folder, "PC_NAME_MAX") for name in names):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        if len(names) == 1 and not os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            os.remove(path)  # made just now, by this call
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise sgm.SGMError(f"{path}: cannot write there ({e.strerror})") from None


def check_number(name, value, low=-math.inf, high=math.inf, low_open=False):
    """Refuse NaN, inf and out-of-range numbers with one line, before any work starts."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
    if not ok or (low_open and value == low):
        bound = "above" if low_open else "at least"
        raise sgm.SGMError(f"{name} must be a finite number {bound} {low:g} and at most {high:g}, "
                           f"not {value!r}")  # fmt: skip


def check_int(name, value, low, high):
    """Refuse anything but a whole number in [low, high] (bools too), with one line."""
    if type(value) is not int or not low <= value <= high:
        raise sgm.SGMError(f"{name} must be a whole number from {low} to {high}, not {value!r}")


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


# ------------------------------------------------------------------------------------------------
# The scripts' edge: numbers and solver options, checked before any work starts

SOLVER_COMMON = ("generator", "callback", "project")  # what sgm.sample passes to every solver
# (low, high[, low excluded]) of each solver option, and the names each choice takes
OPTION_RANGES = {"snr": (0, 100, True), "corrector_steps": (0, 1000), "rtol": (1e-12, 1),
                 "atol": (1e-12, 1), "s_churn": (0, 1e3), "s_tmin": (0, 1e6), "s_tmax": (0, 1e6),
                 "s_noise": (0, 2), "eta": (0, 1)}  # fmt: skip
OPTION_CHOICES = {"predictor": tuple(sgm.PREDICTORS), "corrector": tuple(sgm.CORRECTORS)}


class Number(click.ParamType):
    """A finite number in [low, high] (low excluded with low_open): click's FloatRange lets NaN
    through, this refuses it, and inf, with one line."""

    name = "number"

    def __init__(self, low=-math.inf, high=math.inf, low_open=False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
            check_number(f"--{param.name.replace('_', '-')}" if param else "value", number,
                         self.low, self.high, self.low_open)  # fmt: skip
        except (ValueError, sgm.SGMError) as e:
            self.fail(str(e) if isinstance(e, sgm.SGMError) else f"{value!r} is not a number")
        return number


def solver_options(solver):
    """The options `solver` takes, with their defaults: its sampler's keyword arguments."""
    params = inspect.signature(sgm.SOLVERS[solver].sample).parameters.values()
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY
            and p.name not in SOLVER_COMMON}  # fmt: skip


def check_solver_options(options, flags=False):
    """Refuse an unknown choice, an out-of-range number or a combination that cannot sample among
    a solver's options (its defaults filled in), with one line. flags: name them --s-churn."""
    for key, value in options.items():
        name = "--" + key.replace("_", "-") if flags else key
        if key in OPTION_CHOICES and value not in OPTION_CHOICES[key]:
            choices = ", ".join(OPTION_CHOICES[key])
            raise sgm.SGMError(f"unknown {name} {value!r}; choose one of {choices}")
        if key in OPTION_RANGES:
            check_number(name, value, *OPTION_RANGES[key])
    if "corrector_steps" in options and not isinstance(options["corrector_steps"], int):
        raise sgm.SGMError(
            f"corrector_steps must be a whole number, not {options['corrector_steps']!r}"
        )
    if options.get("s_tmin", 0) > options.get("s_tmax", math.inf):
        raise sgm.SGMError("s_tmin is above s_tmax: edm would never churn (use heun for that)")
    no_corrector = options.get("corrector") == "none" or options.get("corrector_steps") == 0
    if options.get("predictor", "none") == "none" and "corrector_steps" in options and no_corrector:
        raise sgm.SGMError("no predictor and no corrector steps: nothing to sample with")


def find_checkpoint(path=None):
    """--ckpt: a checkpoint file, a train.py run folder (its ckpt.pt) or, when not given, the
    default checkpoint."""
    if path is None:
        return default_checkpoint()
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "ckpt.pt")):
            raise sgm.SGMError(
                f"{path}: a folder without ckpt.pt; give a checkpoint file or a train.py run folder"
            )
        return os.path.join(path, "ckpt.pt")
    return path


def option_type(name, default):
    """The click type of the solver option `name`: its choices, or its range (whole numbers where
    the default is one)."""
    if name in OPTION_CHOICES:
        return click.Choice(OPTION_CHOICES[name])
    low, high, *low_open = OPTION_RANGES[name]
    return click.IntRange(low, high) if type(default) is int else Number(low, high, *low_open)
