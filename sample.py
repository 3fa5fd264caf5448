"""
Sample from a trained score-based model with any solver.

    python sample.py --n 64                                 # image grid, samples.png (dpmpp_2m_sde)
    python sample.py --solver ode --n 64                    # the probability-flow ODE, adaptive
    python sample.py --solver heun --steps 18 --out x.npz   # raw uint8 array (N, H, W)
    python sample.py --solver pc --n 16 --out traj.gif      # the reverse process, state | denoised
    python sample.py --solver edm --s-churn 5 --n 64        # EDM's stochastic sampler
    python sample.py --solver pc --predictor ancestral --corrector ald
    python sample.py --label sneaker --guidance 2 --n 16    # class-conditional models
    python sample.py --inpaint left --from-test 0 --n 8     # fill in the left half of test images
    python sample.py --interpolate 0 1 --n 10               # morph test image 0 into image 1

--ckpt defaults to the shipped checkpoints/fmnist.pt, else the newest runs/*/ckpt.pt. Without
--label, a class-conditional model samples p(x) = sum_y p(y) p(x | y): labels drawn from the
training classes' frequencies, w = 0 (--label none uses the dropped label's score instead).
"""

import dataclasses
import os
import sys
import time

import click
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import checkpoint
import data
import sgm

console = Console(stderr=True, soft_wrap=True)
MASKS = ("left", "right", "top", "bottom", "center", "random")
SOLVER_OPTIONS = ("predictor", "corrector", "snr", "corrector_steps", "rtol", "atol", "s_churn",
                  "s_tmin", "s_tmax", "s_noise", "eta")  # fmt: skip
PC, ODE, EDM, SDE2M = (data.solver_options(s) for s in ("pc", "ode", "edm", "dpmpp_2m_sde"))


@dataclasses.dataclass
class Options:
    """The command's options, by name, and the inpainting inputs derived from them."""

    ckpt_path: str
    solver: str
    n: int
    steps: int
    predictor: str
    corrector: str
    snr: float
    corrector_steps: int
    rtol: float
    atol: float
    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float
    eta: float
    eps: float
    seed: int
    device: str
    ema: bool
    batch_size: int
    out: str
    label: str
    guidance: float
    inpaint: str
    from_test: int
    interpolate: tuple
    data_dir: str
    mask: torch.Tensor = None  # (C, H, W), 1 where known: inpainting
    known: torch.Tensor = None  # uint8 test images (n, C, H, W) to inpaint

    def __post_init__(self):  # the combination of options, with the solver's defaults
        data.check_solver_options({**data.solver_options(self.solver), **self.solver_options}, True)

    @property
    def mode(self):
        return "inpaint" if self.inpaint else "interpolate" if self.interpolate else "sample"

    @property
    def given_options(self):  # the solver options on the command line; the rest keep sgm's defaults
        return {
            name: getattr(self, name) for name in SOLVER_OPTIONS if getattr(self, name) is not None
        }

    @property
    def solver_options(self):  # those of the given options that this solver takes
        takes = data.solver_options(self.solver)
        return {name: value for name, value in self.given_options.items() if name in takes}


