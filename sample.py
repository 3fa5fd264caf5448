"""
Sample from a trained score-based model with any solver.

    python sample.py --n 64                                 # image grid, samples.png (dpmpp_2m_sde)
    python sample.py --ckpt runs/quick --n 16               # a train.py run folder: its ckpt.pt
    python sample.py --solver ode --n 64                    # the probability-flow ODE, adaptive
    python sample.py --solver heun --steps 18 --out x.npz   # raw uint8 array (N, H, W)
    python sample.py --solver pc --n 16 --out traj.gif      # the reverse process, state | denoised
    python sample.py --solver edm --s-churn 5 --n 64        # EDM's stochastic sampler
    python sample.py --solver pc --predictor ancestral --corrector ald
    python sample.py --label sneaker --guidance 2 --n 16    # class-conditional models
    python sample.py --inpaint left --from-test 0 --n 8     # fill in the left half of test images
    python sample.py --interpolate 0 1 --n 10               # morph test image 0 into image 1
    python sample.py --classifier runs/clf --label sneaker  # classifier guidance (eq. 14)
    python sample.py --ckpt runs/rgb --colorize --n 8       # colour gray test images (RGB models)

Test images are those of the checkpoint's dataset (its test split), or of --data.
"""

import os
import time
import unicodedata

import click
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import checkpoint
import cli
import data
import files
import sgm

console = Console(file=cli.ConsoleStream(), soft_wrap=True)  # a closed pipe costs no result
MASKS = ("left", "right", "top", "bottom", "center", "random")
N_DEFAULT = {"sample": 64, "inpaint": 8, "interpolate": 10, "colorize": 8}
STEPS = {name: "adaptive" if name == "ode" else s.steps for name, s in sgm.SOLVERS.items()}
SOLVER_OPTIONS = {solver: cli.solver_options(solver) for solver in sgm.SOLVERS}  # with defaults
SOLVER_FLAGS = {"predictor": "Predictor", "corrector": "Corrector", "snr": "Signal-to-noise ratio",
                "corrector_steps": "Corrector steps per time step", "rtol": "Relative tolerance",
                "atol": "Absolute tolerance", "s_churn": "Churn",
                "s_tmin": "Churn from this noise level", "s_tmax": "Churn up to this noise level",
                "s_noise": "Noise scale", "eta": "Stochasticity"}  # fmt: skip


def per_solver(values):
    """{solver: value} -> 'pc, ald: 0.16; ode: 1e-05', for the help."""
    groups = {value: [key for key in values if values[key] == value] for value in values.values()}
    return "; ".join(f"{', '.join(solvers)}: {value}" for value, solvers in groups.items())


def solver_flags(command):
    """A flag per solver option, None unless given; its help names its solvers and defaults."""
    for name, what in reversed(SOLVER_FLAGS.items()):
        defaults = {s: takes[name] for s, takes in SOLVER_OPTIONS.items() if name in takes}
        kind = cli.option_type(name, next(iter(defaults.values())))
        if isinstance(kind, cli.Number):  # its range; "(" where the low end is excluded
            what += f" in {'(' if kind.low_open else '['}{kind.low:g}, {kind.high:g}]"
        flags = ["--" + name.replace("_", "-"), *(["--churn"] if name == "s_churn" else []), name]
        command = click.option(*flags, type=kind, help=f"{what} [{per_solver(defaults)}].")(command)
    return command


class Command(cli.Command):  # cli.Command's one-line errors; Ctrl-C exits 130, writing nothing
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            console.print("interrupted; nothing written")
            raise SystemExit(130) from None


