"""
The scripts' edge, shared by train.py, sample.py and evaluate.py: one error handler, the checks
and click types of what users type (numbers, lists, output paths, solver options), devices, the
checkpoint a command uses, a console that survives a closed pipe, and the machine's description.
"""

import errno
import glob
import inspect
import math
import os
import platform
import sys
import tempfile

import click
import torch

import sgm

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "checkpoints", "fmnist.pt")
DATA_ROOT = os.path.join(HERE, "data")  # --data-root's default, wherever the scripts are run from
data_root_option = click.option("--data-root", type=click.Path(file_okay=False), default=DATA_ROOT,
                                show_default=True, help="Where named datasets are downloaded, and "
                                "folders' decoded images cached.")  # fmt: skip


class OneLineErrors:
    """The scripts' one error handler: library errors (a bad checkpoint, missing data, ...) and I/O
    errors (a full disk, a read-only folder: the files written stay intact) become one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except sgm.SGMError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or 'I/O'}: {e.strerror or e}") from None


class Command(OneLineErrors, click.Command):
    pass


class Group(OneLineErrors, click.Group):
    pass


class ConsoleStream:
    """sys.stderr (looked up at each write, so that a redirect in tests is seen) for the scripts'
    consoles: a closed pipe (`2>&1 | head -1`) or another write error drops the text, never the
    work; console output must not cost the result."""

    def write(self, text):
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):  # a broken pipe, a closed stream
            return len(text)

    def flush(self):
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(sys.stderr, name)


def first_line(error, limit=100):
    """An exception's message cut to one short line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


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


def check_not_input(out, inputs, what="the checkpoint", flag="--out"):
    """Refuse an output that is, or resolves to (a symlink, a hard link, another spelling), one of
    the command's input files: writing it would replace the input."""
    for path in inputs:
        try:
            same = os.path.samefile(out, path)
        except OSError:  # one of them does not exist (yet)
            same = os.path.realpath(out) == os.path.realpath(path)
        if same:
            shown = "" if out == path else f" ({path})"
            raise sgm.SGMError(f"{flag} {out} is {what} itself{shown}; write elsewhere")


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


# ------------------------------------------------------------------------------------------------
# The scripts' edge: numbers and solver options, checked before any work starts

SOLVER_COMMON = ("generator", "callback", "project")  # what sgm.sample passes to every solver
# (low, high[, low excluded]) of each solver option, and the names each choice takes
OPTION_RANGES = {"snr": (0, 100, True), "corrector_steps": (0, 1000), "rtol": (1e-12, 1),
                 "atol": (1e-12, 1), "s_churn": (0, 1e3), "s_tmin": (0, 1e6), "s_tmax": (0, 1e6),
                 "s_noise": (0, 2), "eta": (0, 1)}  # fmt: skip
OPTION_CHOICES = {"predictor": tuple(sgm.PREDICTORS), "corrector": tuple(sgm.CORRECTORS)}


# Bounds of the numbers the scripts take: torch's seeds, and counts that stay within a machine's
# memory and time (beyond them, allocation fails or the work never ends)
SEED = click.IntRange(-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_IMAGES = 10**6  # --n of a command that holds its samples in memory: 3 GB for 28x28
MAX_STEPS = 10**5  # --steps of a sampler: far past any solver's useful steps
MAX_BATCH = 2**16  # --batch-size of sampling and evaluate.py speed


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


def check_solver_runs(sde, solver, options):
    """Refuse, before any work, a solver `sde` cannot run (ancestral on sub-VP): two steps on a
    1-pixel image with the score of N(0, I), which calls no network. The probability-flow ODE
    exists for every SDE."""
    if solver != "ode":
        generator = torch.Generator().manual_seed(0)
        sgm.sample(lambda x, t: -x, sde, (1, 1, 1, 1), solver, 2, generator=generator, **options)


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


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = torch.get_num_threads()
    return f"{cpu} ({os.cpu_count()} cores, {threads} threads){gpu}, torch {torch.__version__}"