class Command(click.Command):
    """The one error handler: library errors (bad checkpoint, a solver the SDE lacks, ...) become
    one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except sgm.SGMError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full disk, a read-only folder, ...: files written stay intact
            raise click.ClickException(f"{e.filename or 'I/O'}: {e.strerror or e}") from None
        except KeyboardInterrupt:
            console.print("interrupted; nothing written")
            sys.exit(130)


def parse_label(text, ckpt):
    """'all', 'none', a class index or a FashionMNIST class name -> 'all', 'none' or an int."""
    num_classes = ckpt.model_config.num_classes
    if text == "none" or (text == "all" and num_classes):
        return text
    if not num_classes:
        raise click.ClickException("--label needs a class-conditional checkpoint (--conditional)")
    name = text.lower().replace("_", "-").replace(" ", "-")
    if name in data.CLASSES:
        return data.CLASSES.index(name)
    if text.isascii() and text.isdigit() and int(text) < num_classes:  # "²" is a digit too
        return int(text)
    raise click.ClickException(
        f"unknown --label {text!r}: use 0-{num_classes - 1}, 'all', 'none' or one of "
        + ", ".join(data.CLASSES)
    )


def make_labels(opts, ckpt):
    """(labels (n,) or None, images per row, the guidance weight, what the labels are). Without
    --label, a conditional model draws them from the class prior: p(x) = sum_y p(y) p(x | y)."""
    n, num_classes = opts.n, ckpt.model_config.num_classes
    target = parse_label(opts.label, ckpt) if opts.label is not None else None
    if target is None and (not num_classes or opts.mode != "sample"):
        target = "none"  # inpainting, interpolation: a drawn class would fight the test image
    if target == "none":
        if opts.guidance:
            raise click.ClickException(
                "--guidance needs labels (a conditional model, no --label none)"
            )
        return None, min(n, 8), 0.0, "the dropped label's score" if num_classes else "unconditional"
    guidance = opts.guidance if opts.guidance is not None else 0.0 if target is None else 1.0
    if target == "all":
        per_class = max(1, n // num_classes)  # one row per class
        labels = torch.arange(num_classes, device=opts.device).repeat_interleave(per_class)
        return labels, per_class, guidance, f"one row per class, w = {guidance:g}"
    if target is None:
        labels = ckpt.prior_labels(n, opts.seed, opts.device)
        what = "labels drawn from the training classes' frequencies (--label none: dropped label)"
    else:
        labels = torch.full((n,), target, device=opts.device)
        what = f"label {data.CLASSES[target] if num_classes == len(data.CLASSES) else target}"
    return labels, min(n, 8), guidance, f"{what}, w = {guidance:g}"


def make_mask(name, shape, generator):
    """1 where pixels are known. shape (C, H, W)."""
    C, H, W = shape
    mask = torch.zeros(shape)
    if name == "left":
        mask[..., W // 2 :] = 1
    elif name == "right":
        mask[..., : W // 2] = 1
    elif name == "top":
        mask[:, H // 2 :] = 1
    elif name == "bottom":
        mask[:, : H // 2] = 1
    elif name == "center":
        mask[:] = 1
        mask[:, H // 4 : H - H // 4, W // 4 : W - W // 4] = 0
    else:
        mask = (torch.rand((1, H, W), generator=generator) < 0.5).float().expand(C, H, W).clone()
    return mask


def check_output(out):
    """The suffix of --out, after checking that it can be written (nothing is created yet)."""
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".png", ".npz", ".gif"):
        raise click.ClickException(
            f"--out {out}: the suffix must be .png (grid), .npz (array) or .gif (animation)"
        )
    data.check_writable(out)
    return suffix


def load_test_images(ckpt, mode, data_dir):
    """FashionMNIST test images and labels, for --inpaint and --interpolate."""
    shape = (ckpt.model_config.image_channels, ckpt.model_config.image_size)
    if shape != (1, 28):
        raise click.ClickException(
            f"the checkpoint is for {shape[0]}x{shape[1]}x{shape[1]} images, but --{mode} takes "
            "FashionMNIST test images (1x28x28)"
        )
    return data.load_fashion_mnist(data_dir, train=False)


def run_chunks(ckpt, labels, opts, progress, frames):
    """Sample (or inpaint) opts.n images, opts.batch_size at a time. Returns (x, NFE per image)."""
    shape = (
        ckpt.model_config.image_channels,
        ckpt.model_config.image_size,
        ckpt.model_config.image_size,
    )
    generator = torch.Generator(opts.device).manual_seed(opts.seed)
    chunks = [(lo, min(opts.n, lo + opts.batch_size)) for lo in range(0, opts.n, opts.batch_size)]
    task = progress.add_task("", total=len(chunks), status="")
    outputs, nfes = [], []
    for c, (lo, hi) in enumerate(chunks):

        def callback(info, c=c):
            done = (ckpt.sde.T - info["t"]) / (ckpt.sde.T - opts.eps)
            progress.update(task, completed=c + done, status=f"t = {info['t']:.4f}")
            if (
                opts.out.lower().endswith(".gif")
                and c == 0
                and info["i"] % max(1, opts.steps // 50) == 0
            ):  # ~50 frames
                images = (info["x"][:64], info["denoised"][:64])
                frames.append(tuple(data.to_uint8(x, ckpt.data_range).cpu() for x in images))

        score_fn = ckpt.score_fn(None if labels is None else labels[lo:hi], opts.guidance)
        kwargs = dict(opts.solver_options, eps=opts.eps, generator=generator, callback=callback)
        if opts.mask is None:
            x, nfe = sgm.sample(score_fn, ckpt.sde, (hi - lo, *shape), opts.solver, opts.steps,
                                device=opts.device, **kwargs)  # fmt: skip
        else:
            known = data.to_model_range(opts.known[lo:hi], ckpt.data_range).to(opts.device)
            x, nfe = sgm.inpaint(
                score_fn, ckpt.sde, known, opts.mask, opts.solver, opts.steps, **kwargs
            )
            masked = opts.mask * known + (1 - opts.mask) * ckpt.data_range[1]
            x = torch.stack([known, masked, x])  # (3, b, C, H, W): rows original, masked, filled
        outputs.append(x)
        nfes.append(nfe)
        progress.update(task, completed=c + 1)
        if not console.is_terminal:  # redirected: the bar shows nothing until the end
            console.print(f"{opts.solver}: {hi} of {opts.n} images", highlight=False)
    x = torch.cat(outputs, dim=1).flatten(0, 1) if opts.mask is not None else torch.cat(outputs)
    return x, sum(nfes) / len(nfes)


def slerp(z_a, z_b, weight):
    """Spherical interpolation between latents (B, ...), weight in [0, 1]."""
    a, b = z_a.flatten(1), z_b.flatten(1)
    cosine = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1, keepdim=True)  # (B, 1)
    omega = torch.arccos(cosine.clamp(-1, 1))
    sin_omega = omega.sin().clamp_min(1e-8)
    arc = (((1 - weight) * omega).sin() * a + (weight * omega).sin() * b) / sin_omega
    line = (1 - weight) * a + weight * b  # for (nearly) parallel latents
    return torch.where(sin_omega > 1e-6, arc, line).reshape(z_a.shape)


def interpolate(score_fn, sde, x_a, x_b, n=8, **kwargs):
    """n images (n, ...) morphing x_a (1, ...) into x_b along spherical interpolation of their
    probability-flow ODE latents (sgm.encode, sgm.decode), and the NFE per image."""
    z, nfe_encode = sgm.encode(score_fn, sde, torch.cat([x_a, x_b]), **kwargs)
    weights = torch.linspace(0, 1, n, device=z.device)
    latents = torch.cat([slerp(z[:1], z[1:], float(w)) for w in weights])
    x, nfe_decode = sgm.decode(score_fn, sde, latents, **kwargs)
    return x, nfe_encode + nfe_decode


def write_output(x, frames, labels, ckpt, out, nrow):
    suffix = os.path.splitext(out)[1].lower()
    if suffix == ".png":
        data.save_png(x, ckpt.data_range, out, nrow)
    elif suffix == ".npz":
        data.save_npz(x, ckpt.data_range, out, labels)
    else:
        final = data.to_uint8(x[:64], ckpt.data_range).cpu()
        data.save_gif(
            frames[:: max(1, len(frames) // 50)] + [(final, final)], out, min(8, len(final))
        )


@click.command(
    cls=Command, context_settings={"help_option_names": ["-h", "--help"], "show_default": True}
)
@click.option(
    "--ckpt",
    "ckpt_path",
    type=click.Path(dir_okay=False),
    help="Checkpoint [checkpoints/fmnist.pt, else newest runs/*/ckpt.pt].",
)
@click.option(
    "--solver",
    type=click.Choice(list(sgm.SOLVERS)),
    default="dpmpp_2m_sde",
    help="See the README's solver table [dpmpp_2m_sde: the best FD per second measured].",
)
@click.option(
    "--n", type=click.IntRange(1), help="Images [64; 8 with --inpaint, 10 with --interpolate]."
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    help="Time steps [the solver's: 1000 for the paper's SDE solvers; heun, edm 18; dpmpp_2m 20; "
    "dpmpp_2m_sde 20; unused by ode].",
)
@click.option(
    "--snr",
    type=data.Number(*data.OPTION_RANGES["snr"]),
    help=f"Langevin signal-to-noise ratio (pc, ald) [{PC['snr']}].",
)
@click.option(
    "--corrector-steps",
    type=click.IntRange(0),
    help=f"Corrector steps per time step (pc, ald) [{PC['corrector_steps']}].",
)
@click.option(
    "--predictor",
    type=click.Choice(list(sgm.PREDICTORS)),
    help=f"pc's predictor [{PC['predictor']}].",
)
@click.option(
    "--corrector",
    type=click.Choice(list(sgm.CORRECTORS)),
    help=f"pc's corrector [{PC['corrector']}].",
)
@click.option(
    "--rtol",
    type=data.Number(*data.OPTION_RANGES["rtol"]),
    help=f"ode relative tolerance [{ODE['rtol']}].",
)
@click.option(
    "--atol",
    type=data.Number(*data.OPTION_RANGES["atol"]),
    help=f"ode absolute tolerance [{ODE['atol']}].",
)
@click.option(
    "--s-churn",
    "--churn",
    "s_churn",
    type=data.Number(*data.OPTION_RANGES["s_churn"]),
    help=f"edm: churn S_churn, 0-1000 [{EDM['s_churn']}].",
)
@click.option(
    "--s-tmin",
    type=data.Number(*data.OPTION_RANGES["s_tmin"]),
    help=f"edm: churn from this noise level [{EDM['s_tmin']}].",
)
@click.option(
    "--s-tmax",
    type=data.Number(*data.OPTION_RANGES["s_tmax"]),
    help=f"edm: churn up to this noise level [{EDM['s_tmax']}].",
)
@click.option(
    "--s-noise",
    type=data.Number(*data.OPTION_RANGES["s_noise"]),
    help=f"edm, dpmpp_2m_sde: noise scale, 0-2 [{EDM['s_noise']}].",
)
@click.option(
    "--eta",
    type=data.Number(*data.OPTION_RANGES["eta"]),
    help=f"dpmpp_2m_sde: stochasticity, 0-1 [{SDE2M['eta']}].",
)
@click.option("--eps", type=data.Number(0, 0.5, low_open=True), default=1e-3, help="Final time.")
@click.option("--seed", type=int, default=0)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--ema/--no-ema", default=True, help="Sample with the EMA weights.")
@click.option("--batch-size", type=click.IntRange(1), default=256, help="Images per chunk.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="samples.png",
    help=".png grid, .npz uint8 array or .gif animation.",
)
@click.option(
    "--label",
    help="Class index, class name (sneaker, ankle-boot, ...), 'all' (one row per class) or 'none' "
    "(the dropped label) [labels drawn from the training classes' frequencies].",
)
@click.option(
    "--guidance",
    type=data.Number(0, 1e3),
    help="Classifier-free guidance weight w [1 with --label, else 0].",
)
@click.option(
    "--inpaint", type=click.Choice(MASKS), help="Fill in the masked part of test images [with pc]."
)
@click.option(
    "--from-test",
    type=click.IntRange(0, 9999),
    default=0,
    help="First test-set index for --inpaint.",
)
@click.option(
    "--interpolate", type=click.IntRange(0, 9999), nargs=2, help="Morph test image A into B."
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default=data.DATA_DIR,
    help="FashionMNIST folder.",
)
def main(**flags):
    """Sample images from a score-based model (Song et al. 2021)."""
    source = click.get_current_context().get_parameter_source("solver")
    if flags["inpaint"] and source == click.core.ParameterSource.DEFAULT:
        flags["solver"] = "pc"  # the default solver cannot inpaint
    if flags["interpolate"]:  # encoding and decoding are the probability-flow ODE's
        if source == click.core.ParameterSource.COMMANDLINE and flags["solver"] != "ode":
            console.print(f"note: --interpolate uses the ODE, not {flags['solver']}")
        flags["solver"] = "ode"
    opts = Options(**flags)
    suffix = check_output(opts.out)
    opts.device = data.resolve_device(opts.device)
    opts.ckpt_path = opts.ckpt_path or data.default_checkpoint()
    ckpt = checkpoint.load(opts.ckpt_path, opts.device, use_ema=opts.ema)
    opts.n = opts.n or {"sample": 64, "inpaint": 8, "interpolate": 10}[opts.mode]
    opts.steps = opts.steps or sgm.SOLVERS[opts.solver].steps
    if opts.mode == "interpolate" and opts.label not in (None, "none"):
        raise click.ClickException(
            "--interpolate decodes through the ODE without labels: drop --label"
        )
    labels, nrow, opts.guidance, labels_used = make_labels(opts, ckpt)
    opts.n = len(labels) if labels is not None else opts.n
    if opts.mode != "sample":
        images = check_test_inputs(opts, ckpt, suffix)
    warn_unused_options(opts)
    console.print(f"{opts.solver}: {labels_used}", highlight=False)

    start, frames = time.time(), []
    columns = (BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(TextColumn(opts.solver), *columns, console=console) as progress:
        if opts.mode == "interpolate":
            progress.add_task("", total=None, status="encoding and decoding through the ODE")
            a, b = (
                data.to_model_range(images[i : i + 1], ckpt.data_range) for i in opts.interpolate
            )
            a, b = a.to(opts.device), b.to(opts.device)
            kwargs = dict(eps=opts.eps, **opts.solver_options)  # the ODE's rtol and atol
            x, nfe = interpolate(ckpt.score_fn(), ckpt.sde, a, b, opts.n, **kwargs)
            x, nrow = torch.cat([a, x, b]), opts.n + 2
        else:
            if opts.mode == "inpaint":
                generator = torch.Generator().manual_seed(opts.seed)
                opts.mask = make_mask(opts.inpaint, images.shape[1:], generator).to(opts.device)
                opts.known, nrow = images[opts.from_test : opts.from_test + opts.n], opts.n
            x, nfe = run_chunks(ckpt, labels, opts, progress, frames)
    wall = time.time() - start
    write_output(x, frames, labels, ckpt, opts.out, nrow)
    source = f"from {opts.ckpt_path}"
    if opts.mode != "sample":
        source = f"{opts.mode}, from {os.path.basename(opts.ckpt_path)}"
    console.print(
        f"[bold]{opts.solver}[/]: {opts.n} images, {nfe:.0f} NFE per sample, {wall:.1f} s, "
        f"{opts.n / wall:.2f} img/s on {opts.device} -> {opts.out} ({source})"
    )


def warn_unused_options(opts):
    """Name the solver options given on the command line that the solver does not take."""
    for name in [name for name in opts.given_options if name not in opts.solver_options]:
        flag = "--" + name.replace("_", "-")
        console.print(f"note: {opts.solver} does not use {flag}; ignored", highlight=False)


def check_test_inputs(opts, ckpt, suffix):
    """For --inpaint and --interpolate: check the options, then load the test images."""
    if suffix != ".png":
        raise click.ClickException(f"--{opts.mode} writes a .png grid; got --out {opts.out}")
    images = load_test_images(ckpt, opts.mode, opts.data_dir)[0]
    if opts.mode == "inpaint" and opts.solver not in sgm.INPAINTING_SOLVERS:
        names = ", ".join(sgm.INPAINTING_SOLVERS)
        raise click.ClickException(
            f"--inpaint needs a solver that re-noises every step ({names}), not {opts.solver}"
        )
    if opts.mode == "inpaint" and opts.from_test + opts.n > len(images):
        raise click.ClickException(
            f"--from-test {opts.from_test} --n {opts.n} runs past the {len(images)} test images"
        )
    return images


if __name__ == "__main__":
    main()
