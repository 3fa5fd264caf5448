"""
Measure a score-based model: sample quality, test-set bits/dim, quality against cost, and speed.

    python evaluate.py fd --ckpt runs/vp/ckpt.pt --solver heun --steps 18 --n 2000
    python evaluate.py bpd --ckpt runs/vp/ckpt.pt --n 500 --out vp.txt     # and each image's
    python evaluate.py bpd-diff vp.txt ve.txt                              # paired: ve - vp
    python evaluate.py sweep --ckpt runs/vp/ckpt.pt --n 500 --out sweep     # sweep.md and sweep.png
    python evaluate.py compare runs/ve/ckpt.pt runs/vp/ckpt.pt --n 500      # SDE x solver table
    python evaluate.py export runs/vp/ckpt.pt --out my.pt                  # EMA-only, fp16
    python evaluate.py runs runs/a runs/b --seeds 0,1                      # FD of training runs
    python evaluate.py speed
    python evaluate.py train-classifier --overwrite      # rebuilds checkpoints/classifier.pt
    python evaluate.py train-classifier --data my_images --image-size 32 --out my_features.pt
    python evaluate.py fd --ckpt runs/mine --classifier my_features.pt

FD is the Frechet distance between Gaussians fitted to the 256-d penultimate features of a small
classifier of the model's dataset: FashionMNIST's is checkpoints/classifier.pt (committed and
hash-checked, so every machine scores on the same scale); train-classifier builds one for any
labelled dataset. Inception features suit 28x28 grayscale badly and cannot be downloaded here;
the numbers are therefore not comparable to published FIDs, only to each other. Each FD comes
with its floor: N training images against the test set, what a perfect model would score with N.
"""

import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import sys
import time

import click
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

import checkpoint
import cli
import data
import files
import sgm

console = Console(file=cli.ConsoleStream(), soft_wrap=True)  # a closed pipe costs no result
HERE = os.path.dirname(os.path.abspath(__file__))
CLASSIFIER = os.path.join(HERE, "checkpoints", "classifier.pt")
HEUN_STEPS = sgm.SOLVERS["heun"].steps  # 35 NFE: every training-run FD, and train.py's grids
CLASSIFIER_SHA256 = "e4a16879aac282cec5f7be1381fdc19615a1d04e7a8c641bbfd5e62c4e33bfc8"
CLASSIFIER_FORMAT = "sgm-classifier-1"
FASHION_FEATURES = dict(
    data="fashion-mnist",
    image_size=0,
    grayscale=False,
    shape=(1, 28, 28),
    classes=data.FASHION,
    mean=0.286,
    std=0.353,
)  # the shipped network's


# ------------------------------------------------------------------------------------------------
# The feature network


def conv_bn_relu(in_ch, out_ch):
    """Three layers, flattened into the Sequential so the saved weights keep their names."""
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]


class Classifier(nn.Module):
    """A small CNN for (C, S, S) images; `features` gives the 256-d penultimate activations."""

    def __init__(self, shape=(1, 28, 28), num_classes=10, mean=0.286, std=0.353):
        super().__init__()
        channels, size, self.mean, self.std = shape[0], shape[-1] // 2 // 2, mean, std
        self.body = nn.Sequential(
            *conv_bn_relu(channels, 32),
            *conv_bn_relu(32, 32),
            nn.MaxPool2d(2),  # 14x14 for 28x28 images
            *conv_bn_relu(32, 64),
            *conv_bn_relu(64, 64),
            nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * size * size, 256),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, num_classes))

    def features(self, images):  # uint8 (B, C, S, S) -> (B, 256)
        return self.body((images.float() / 255 - self.mean) / self.std)

    def forward(self, images):
        return self.head(self.features(images))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_classifier(path=None, device="cpu"):
    """The feature network (in eval mode) and what it was trained on: data, image_size,
    grayscale, shape, classes. None: the shipped FashionMNIST one, whose hash is checked."""
    if path is None and os.path.isfile(CLASSIFIER) and sha256(CLASSIFIER) != CLASSIFIER_SHA256:
        raise click.ClickException(
            f"{CLASSIFIER}: sha256 {sha256(CLASSIFIER)[:16]}... does not match the expected "
            f"{CLASSIFIER_SHA256[:16]}...; the file was modified. Restore it "
            f"(git checkout {os.path.relpath(CLASSIFIER, HERE)}) or rebuild it"
        )
    path = path or CLASSIFIER
    if not os.path.isfile(path):
        raise click.ClickException(f"{path}: no such feature network; build one with "
                                   "`python evaluate.py train-classifier`")  # fmt: skip
    state = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stored = state.get("format") == CLASSIFIER_FORMAT  # else FashionMNIST's plain weights
        meta = {k: v for k, v in state.items() if k != "weights"} if stored else FASHION_FEATURES
        net = Classifier(meta["shape"], len(meta["classes"]), meta["mean"], meta["std"])
        net.load_state_dict(state["weights"] if stored else state)
    except Exception as e:
        model = isinstance(state, dict) and state.get("format") == checkpoint.FORMAT
        why = "a model checkpoint" if model else cli.first_line(e)
        raise click.ClickException(f"{path}: not an FD feature network ({why})") from None
    return net.to(device).eval(), meta


@torch.no_grad()
def features_and_classes(net, images, batch_size=1000):
    device = next(net.parameters()).device
    feats, classes = [], []
    for i in range(0, len(images), batch_size):
        f = net.features(images[i : i + batch_size].to(device))
        feats.append(f.double().cpu())
        classes.append(net.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(classes)


def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2), where
    Tr (C_a C_b)^1/2 = sum sqrt(eig(C_a^1/2 C_b C_a^1/2))."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = torch.cov(feats_a.T), torch.cov(feats_b.T)
    eigval, eigvec = torch.linalg.eigh(cov_a)
    sqrt_a = eigvec @ torch.diag(eigval.clamp(min=0).sqrt()) @ eigvec.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def sample_labels(ckpt, labels, n, seed, device):
    """(n,) labels drawn from the training classes (labels 'prior'), or None: the dropped label of
    a conditional model ('none'), or an unconditional model."""
    if labels == "prior" and ckpt.model_config.num_classes:
        return ckpt.prior_labels(n, seed, device)
    return None