def make_labels(text, ckpt, n, mode, seed):
    """--label -> (labels (n,) or None, what they are). Without it, a conditional model draws them
    from the class prior, sampling p(x) = sum_y p(y) p(x | y); for test images, it takes none."""
    classes, names = ckpt.model_config.num_classes, [label_key(c) for c in ckpt.classes]
    name = label_key(text) if text else None
    digit = text and text.isascii() and text.isdigit() and int(text) < classes  # not "²"
    if text in (None, "all", "none"):  # the keywords first, then a class name, then an index
        target = text
    else:
        target = names.index(name) if name in names else int(text) if digit else text
    if text not in (None, "none") and not classes:
        raise click.ClickException("--label needs a class-conditional checkpoint (--conditional)")
    if target not in (None, "none", "all") and not isinstance(target, int):
        raise click.ClickException(f"unknown --label {text!r}: use 0-{classes - 1}, 'all', "
                                   f"'none' or one of {', '.join(ckpt.classes)}")  # fmt: skip
    if target == "none" or not classes or target is None and mode != "sample":
        return None, "the dropped label's score" if classes else "unconditional"
    if target == "all":
        return torch.arange(classes).repeat_interleave(max(1, n // classes)), "one row per class"
    if target is None:
        what = "labels drawn from the training classes' frequencies (--label none: dropped label)"
        return ckpt.prior_labels(n, seed), what
    return torch.full((n,), target), f"label {ckpt.classes[target]}"


def label_key(name):
    """How --label matches a class name: 'Ankle boot', 'ankle_boot' and 'ankle-boot' alike."""
    return unicodedata.normalize("NFC", name).lower().replace("_", "-").replace(" ", "-")


def test_images(ckpt, spec, root):
    """The test split of the checkpoint's dataset (or of --data), as the checkpoint saw it."""
    cfg = ckpt.train_config
    dataset = data.load_shaped(spec or cfg.data, root, False, cfg.image_size, cfg.grayscale,
                               ckpt.shape, "the checkpoint", note=console.print)  # fmt: skip
    return dataset.images


def make_mask(name, shape, generator):
    """1 where pixels are known, (C, H, W): 0 on the named part, which is to be filled in."""
    C, H, W = shape
    if name == "random":
        return (torch.rand((1, H, W), generator=generator) < 0.5).float().expand(C, H, W).clone()
    every, middle = slice(None), (slice(H // 4, H - H // 4), slice(W // 4, W - W // 4))
    rows, cols = {"left": (every, slice(W // 2)), "right": (every, slice(W // 2, W)),
                  "top": (slice(H // 2), every), "bottom": (slice(H // 2, H), every),
                  "center": middle}[name]  # fmt: skip
    mask = torch.ones(shape)
    mask[:, rows, cols] = 0
    return mask


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


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"],
                                              "show_default": True})  # fmt: skip
@click.option("--ckpt", "ckpt_path", type=click.Path(), help="Checkpoint or train.py run folder "
              "[checkpoints/fmnist.pt, else the newest runs/*/ckpt.pt].")  # fmt: skip
@click.option("--solver", type=click.Choice(list(sgm.SOLVERS)), help="See the README's solver "
              "table [dpmpp_2m_sde; pc with --inpaint, ode with --interpolate].")  # fmt: skip
@click.option(
    "--n", type=click.IntRange(1, cli.MAX_IMAGES), help=f"Images [{per_solver(N_DEFAULT)}]."
)
@click.option(
    "--steps", type=click.IntRange(1, cli.MAX_STEPS), help=f"Time steps [{per_solver(STEPS)}]."
)
@solver_flags
@click.option("--eps", type=cli.Number(0, 0.5, low_open=True), default=1e-3, help="Final time.")
@click.option("--seed", type=cli.SEED, default=0)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--ema/--no-ema", default=True, help="Sample with the EMA weights.")
@click.option(
    "--batch-size", type=click.IntRange(1, cli.MAX_BATCH), default=256, help="Images per chunk."
)
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png",
              help=".png grid, .npz uint8 array or .gif animation.")  # fmt: skip
@click.option("--label", help="Class index or name (sneaker, ankle-boot, ...), 'all' (a row per "
              "class) or 'none' (the dropped label) [drawn from the class prior].")  # fmt: skip
@click.option("--guidance", type=cli.Number(0, 1e3), help="Guidance w [1 with --label, else 0].")
@click.option("--classifier", "classifier_path", type=click.Path(), help="A noise-conditional "
              "classifier (train.py --classifier) that guides --label (eq. 14).")  # fmt: skip
@click.option("--classifier-scale", type=cli.Number(0, 1e3), help="Its weight w [1: the paper's].")
@click.option("--inpaint", type=click.Choice(MASKS), help="Fill in part of test images [pc].")
@click.option("--colorize", is_flag=True, help="Colour gray versions of test images (RGB models).")
@click.option("--from-test", type=click.IntRange(0, 9999), default=0, help="First test image.")
@click.option("--interpolate", "pair", type=click.IntRange(0, 9999), nargs=2,
              help="Morph test image A into B.")  # fmt: skip
@click.option(
    "--data",
    "data_spec",
    help="Test images for --inpaint/--colorize/--interpolate: a dataset "
    "as train.py takes it [the checkpoint's].",
)
@cli.data_root_option
def main(ckpt_path, solver, n, steps, eps, seed, device, ema, batch_size, out, label, guidance,
         classifier_path, classifier_scale, inpaint, colorize, from_test, pair, data_spec,
         data_root, **flags):  # fmt: skip
    """Sample images from a score-based model (Song et al. 2021)."""
    # Configure: the task, the solver and its options, the output; all checked before any work
    if sum(map(bool, (inpaint, colorize, pair))) > 1:
        raise click.ClickException("give one of --inpaint, --colorize and --interpolate")
    mode = "inpaint" if inpaint else "colorize" if colorize else "interpolate" if pair else "sample"
    check_classifier_flags(classifier_path, classifier_scale, label, guidance, mode)
    if mode == "interpolate" and solver not in (None, "ode"):  # the ODE encodes and decodes
        console.print(f"note: --interpolate uses the ODE, not {solver}")
    imputes = mode in ("inpaint", "colorize")
    solver = "ode" if mode == "interpolate" else solver or ("pc" if imputes else "dpmpp_2m_sde")
    given = {name: flags[name] for name in SOLVER_FLAGS if flags[name] is not None}
    options = {name: value for name, value in given.items() if name in SOLVER_OPTIONS[solver]}
    cli.check_solver_options({**SOLVER_OPTIONS[solver], **options}, flags=True)
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".png", ".npz", ".gif"):
        raise click.ClickException(f"--out {out}: the suffix must be .png, .npz or .gif")
    if mode != "sample" and suffix != ".png":
        raise click.ClickException(f"--{mode} writes a .png grid; got --out {out}")
    if imputes and solver not in sgm.INPAINTING_SOLVERS:
        raise click.ClickException(f"--{mode} needs a solver that re-noises every step ("
                                   f"{', '.join(sgm.INPAINTING_SOLVERS)})")  # fmt: skip
    if mode == "interpolate" and label not in (None, "none"):
        raise click.ClickException("--interpolate decodes without labels: drop --label")
    cli.check_writable(out)
    for flag in ["--" + name.replace("_", "-") for name in given if name not in options]:
        console.print(f"note: {solver} does not use {flag}; ignored", highlight=False)
    if solver == "ode" and steps is not None:
        console.print("note: ode does not use --steps (it is adaptive: --rtol, --atol); ignored")

    # Load: the checkpoint, the labels and, to inpaint or interpolate, test images
    ckpt_path, device = cli.find_checkpoint(ckpt_path), cli.resolve_device(device)
    cli.check_not_input(out, [ckpt_path])
    ckpt = checkpoint.load(ckpt_path, device, use_ema=ema)
    for spec in {ckpt.train_config.data, data_spec or ckpt.train_config.data}:
        data.check_not_into(out, spec)  # a sample among the training images, or over them
    if data_spec and mode == "sample":
        console.print("note: --data gives the test images of --inpaint, --colorize and "
                      "--interpolate; ignored")  # fmt: skip
    cli.check_solver_runs(ckpt.sde, solver, options)  # ancestral on sub-VP: refused before work
    if mode == "colorize" and ckpt.shape[0] != 3:
        raise click.ClickException(f"--colorize needs an RGB model; {ckpt_path} is for "
                                   f"{data.shape_text(ckpt.shape)} images")  # fmt: skip
    n, steps = n or N_DEFAULT[mode], steps or sgm.SOLVERS[solver].steps
    clf = None
    if classifier_path:  # eq. 14 with a classifier: the model's unconditional score, plus w grad
        classifier_path = cli.find_checkpoint(classifier_path)
        clf = checkpoint.load(classifier_path, device, use_ema=ema, kind="classifier")
        checkpoint.check_guidance_pair(ckpt, clf, ckpt_path, classifier_path)
    labels, labels_used = make_labels(label, clf or ckpt, n, mode, seed)
    if labels is None and guidance:
        raise click.ClickException("--guidance needs labels (a conditional model, no --label none)")
    if clf is not None:
        classifier_scale = 1.0 if classifier_scale is None else classifier_scale
        score = "the dropped label's" if ckpt.model_config.num_classes else "the unconditional"
        labels, n = labels.to(device), len(labels)
        labels_used += f" by the classifier, w = {classifier_scale:g}, on {score} score"
    elif labels is not None:  # w = 1 for a label asked for, else 0
        guidance = guidance if guidance is not None else float(label is not None)
        labels, n, labels_used = labels.to(device), len(labels), f"{labels_used}, w = {guidance:g}"
    nrow = n // (clf or ckpt).model_config.num_classes if label == "all" else min(n, 8)
    shape = ckpt.shape
    if mode != "sample":  # the images to inpaint, or A and B
        images = test_images(ckpt, data_spec, data_root)
        last = max(pair) if mode == "interpolate" else from_test + n - 1
        if last >= len(images):
            what = "--interpolate" if mode == "interpolate" else f"--from-test {from_test} --n {n}"
            raise click.ClickException(f"{what} runs past the {len(images)} test images")
        index = list(pair) if mode == "interpolate" else slice(from_test, from_test + n)
        test = data.to_model_range(images[index], ckpt.data_range).to(device)
    if mode == "colorize":  # rows of n: the test images, their gray versions, the colourings
        gray, nrow = test.mean(1, keepdim=True).expand_as(test), n
    if mode == "inpaint":  # rows of n: the test images, their known part, the filled-in images
        mask, nrow = make_mask(inpaint, shape, torch.Generator().manual_seed(seed)).to(device), n
    console.print(f"{solver}: {labels_used}", highlight=False)

    # Generate: n images, batch_size at a time (interpolation: one ODE solve), with a progress bar
    start, frames, outputs = time.time(), [], []  # outputs: (images, NFE) of each chunk
    generator = torch.Generator(device).manual_seed(seed)
    chunks = range(0, n if mode != "interpolate" else 0, batch_size)
    columns = (BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(TextColumn(solver), *columns, console=console) as progress:
        status = "encoding and decoding through the ODE" if mode == "interpolate" else ""
        task = progress.add_task("", total=len(chunks) or None, status=status)
        if mode == "interpolate":  # A, the n images between, B
            x, nfe = interpolate(ckpt.score_fn(), ckpt.sde, *test.split(1), n, eps=eps, **options)
            outputs, nrow = [(torch.cat([test[:1], x, test[1:]]), nfe)], n + 2
        for c, lo in enumerate(chunks):
            hi = min(n, lo + batch_size)

            def callback(info, c=c):  # the bar within a chunk, the first chunk's GIF frames
                done = (ckpt.sde.T - info["t"]) / (ckpt.sde.T - eps)
                progress.update(task, completed=c + done, status=f"t = {info['t']:.4f}")
                if suffix == ".gif" and c == 0 and info["i"] % max(1, steps // 50) == 0:
                    shown = (info["x"][:64], info["denoised"][:64])
                    frames.append(tuple(data.to_uint8(v, ckpt.data_range).cpu() for v in shown))

            if clf is not None:
                score_fn = sgm.classifier_guided_score(ckpt.score_fn(), clf.classifier_fn(),
                                                       labels[lo:hi], classifier_scale)  # fmt: skip
            else:
                score_fn = ckpt.score_fn(None if labels is None else labels[lo:hi], guidance)
            common = dict(eps=eps, generator=generator, device=device, callback=callback, **options)
            if mode == "colorize":
                outputs.append(
                    sgm.colorize(score_fn, ckpt.sde, gray[lo:hi], solver, steps, **common)
                )
            else:
                inputs = dict(known=test[lo:hi], mask=mask) if mode == "inpaint" else {}
                outputs.append(sgm.sample(score_fn, ckpt.sde, (hi - lo, *shape), solver, steps,
                                          **common, **inputs))  # fmt: skip
            progress.update(task, completed=c + 1)
            if not console.is_terminal:  # redirected: the bar shows nothing until the end
                console.print(f"{solver}: {hi} of {n} images", highlight=False)
    xs, nfes = zip(*outputs, strict=True)
    x, nfe, wall = torch.cat(xs), sum(nfes) / len(nfes), time.time() - start
    if mode == "inpaint":
        x = torch.stack([test, mask * test + (1 - mask) * ckpt.data_range[1], x]).flatten(0, 1)
    if mode == "colorize":
        x = torch.stack([test, gray, x]).flatten(0, 1)

    # Write: a grid, an array, or the reverse process (~50 frames, then the samples)
    if suffix == ".png":
        files.save_png(x, ckpt.data_range, out, nrow)
    elif suffix == ".npz":
        files.save_npz(x, ckpt.data_range, out, labels)
    else:
        final = data.to_uint8(x[:64], ckpt.data_range).cpu()
        frames = frames[:: max(1, len(frames) // 50)] + [(final, final)]
        files.save_gif(frames, out, min(8, len(final)))
    source = f"from {ckpt_path}" if mode == "sample" else f"{mode}, from {ckpt_path}"
    console.print(f"[bold]{solver}[/]: {n} images, {nfe:.0f} NFE per sample, {wall:.1f} s, "
                  f"{n / wall:.2f} img/s on {device} -> {out} ({source})")  # fmt: skip


def check_classifier_flags(classifier_path, scale, label, guidance, mode):
    """Classifier guidance needs a label to steer to, and takes no classifier-free --guidance."""
    if classifier_path is None:
        if scale is not None:
            raise click.ClickException("--classifier-scale weighs --classifier: give one")
        return
    if label in (None, "none"):
        raise click.ClickException("--classifier needs --label: the class it steers to")
    if guidance is not None:
        raise click.ClickException("--guidance is classifier-free guidance; with --classifier, "
                                   "--classifier-scale weighs the classifier")  # fmt: skip
    if mode == "interpolate":
        raise click.ClickException("--interpolate decodes without labels: drop --classifier")


if __name__ == "__main__":
    main()