def labels_used(ckpt, labels):
    """The sentence that says how a (conditional) model was sampled."""
    if not ckpt.model_config.num_classes:
        return "unconditional model"
    if labels == "prior":
        return "labels drawn from the training classes' frequencies, w = 0"
    return "the dropped label (the unconditional score)"


def generate(ckpt, solver, steps, n, device, batch_size=500, seed=0, progress=None,
             labels="prior", **options):  # fmt: skip
    """n samples as uint8 (n, C, H, W) from a loaded checkpoint, the mean NFE and the seconds.
    labels: 'prior' or 'none' (see `sample_labels`). The prior noise depends on the seed alone."""
    generator = torch.Generator(device).manual_seed(seed)
    all_labels = sample_labels(ckpt, labels, n, seed, device)
    out, nfes, start = [], [], time.time()
    task = progress.add_task(f"{solver} {steps}", total=n) if progress else None
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        score = ckpt.score_fn(None if all_labels is None else all_labels[i : i + b])
        x, nfe = sgm.sample(score, ckpt.sde, (b, *ckpt.shape), solver, steps, generator=generator,
                            device=device, **options)  # fmt: skip
        out.append(data.to_uint8(x, ckpt.data_range).cpu())
        nfes.append(nfe)
        if progress:
            progress.advance(task, b)
    return torch.cat(out), sum(nfes) / len(nfes), time.time() - start


def check_arm(ckpt, solver, options):
    """Refuse, before any work, a solver the checkpoint's SDE cannot run (ancestral on sub-VP):
    two steps on a 1-pixel image with the score of N(0, I), which calls no network. The
    probability-flow ODE exists for every SDE."""
    cli.check_solver_runs(ckpt.sde, solver, options)


@functools.lru_cache(maxsize=2)
def reference(classifier, root, device):
    """The feature network, its meta, its data's test features and labels (once per process)."""
    net, meta = load_classifier(classifier, device)
    test = load_reference(meta, root, train=False)
    return net, meta, features_and_classes(net, test.images)[0], test.labels


def load_reference(meta, root, train):
    return data.load_shaped(meta["data"], root, train, meta["image_size"], meta["grayscale"],
                            meta["shape"], "the feature network", note=console.print)  # fmt: skip


class Scorer:
    """FD against the feature network's test set (or one class of it), for checkpoints of its
    dataset and shape: (path, checkpoint) pairs, each checked before any work."""

    def __init__(self, ckpts, classifier, root, device):
        self.root, self.train = root, None
        net, meta = load_classifier(classifier, device)
        for path, ckpt in ckpts:
            same = data.same_data(ckpt.train_config.data, meta["data"])
            if not same or ckpt.shape != tuple(meta["shape"]):
                raise click.ClickException(
                    f"{path} models {data.shape_text(ckpt.shape)} images of "
                    f"{ckpt.train_config.data}; the feature network {classifier or CLASSIFIER} "
                    f"scores {data.shape_text(meta['shape'])} images of {meta['data']}: give one "
                    "of its data (python evaluate.py train-classifier --data D --out F)"
                )
        self.net, self.meta, self.test_feats, self.test_labels = reference(classifier, root, device)
        if len(self.test_feats) < 2:
            raise click.ClickException(f"{meta['data']} has {len(self.test_feats)} test image: an "
                                       "FD needs at least 2")  # fmt: skip

    def fd(self, images, label=None):
        feats, classes = features_and_classes(self.net, images)
        reference = self.test_feats if label is None else self.test_feats[self.test_labels == label]
        return frechet_distance(feats, reference), torch.bincount(
            classes, minlength=len(self.meta["classes"])
        )

    def floor(self, n, seed=0, label=None):
        """FD of n training images (of one class, if given): a perfect model's score with n."""
        if self.train is None:
            self.train = load_reference(self.meta, self.root, train=True)
        images, labels = self.train.images, self.train.labels
        if label is not None:
            images = images[labels == label]
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        return self.fd(images[idx], label)[0]


# ------------------------------------------------------------------------------------------------
# Commands


class Group(cli.Group):
    """cli's one-line errors, whichever command raised them; Ctrl-C exits 130."""

    def invoke(self, ctx):
        WRITTEN.clear()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            kept = f"kept {', '.join(WRITTEN)} as last written" if WRITTEN else "nothing written"
            console.print(f"interrupted; {kept}", highlight=False)
            sys.exit(130)


WRITTEN = []  # the files the running command has written, for the line that Ctrl-C prints


def wrote(*paths):
    """Record files written, in order, once each."""
    WRITTEN.extend(path for path in paths if path not in WRITTEN)


@click.group(
    cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True}
)
def main():
    """Evaluate score-based models (FashionMNIST, or the data of --classifier)."""


HELP = "Checkpoint or train.py run folder [as sample.py]."
ckpt_option = click.option("--ckpt", "ckpt_path", type=click.Path(), default=None, help=HELP)
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
STEPS, SAMPLES = click.IntRange(1, cli.MAX_STEPS), click.IntRange(2, cli.MAX_IMAGES)
steps_option = click.option("--steps", type=STEPS, default=None, help="[the solver's default]")


def data_options(command):
    """--classifier (the FD features and their dataset) and --data-root."""
    classifier = click.option("--classifier", type=click.Path(dir_okay=False),
                              help="FD feature network (train-classifier --out) "
                              "[checkpoints/classifier.pt: FashionMNIST's].")  # fmt: skip
    return classifier(cli.data_root_option(command))


labels_option = click.option(
    "--labels",
    type=click.Choice(["prior", "none"]),
    default="prior",
    help="Conditional models: labels drawn from the training classes' frequencies (w = 0), or "
    "none: the dropped label.",
)


def tolerance_options(command):
    """--rtol and --atol, the probability-flow ODE's tolerances (fd, bpd)."""
    for name in ("--atol", "--rtol"):
        kind = cli.Number(*cli.OPTION_RANGES[name[2:]])
        command = click.option(name, type=kind, default=1e-5, help="ODE tolerance.")(command)
    return command


def parse_arm(text):
    """'SOLVER' or 'SOLVER:OPTION=VALUE:...' (e.g. 'edm:s_churn=5') -> (solver, options)."""
    solver, *pairs = text.strip().split(":")
    if solver not in sgm.SOLVERS:
        names = ", ".join(sgm.SOLVERS)
        raise click.ClickException(f"unknown solver {solver!r}; choose from {names}")
    known, options = cli.solver_options(solver), {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known:
            takes = ", ".join(known) or "none"
            raise click.ClickException(f"{solver} has no option {key!r} (its options: {takes})")
        kind = type(known[key])  # float, int or str, from the default
        try:
            options[key] = kind(value)
        except ValueError:
            what = {float: "a number", int: "a whole number"}.get(kind, "a name")
            raise click.ClickException(f"{text}: {key} takes {what}, not {value!r}") from None
    cli.check_solver_options({**known, **options})
    return solver, options


@main.command("fd")
@ckpt_option
@click.option(
    "--solver",
    "arm",
    default="heun",
    help="A solver, with options if any: 'edm:s_churn=5:s_tmin=0.05', 'pc:snr=0.1:corrector=ald'.",
)
@steps_option
@click.option("--n", type=SAMPLES, default=2000)
@tolerance_options
@click.option("--seed", type=cli.SEED, default=0)
@labels_option
@device_option
@data_options
def fd_command(ckpt_path, arm, steps, n, rtol, atol, seed, labels, device, classifier, data_root):
    """Frechet distance of N samples to the test set, the real-data floor, the class histogram."""
    device, ckpt_path = cli.resolve_device(device), cli.find_checkpoint(ckpt_path)
    solver, options = parse_arm(arm)
    steps = steps or sgm.SOLVERS[solver].steps
    if solver == "ode":  # the flags, unless the arm gives its own
        options = {"rtol": rtol, "atol": atol, **options}
    ckpt = checkpoint.load(ckpt_path, device)  # before the slow part: a bad path fails at once
    check_arm(ckpt, solver, options)
    scorer = Scorer([(ckpt_path, ckpt)], classifier, data_root, device)
    with Progress(console=console) as progress:
        images, nfe, seconds = generate(
            ckpt, solver, steps, n, device, seed=seed, progress=progress, labels=labels,
            **options,
        )  # fmt: skip
    fd, hist = scorer.fd(images)
    floor = scorer.floor(n, seed)
    setting = (
        "rtol {rtol:g} atol {atol:g}".format(**options) if solver == "ode" else f"steps {steps}"
    )
    console.print(
        f"FD {fd:.2f} (floor {floor:.2f}: {n} training images vs test) | {arm}, {setting}, "
        f"{nfe:.0f} NFE, {labels_used(ckpt, labels)}, seed {seed}, "
        f"{n} samples in {seconds:.0f} s | {ckpt_path} | {cli.machine()}, {device}"
    )
    console.print(
        "predicted classes: "
        + ", ".join(f"{c} {k}" for c, k in zip(scorer.meta["classes"], hist.tolist(), strict=True))
    )


def standard_error(values):
    """Of the mean of a 1-d tensor; nan for one value."""
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan


PER_IMAGE = "# bits/dim per image: "  # the first line of a bpd --out file begins so


def read_per_image(path):
    """A `bpd --out` file: (how it was measured, the checkpoint, its values as float64)."""
    not_ours = sgm.SGMError(f"{path}: not a file from bpd --out")
    try:
        with open(path) as f:
            first, values = f.readline().rstrip("\n"), [float(line) for line in f if line.strip()]
    except OSError as e:
        raise sgm.SGMError(f"{path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError):
        raise not_ours from None
    settings, _, ckpt_path = first.removeprefix(PER_IMAGE).partition(" | ")
    if not first.startswith(PER_IMAGE) or settings.partition(" ")[0] != str(len(values)):
        raise not_ours
    values = torch.tensor(values).double()  # float32, as measured: a model against itself gives 0
    if not values.isfinite().all():
        raise sgm.SGMError(f"{path}: holds a value that is not finite")
    return settings, ckpt_path, values


def check_replaceable(out):
    """bpd --out may replace only a file that bpd --out wrote: no dataset, checkpoint or other file
    of the user's."""
    try:
        with open(out, "rb") as f:
            ours = f.read(len(PER_IMAGE)) == PER_IMAGE.encode()
    except FileNotFoundError:
        return
    except OSError as e:
        raise sgm.SGMError(f"--out {out}: {e.strerror}") from None
    if not ours:
        raise sgm.SGMError(f"--out {out} exists and is not a file from bpd --out; write elsewhere")


def per_image_bpd(ckpt, images, batch_size, generator, **options):
    """Each image's bits/dim (float64, N) and the mean NFE per batch, with a progress bar."""
    score, values, nfes = ckpt.score_fn(), [], []
    with Progress(console=console) as progress:
        task = progress.add_task("bits/dim", total=len(images))
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size].to(generator.device)
            bpd, nfe = sgm.bits_per_dim(
                score, ckpt.sde, batch, ckpt.data_range, generator=generator, **options
            )
            values.append(bpd.cpu())
            nfes.append(nfe)
            progress.advance(task, len(bpd))
    return torch.cat(values).double(), sum(nfes) / len(nfes)


@main.command("bpd")
@ckpt_option
@click.option("--n", type=click.IntRange(1, 10000), default=None, help="Test images [all].")
@click.option("--batch-size", type=click.IntRange(1, cli.MAX_BATCH), default=250)
@tolerance_options
@click.option("--seed", type=cli.SEED, default=0)
@device_option
@click.option("--data", "data_spec", help="Test images [the checkpoint's own dataset's].")
@cli.data_root_option
@click.option("--out", help="Also write each image's bits/dim to this file (for bpd-diff).")
def bpd_command(ckpt_path, n, batch_size, rtol, atol, seed, device, data_spec, data_root, out):
    """Test-set bits/dim with uniform dequantization and the Hutchinson trace estimator."""
    device, ckpt_path = cli.resolve_device(device), cli.find_checkpoint(ckpt_path)
    ckpt = checkpoint.load(ckpt_path, device)
    cfg, spec = ckpt.train_config, data_spec or ckpt.train_config.data
    if out:
        cli.check_not_input(out, [ckpt_path], "an input")
        data.check_not_into(out, spec)
        check_replaceable(out)
        cli.check_writable(out)
    shape = (cfg.image_size, cfg.grayscale, ckpt.shape)
    images = data.load_shaped(spec, data_root, False, *shape, ckpt_path, note=console.print).images
    if n and n > len(images):
        console.print(f"note: the test split has only {len(images)} image(s); all are used")
    images = images[:n] if n else images
    # The images (by content), seed, batch size and device fix the dequantization and trace noise:
    # two files that agree here drew the same noise for every image (bpd-diff pairs them).
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    header = (
        f"{len(images)} test images {data.shape_text(images.shape[1:])} (sha256 {digest}), "
        f"seed {seed}, batch size {batch_size}, rtol {rtol} atol {atol}, {device}"
    )
    start = time.time()
    generator = torch.Generator(device).manual_seed(seed)
    values, nfe = per_image_bpd(ckpt, images, batch_size, generator, rtol=rtol, atol=atol)
    console.print(
        f"bits/dim {values.mean():.3f} +- {standard_error(values):.3f} (standard error) over "
        f"{len(values)} test images, {nfe:.0f} NFE per batch, "
        f"{time.time() - start:.0f} s, rtol {rtol} atol {atol} | "
        f"{ckpt_path} | {cli.machine()}, {device}"
    )
    if out:
        lines = "".join(f"{v:.9g}\n" for v in values.tolist())  # 9 digits: float32 exactly
        files.save_text(f"{PER_IMAGE}{header} | {ckpt_path}\n{lines}", out)
        wrote(out)


@main.command("bpd-diff")
@click.argument("first", type=click.Path(dir_okay=False))
@click.argument("second", type=click.Path(dir_okay=False))
def bpd_diff_command(first, second):
    """SECOND - FIRST: the paired difference of two bpd --out files of the same images and noise."""
    (a_settings, a_ckpt, a), (b_settings, b_ckpt, b) = map(read_per_image, (first, second))
    if a_settings != b_settings:
        raise sgm.SGMError(
            f"not measured alike, so not paired: {first} is '{a_settings}', {second} '{b_settings}'"
        )
    for path, ckpt_path, values in ((first, a_ckpt, a), (second, b_ckpt, b)):
        mean, se = values.mean(), standard_error(values)
        console.print(f"{mean:.4f} +- {se:.4f} bits/dim: {ckpt_path} ({path})")
    console.print(
        f"second - first: {(b - a).mean():+.4f} +- {standard_error(b - a):.4f} bits/dim, the "
        f"standard error of the {len(a)} per-image differences ({a_settings})"
    )


SWEEP_STEPS = {  # step counts per solver; the ODE's are tolerances
    "heun": (5, 10, 18, 35, 50),
    "edm": (10, 18, 35),
    "dpmpp_2m": (5, 10, 20, 35),
    "dpmpp_2m_sde": (10, 20, 35, 50),
    "em": (20, 50, 200, 1000),
    "reverse_diffusion": (20, 50, 200, 1000),
    "ancestral": (20, 50, 200, 1000),
    "pc": (10, 25, 100, 500),
    "ald": (10, 25, 100, 500),
    "ode": (1e-2, 1e-3, 1e-4, 1e-5),
}
SWEEP_ARMS = (
    "heun,edm:s_churn=5:s_tmin=0.05:s_tmax=50,edm:s_churn=20:s_tmin=0.05:s_tmax=50,dpmpp_2m,"
    "dpmpp_2m_sde,dpmpp_2m_sde:eta=0.5,em,pc,pc:snr=0.08@25/100,pc:snr=0.3@25/100,ode"
)


def parse_sweep_arm(text):
    """An arm of the sweep: 'SOLVER[:OPTION=VALUE...][@STEPS/...]' -> (solver, options, steps)."""
    arm, at, steps = text.partition("@")
    solver, options = parse_arm(arm)
    if solver == "ode" and {"rtol", "atol"} & set(options):
        raise click.ClickException(
            f"{text}: the sweep's ODE points are its tolerances (rtol = atol = each); give them "
            "after @, e.g. ode@1e-3/1e-4"
        )
    if at and not steps:
        raise click.ClickException(f"{text}: no step counts after @")
    try:
        steps = tuple(float(s) if solver == "ode" else int(s) for s in steps.split("/") if s)
    except ValueError:
        raise click.ClickException(f"{text}: the step counts after @ must be numbers") from None
    if any(s <= 0 for s in steps):
        raise click.ClickException(f"{text}: the step counts after @ must be positive")
    for tolerance in steps if solver == "ode" else ():  # rtol = atol = each
        cli.check_solver_options({"rtol": tolerance, "atol": tolerance})
    return solver, options, steps or SWEEP_STEPS[solver]


def sweep_table(rows, header):
    table = "| solver | steps / tol | NFE | FD | seconds |\n|---|---|---|---|---|\n" + "".join(
        f"| {r['arm']} | {r['setting']:g} | {r['nfe']:.0f} | {r['fd']:.2f} | {r['seconds']:.1f} |\n"
        for r in rows
    )
    return header + table


@main.command("sweep")
@ckpt_option
@click.option("--n", type=SAMPLES, default=1000, help="Samples per point.")
@click.option(
    "--solvers",
    default=SWEEP_ARMS,
    help="Comma-separated arms SOLVER[:OPTION=VALUE...][@STEPS/...], e.g. 'edm:s_churn=5@10/18'.",
)
@click.option("--max-steps", type=STEPS, default=1000, help="Skip step counts above this.")
@click.option("--out", default="sweep", help="Writes OUT.md and OUT.png, after every point.")
@click.option("--seed", type=cli.SEED, default=0)
@labels_option
@device_option
@data_options
def sweep_command(
    ckpt_path, n, solvers, max_steps, out, seed, labels, device, classifier, data_root
):
    """FD against NFE for every solver at several step counts (the ODE at several tolerances),
    each point from the same prior noise (and labels)."""
    device, ckpt_path = cli.resolve_device(device), cli.find_checkpoint(ckpt_path)
    arms = [
        (a.strip().partition("@")[0], *parse_sweep_arm(a)) for a in solvers.split(",") if a.strip()
    ]
    if not arms:
        raise click.ClickException("--solvers names no solver")
    if all(solver != "ode" and s > max_steps for _, solver, _, steps in arms for s in steps):
        raise click.ClickException(f"every step count in --solvers is above --max-steps "
                                   f"{max_steps}: nothing to sweep")  # fmt: skip
    for path in (out + ".md", out + ".png"):
        cli.check_not_input(path, [ckpt_path], flag="--out gives")
        cli.check_writable(path)
    ckpt = checkpoint.load(ckpt_path, device)
    for _, solver, options, _ in arms:
        check_arm(ckpt, solver, options)
    scorer = Scorer([(ckpt_path, ckpt)], classifier, data_root, device)
    floor, rows = scorer.floor(n, seed), []
    header = (
        f"FD against NFE, {n} samples per point (seed {seed}, {labels_used(ckpt, labels)}), "
        f"floor {floor:.2f} ({n} training images). Checkpoint {ckpt_path}; {cli.machine()}, "
        f"{device}.\n\n"
    )
    title = f"FD vs NFE ({n} samples, {os.path.basename(ckpt_path)})"
    with Progress(console=console) as progress:
        for arm, solver, options, settings in arms:
            for setting in settings:
                if solver != "ode" and setting > max_steps:
                    continue
                ode = dict(rtol=setting, atol=setting) if solver == "ode" else {}
                images, nfe, seconds = generate(
                    ckpt, solver, 1 if ode else setting, n, device, seed=seed, progress=progress,
                    labels=labels, **options, **ode,
                )  # fmt: skip
                fd = scorer.fd(images)[0]
                rows.append(dict(arm=arm, setting=setting, nfe=nfe, fd=fd, seconds=seconds))
                progress.console.print(f"{arm} {setting:g}: FD {fd:.2f} at {nfe:.0f} NFE")
                files.save_text(sweep_table(rows, header), out + ".md")  # nothing lost on Ctrl-C
                files.save_plot(rows, floor, out + ".png", title)
                wrote(out + ".md", out + ".png")
    console.print(sweep_table(rows, header) + f"wrote {out}.md and {out}.png")


RECIPE_SKIP = ("preset", "steps", "seed", "log_every", "sample_every", "ckpt_every")


def recipe(cfg):
    """A run's recipe in words: its preset and what differs from it (steps aside)."""
    preset = checkpoint.TrainConfig(
        **{**checkpoint.PRESETS.get(cfg.preset, {}), "preset": cfg.preset}
    )
    changed = [
        f"{f.name}={getattr(cfg, f.name)}".replace(" ", "")
        for f in dataclasses.fields(cfg)
        if f.name not in RECIPE_SKIP and getattr(cfg, f.name) != getattr(preset, f.name)
    ]
    return " ".join([cfg.preset, *changed])


def run_points(folder, snapshots=True):
    """A run folder's evaluation points: (minutes, path) of each snapshot_<M>min.pt, then ckpt.pt
    at its training time (NaN for runs older than this); and the median img/s in log.jsonl.
    Each checkpoint is loaded here already, so that a damaged one is refused before any work."""
    ckpt_path = os.path.join(folder, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise click.ClickException(f"{folder}: no ckpt.pt; is it a train.py run folder?")
    points = []
    for path in glob.glob(os.path.join(folder, "snapshot_*min.pt")):
        with contextlib.suppress(ValueError):
            points.append((float(os.path.basename(path)[9:-6]), path))
    final = checkpoint.load(ckpt_path)
    for _, path in points if snapshots else ():
        checkpoint.load(path)
    points = [*sorted(points), (final.extra.get("train_seconds", math.nan) / 60, ckpt_path)]
    rates, log_path = [], os.path.join(folder, "log.jsonl")
    if os.path.exists(log_path) and not os.path.isfile(log_path):  # a FIFO would block for ever
        raise click.ClickException(f"{log_path}: not a plain file; move it away")
    with contextlib.suppress(OSError), open(log_path, "rb") as f:  # bytes: any line may be damaged
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rates.append(float(json.loads(line)["img_per_s"]))
    rate = sorted(rates)[len(rates) // 2] if rates else math.nan
    return points, rate


def runs_table(rows, header):
    table = (
        "| run | recipe | img/s | minutes | steps | images | FD |\n|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        fds = " / ".join(f"{fd:.1f}" for fd in r["fds"])
        table += (
            f"| {r['run']} | {r['recipe']} | {r['rate']:.0f} | {r['minutes']:.3g} | {r['step']} | "
            f"{r['images']} | {fds} |\n"
        )
    return header + table


@main.command("runs")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--n", type=SAMPLES, default=1000, help="Samples per FD.")
@click.option("--seeds", default="0", help="Comma-separated sampling seeds, e.g. 0,1.")
@click.option("--out", default="runs", help="Writes OUT.md, after every FD.")
@click.option("--snapshots/--no-snapshots", default=True, help="Snapshots too, or ckpt.pt only.")
@labels_option
@device_option
@data_options
def runs_command(folders, n, seeds, out, snapshots, labels, device, classifier, data_root):
    """Compare training runs: FD (heun, 35 NFE) of every snapshot (train.py --snapshot-minutes)
    and final checkpoint of each run folder, with the same noise for all, beside the run's
    recipe, training throughput and images seen. With several seeds, an FD per seed."""
    device = cli.resolve_device(device)
    seeds = cli.parse_list(seeds, "--seeds", int, "whole numbers")
    for seed in seeds:
        cli.check_int("a --seeds value", seed, cli.SEED.min, cli.SEED.max)
    cli.check_writable(out + ".md")
    runs = [(folder, *run_points(folder, snapshots)) for folder in folders]  # all checked first
    inputs = [path for _, points, _ in runs for _, path in points]
    cli.check_not_input(out + ".md", [*inputs, *(os.path.join(f, "log.jsonl") for f in folders)],
                        "a run's file", "--out gives")  # fmt: skip
    ckpts = [(path, checkpoint.load(path)) for path in inputs]
    scorer = Scorer(ckpts, classifier, data_root, device)
    floors = " / ".join(f"{scorer.floor(n, seed):.2f}" for seed in seeds)
    header = (
        f"FD with heun, {HEUN_STEPS} steps (35 NFE), {n} samples per FD, seeds "
        f"{'/'.join(map(str, seeds))} ({labels}), floor {floors} ({n} training images). "
        f"Minutes of training (sampling excluded); images = steps x batch. {cli.machine()}, "
        f"{device}.\n\n"
    )
    rows = []
    with Progress(console=console) as progress:
        for folder, points, rate in runs:
            for minutes, path in points if snapshots else points[-1:]:
                ckpt = checkpoint.load(path, device)
                fds = []
                for seed in seeds:
                    images = generate(ckpt, "heun", HEUN_STEPS, n, device, seed=seed,
                                      progress=progress, labels=labels)[0]  # fmt: skip
                    fds.append(scorer.fd(images)[0])
                cfg = ckpt.train_config
                images = ckpt.step * cfg.batch_size
                rows.append(dict(run=folder, recipe=recipe(cfg), rate=rate, minutes=minutes,
                                 step=ckpt.step, images=images, fds=fds))  # fmt: skip
                shown = " / ".join(f"{fd:.2f}" for fd in fds)
                progress.console.print(f"{folder}, {minutes:.3g} min: FD {shown}")
                files.save_text(runs_table(rows, header), out + ".md")
                wrote(out + ".md")
    console.print(runs_table(rows, header) + f"wrote {out}.md")


def heun_versus_stochastic(rows, ckpt_paths, nfe):
    """Per checkpoint: the best FD of the paper's SDE solvers, heun's, their ratio, as markdown."""
    ratios = []
    for ckpt_path in ckpt_paths:
        mine = [r for r in rows if r["ckpt_path"] == ckpt_path]
        stochastic = [r for r in mine if r["solver"] in sgm.INPAINTING_SOLVERS]
        heun = [r for r in mine if r["solver"] == "heun"]
        if stochastic and heun:
            best = min(stochastic, key=lambda r: r["fd"])
            ratios.append(
                f"| {mine[0]['sde']} | {best['fd']:.2f} ({best['solver']}) | {heun[0]['fd']:.2f} | "
                f"{heun[0]['fd'] / best['fd']:.2f}x |\n"
            )
    if not ratios:
        return ""
    header = (
        f"\n| SDE | best FD at {nfe} NFE | heun FD (35 NFE) | heun / best |\n|---|---|---|---|\n"
    )
    return header + "".join(ratios)


@main.command("compare")
@click.argument("ckpt_paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--solvers", default="heun,ode,em,pc", help="Comma-separated.")
@click.option("--nfe", type=click.IntRange(2, cli.MAX_STEPS), default=1000, help="SDEs' NFE.")
@click.option("--n", type=SAMPLES, default=1000, help="Samples per cell.")
@click.option("--out", default=None, help="Also write the tables to this markdown file.")
@click.option("--seed", type=cli.SEED, default=0)
@labels_option
@device_option
@data_options
def compare_command(ckpt_paths, solvers, nfe, n, out, seed, labels, device, classifier, data_root):
    """The SDE x solver table: FD, NFE and seconds of each checkpoint with each solver at its
    standard setting: the few-step solvers (heun, edm, dpmpp_*) at their default steps, the ODE
    adaptive (rtol = atol = 1e-5), the paper's SDE solvers at --nfe evaluations."""
    device = cli.resolve_device(device)
    chosen = [s.strip() for s in solvers.split(",") if s.strip()]
    if not chosen:
        raise click.ClickException("--solvers names no solver")
    for s in chosen:
        if s not in sgm.SOLVERS:
            raise click.ClickException(
                f"unknown solver {s!r}; choose from {', '.join(sgm.SOLVERS)}"
            )
    if out:
        cli.check_not_input(out, ckpt_paths)
        cli.check_writable(out)
    ckpts = [(path, checkpoint.load(path, device)) for path in ckpt_paths]  # all, first
    for (_, ckpt), solver in itertools.product(ckpts, chosen):
        check_arm(ckpt, solver, {})
    # pc spends two evaluations per step (one corrector step and the predictor), ald one
    steps = {
        s: nfe // (2 if s == "pc" else 1) if s in sgm.INPAINTING_SOLVERS else sgm.SOLVERS[s].steps
        for s in chosen
    }
    scorer, rows = Scorer(ckpts, classifier, data_root, device), []
    with Progress(console=console) as progress:
        for ckpt_path, ckpt in ckpts:
            sde_name = type(ckpt.sde).__name__
            for solver in chosen:
                images, spent, seconds = generate(
                    ckpt, solver, steps[solver], n, device, seed=seed, progress=progress,
                    labels=labels,
                )  # fmt: skip
                fd = scorer.fd(images)[0]
                cell = dict(solver=solver, nfe=spent, fd=fd, seconds=seconds)
                rows.append(dict(ckpt_path=ckpt_path, sde=sde_name, **cell))
                progress.console.print(
                    f"{sde_name} {solver}: FD {rows[-1]['fd']:.2f} at {spent:.0f} NFE, "
                    f"{seconds:.0f} s"
                )
    floor = scorer.floor(n, seed)
    header = (
        f"{n} samples per cell (seed {seed}, {labels_used(ckpts[0][1], labels)}), "
        f"real-data floor {floor:.2f} ({n} training images vs test); "
        f"{cli.machine()}, {device}.\n\n"
    )
    table = (
        f"| SDE | checkpoint | solver | NFE | FD | seconds for {n} |\n|---|---|---|---|---|---|\n"
        + "".join(
            f"| {r['sde']} | {r['ckpt_path']} | {r['solver']} | {r['nfe']:.0f} | {r['fd']:.2f} "
            f"| {r['seconds']:.0f} |\n"
            for r in rows
        )
    )
    summary = heun_versus_stochastic(rows, ckpt_paths, nfe)
    if out:
        files.save_text(header + table + summary, out)
        wrote(out)
    console.print(header + table + summary)


@main.command("export")
@click.argument("ckpt_path", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The exported file.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (else refused).")
@click.option("--half/--no-half", default=True, help="fp16 weights (fp32 again on load).")
@click.option(
    "--n",
    type=click.IntRange(0, cli.MAX_IMAGES),
    default=1000,
    help="Samples for the FD check before and after (at least 2); 0 skips it.",
)
@click.option("--seed", type=cli.SEED, default=0)
@device_option
@data_options
def export_command(ckpt_path, out, overwrite, half, n, seed, device, classifier, data_root):
    """Write a training checkpoint's EMA weights alone (no optimizer, no raw weights), to ship, and
    compare the FD of the exported weights with the original's on the same noise (heun, 35 NFE)."""
    device = cli.resolve_device(device)
    cli.check_not_input(out, [ckpt_path])
    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"--out {out} exists; give --overwrite to replace it")
    if n == 1:
        raise click.ClickException("--n 1: an FD needs at least 2 samples (0 skips the check)")
    cli.check_writable(out)
    exported = checkpoint.load(ckpt_path, "cpu", kind=None)  # the EMA weights, where it has them
    n = n if exported.kind == "score" else 0  # a noise-conditional classifier samples nothing
    scorer = Scorer([(ckpt_path, exported)], classifier, data_root, device) if n else None
    kind = "EMA weights" if exported.is_ema else "weights (the file has no EMA)"
    exported.is_ema = True  # stored as the EMA weights, alone
    exported.extra = {**exported.extra, "exported_from": ckpt_path, "half": half}
    checkpoint.save(out, exported, half=half)  # checkpoint.load casts fp16 back to fp32
    wrote(out)
    console.print(
        f"wrote {out}: {os.path.getsize(out) / 1e6:.2f} MB, {kind} of {ckpt_path} at step "
        f"{exported.step}{' in fp16' if half else ''}"
    )
    if n:
        fds = []
        for path in (ckpt_path, out):  # the same noise for both
            images = generate(
                checkpoint.load(path, device), "heun", HEUN_STEPS, n, device, seed=seed
            )[0]
            fds.append(scorer.fd(images)[0])
        console.print(
            f"FD with heun, 35 NFE, {n} samples: {fds[0]:.2f} original, {fds[1]:.2f} exported "
            f"| {cli.machine()}, {device}"
        )


class TutorialScoreNet(nn.Module):
    """The time-dependent U-Net of Song's widely used score-SDE tutorial (channels 32-64-128-256,
    ~1.1 M parameters), rebuilt here only to compare training throughput at the same batch size."""

    def __init__(self, channels=(32, 64, 128, 256), embed_dim=256):
        super().__init__()
        c = channels
        self.embed = nn.Sequential(
            sgm.GaussianFourierFeatures(embed_dim, 30.0), nn.Linear(embed_dim, embed_dim)
        )
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, c[0], 3, 1, bias=False),
                nn.Conv2d(c[0], c[1], 3, 2, bias=False),
                nn.Conv2d(c[1], c[2], 3, 2, bias=False),
                nn.Conv2d(c[2], c[3], 3, 2, bias=False),
            ]
        )
        self.tconvs = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[3], c[2], 3, 2, bias=False),
                nn.ConvTranspose2d(2 * c[2], c[1], 3, 2, bias=False, output_padding=1),
                nn.ConvTranspose2d(2 * c[1], c[0], 3, 2, bias=False, output_padding=1),
            ]
        )
        self.final = nn.ConvTranspose2d(2 * c[0], 1, 3, 1)
        outs = (c[0], c[1], c[2], c[3], c[2], c[1], c[0])
        self.denses = nn.ModuleList([nn.Linear(embed_dim, o) for o in outs])
        self.norms = nn.ModuleList(
            [nn.GroupNorm(4 if o == c[0] and k == 0 else 32, o) for k, o in enumerate(outs)]
        )

    def forward(self, x, t, labels=None):
        emb = F.silu(self.embed(t))
        hs, h = [], x
        for k, conv in enumerate(self.convs):
            h = F.silu(self.norms[k](conv(h) + self.denses[k](emb)[:, :, None, None]))
            hs.append(h)
        for k, tconv in enumerate(self.tconvs):
            h = tconv(h if k == 0 else torch.cat([h, hs[3 - k]], 1))
            h = F.silu(self.norms[4 + k](h + self.denses[4 + k](emb)[:, :, None, None]))
        return self.final(torch.cat([h, hs[0]], 1))


@main.command("guidance")
@ckpt_option
@click.option("--weights", default="0,1,3", help="Guidance weights w, comma-separated.")
@click.option("--n", type=SAMPLES, default=200, help="Samples per class and weight.")
@click.option("--solver", type=click.Choice(list(sgm.SOLVERS)), default="heun")
@steps_option
@click.option("--out", default=None, help="Also write the table to this markdown file.")
@click.option("--seed", type=cli.SEED, default=0)
@click.option("--noise-classifier", type=click.Path(), help="w weighs this classifier (eq. 14) "
              "on the unconditional score [classifier-free guidance].")  # fmt: skip
@device_option
@data_options
def guidance_command(ckpt_path, weights, n, solver, steps, out, seed, noise_classifier, device,
                     classifier, data_root):  # fmt: skip
    """Class accuracy (by the evaluation classifier) and per-class FD of guided samples, per w."""
    device, ckpt_path = cli.resolve_device(device), cli.find_checkpoint(ckpt_path)
    ckpt, steps = checkpoint.load(ckpt_path, device), steps or sgm.SOLVERS[solver].steps
    config, guide = ckpt.model_config, None
    if noise_classifier:
        guide = checkpoint.load(cli.find_checkpoint(noise_classifier), device, kind="classifier")
        checkpoint.check_guidance_pair(ckpt, guide, ckpt_path, noise_classifier)
    elif not config.num_classes:
        raise click.ClickException(f"{ckpt_path}: an unconditional checkpoint; give "
                                   "--noise-classifier or train one with labels")  # fmt: skip
    ws = parse_weights(weights)
    check_arm(ckpt, solver, {})
    if out:
        cli.check_not_input(out, [ckpt_path])
        cli.check_writable(out)
    scorer = Scorer([(ckpt_path, ckpt)], classifier, data_root, device)
    names, clf = (guide.classes, guide.classifier_fn()) if guide else (ckpt.classes, None)
    classes = range(len(names))
    floors = [scorer.floor(n, seed, label=c) for c in classes]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("guidance", total=len(ws) * len(classes))
        for w in ws:
            generator = torch.Generator(device).manual_seed(seed)
            accuracy, fds, start = [], [], time.time()
            for c in classes:
                labels = torch.full((n,), c, device=device)
                shape = (n, config.image_channels, config.image_size, config.image_size)
                if guide is None:
                    score = ckpt.score_fn(labels, w)
                else:  # eq. 14: the unconditional score plus w grad log p_t(y | x)
                    score = sgm.classifier_guided_score(ckpt.score_fn(), clf, labels, w)
                x, _ = sgm.sample(
                    score, ckpt.sde, shape, solver, steps, generator=generator, device=device
                )
                fd, histogram = scorer.fd(data.to_uint8(x, ckpt.data_range).cpu(), label=c)
                accuracy.append(float(histogram[c]) / n)
                fds.append(fd)
                progress.advance(task)
            rows.append((w, sum(accuracy) / len(classes), time.time() - start, fds))
    cells = lambda values: " | ".join(f"{v:.1f}" for v in values)
    table = f"| w | class accuracy | seconds | {' | '.join(f'FD {c}' for c in names)} |\n"
    table += "|---|---|---|" + "---|" * len(classes) + "\n"
    table += "".join(f"| {w:g} | {a:.3f} | {t:.0f} | {cells(fd)} |\n" for w, a, t, fd in rows)
    table += f"| floor | | | {cells(floors)} |\n"
    how = f"classifier guidance by {noise_classifier}" if guide else "classifier-free guidance"
    header = f"Guided samples ({how}): {solver}, {steps} steps, {n} per class; {ckpt_path}; "
    header += f"{cli.machine()}, {device}.\n\n"
    if out:
        files.save_text(header + table, out)
        wrote(out)
    console.print(header + table)


def parse_weights(text):
    """'0,1,3' -> [0.0, 1.0, 3.0], each a finite guidance weight."""
    ws = cli.parse_list(text, "--weights")
    for w in ws:
        cli.check_number("a guidance weight", w, 0, 1e3)
    return ws


@main.command("speed")
@click.option("--batch-size", type=click.IntRange(1, cli.MAX_BATCH), default=128)
@click.option("--channels", type=click.IntRange(4, 1024), help="Model width [the model's].")
@click.option(
    "--model",
    type=click.Choice(["default", "quick", "tutorial"]),
    default="default",
    help="default / quick: train.py's presets; tutorial: the ScoreNet of Song's popular tutorial.",
)
@click.option("--iters", type=click.IntRange(2), default=10)
@device_option
def speed_command(batch_size, channels, model, iters, device):
    """Training and sampling throughput (img/s) of a freshly initialised model on this device."""
    device = cli.resolve_device(device)
    cfg = checkpoint.TrainConfig(**checkpoint.PRESETS["quick" if model == "quick" else "default"])
    names = ("channel_mult", "num_res_blocks", "dropout")
    config = sgm.ModelConfig(channels=channels or cfg.channels, num_classes=10 * cfg.conditional,
                             **{name: getattr(cfg, name) for name in names})  # fmt: skip
    net = TutorialScoreNet() if model == "tutorial" else sgm.UNet(config)
    net = net.to(device).to(memory_format=torch.channels_last)
    sde, opt = sgm.VPSDE(), torch.optim.Adam(net.parameters(), 2e-4)
    shape = (batch_size, config.image_channels, config.image_size, config.image_size)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def timed(fn):
        fn()
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return iters * batch_size / (time.time() - start)

    def train_step():
        with autocast:
            loss = sgm.dsm_loss(net, sde, x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample_step():
        with autocast:
            sgm.predict_noise(net.eval(), sde, x, torch.rand(batch_size, device=device))
        net.train()

    train_rate, eval_rate = timed(train_step), timed(sample_step)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    console.print(
        f"{model} model ({params:.2f} M parameters), batch {batch_size}: "
        f"training {train_rate:.0f} img/s, one score evaluation {eval_rate:.0f} img/s "
        f"(heun at 35 NFE: {eval_rate / 35:.1f} img/s) | {cli.machine()}, {device}"
    )


@main.command("train-classifier")
@click.option("--data", "data_spec", default="fashion-mnist", help="A labelled dataset.")
@click.option("--image-size", type=click.IntRange(1, 4096), help="As train.py's.")
@click.option("--grayscale", is_flag=True, help="As train.py's.")
@cli.data_root_option
@click.option("--epochs", type=click.IntRange(1), help="[5, or enough for 2,000 steps]")
@click.option("--out", default=CLASSIFIER, show_default=True, help="The FD feature network.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (else refused).")
@click.option("--seed", type=cli.SEED, default=0)
@device_option
def train_classifier_command(data_spec, image_size, grayscale, data_root, epochs, out, overwrite,
                             seed, device):  # fmt: skip
    """Train the FD feature network on a labelled dataset (FashionMNIST's needs 92% test
    accuracy) and print its hash."""
    device = cli.resolve_device(device)
    fashion = data.same_data(data_spec, "fashion-mnist")
    if os.path.abspath(out) == CLASSIFIER and not fashion:
        raise click.ClickException(f"{CLASSIFIER} is FashionMNIST's feature network: give --out")
    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"--out {out} exists; give --overwrite to replace it")
    cli.check_writable(out)
    data.check_not_into(out, data_spec)
    data.check_image_size(image_size)
    train = data.load(data_spec, data_root, True, image_size, grayscale, note=console.print)
    test = data.load(data_spec, data_root, False, image_size, grayscale, note=console.print)
    if train.labels is None:
        raise click.ClickException(
            f"--data {data_spec} has no labels (no class subfolders): an FD feature network is "
            "trained to tell classes apart"
        )
    torch.manual_seed(seed)
    pixels = train.images.float() / 255
    meta = dict(data=train.source, image_size=image_size or 0, grayscale=grayscale,
                shape=train.shape, classes=train.classes, mean=float(pixels.mean()),
                std=float(pixels.std()))  # fmt: skip
    net = Classifier(train.shape, len(train.classes), meta["mean"], meta["std"]).to(device)
    fit_classifier(net, train, epochs, device)
    _, predicted = features_and_classes(net.eval(), test.images)
    accuracy = float((predicted == test.labels).float().mean())
    if fashion and accuracy < 0.92:
        raise click.ClickException(f"test accuracy {accuracy:.4f} is below 0.92; train longer "
                                   "(--epochs)")  # fmt: skip
    weights = {k: v.cpu() for k, v in net.state_dict().items()}
    files.save_torch({"format": CLASSIFIER_FORMAT, "weights": weights, **meta}, out)
    hint = " (set CLASSIFIER_SHA256 to it)" if os.path.abspath(out) == CLASSIFIER else ""
    console.print(
        f"test accuracy {accuracy:.4f} on {len(test.images)} test images of "
        f"{len(train.classes)} classes; wrote {out}, sha256 {sha256(out)}{hint}"
    )


def fit_classifier(net, train, epochs, device):
    """AdamW with a one-cycle schedule, random horizontal flips."""
    batch = min(128, len(train.images))
    per_epoch = len(train.images) // batch
    epochs = epochs or max(5, math.ceil(2000 / per_epoch))
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * per_epoch)
    with Progress(console=console) as progress:
        task = progress.add_task("classifier", total=epochs * per_epoch)
        for _ in range(epochs):
            perm = torch.randperm(len(train.images))
            for i in range(per_epoch):
                idx = perm[i * batch : (i + 1) * batch]
                images, flip = train.images[idx], torch.rand(len(idx)) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(3), images)
                loss = F.cross_entropy(net(images.to(device)), train.labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                progress.advance(task)


if __name__ == "__main__":
    main()
