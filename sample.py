"""
Sample from a trained score-based model with any solver.

    python sample.py --solver ode --n 64                       # image grid, samples.png
    python sample.py --solver heun --steps 18 --out x.npz      # raw uint8 array (N, H, W)
    python sample.py --solver pc --n 16 --out traj.gif         # the reverse process, state | denoised
    python sample.py --label sneaker --guidance 2 --n 16       # class-conditional (conditional models)
    python sample.py --inpaint left --from-test 0 --n 8        # fill in the left half of test images
    python sample.py --interpolate 0 1 --n 10                  # morph test image 0 into test image 1

--ckpt defaults to the shipped checkpoints/fmnist.pt, else the newest runs/*/ckpt.pt.
"""
import glob
import os
import sys
import tempfile
import time

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import sgm
from train import CLASSES, grid_image, load_fashion_mnist, resolve_device, to_model_range, to_uint8

console = Console(stderr=True, soft_wrap=True)
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "fmnist.pt")
DEFAULT_STEPS = {"heun": 18, "ode": 1}  # heun: 35 NFE; ode: adaptive, steps unused
MASKS = ("left", "right", "top", "bottom", "center", "random")


def default_checkpoint():
    if os.path.isfile(SHIPPED):
        return SHIPPED
    runs = sorted(glob.glob("runs/*/ckpt.pt"), key=os.path.getmtime)
    if not runs:
        raise click.ClickException("no checkpoint given and none found (checkpoints/fmnist.pt, runs/*/ckpt.pt): "
                                   "train one with `python train.py --preset quick` or pass --ckpt PATH")
    return runs[-1]


def load_model(path, device, use_ema=True):
    """(net, sde, data_range, config) from a checkpoint, with EMA weights unless use_ema is False."""
    try:
        ckpt = sgm.load_checkpoint(path, device)
    except sgm.CheckpointError as e:
        raise click.ClickException(str(e))
    model = ckpt["model"]
    if use_ema and ckpt["ema"] is not None:
        ckpt["ema"].copy_to(model)
    model.eval().requires_grad_(False)
    return model, ckpt["sde"], ckpt["data_range"], ckpt["config"]


def run_solver(fn, *args, **kwargs):
    """Call sgm.sample or sgm.inpaint; a solver the SDE does not define (ancestral for sub-VP) becomes a one-line error."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise click.ClickException(str(e))


def parse_label(text, config):
    """'all', a class index or a FashionMNIST class name -> 'all' or an int."""
    if not config.num_classes:
        raise click.ClickException("--label needs a class-conditional checkpoint (train.py --conditional)")
    if text == "all":
        return "all"
    name = text.lower().replace("_", "-").replace(" ", "-")
    if name in CLASSES:
        return CLASSES.index(name)
    if text.isdigit() and int(text) < config.num_classes:
        return int(text)
    raise click.ClickException(f"unknown --label {text!r}: use 0-{config.num_classes - 1}, 'all' or one of {', '.join(CLASSES)}")


def make_mask(name, shape, generator):
    """1 where pixels are known. shape (C, H, W)."""
    C, H, W = shape
    mask = torch.zeros(shape)
    if name == "left":
        mask[..., W // 2:] = 1
    elif name == "right":
        mask[..., :W // 2] = 1
    elif name == "top":
        mask[:, H // 2:] = 1
    elif name == "bottom":
        mask[:, :H // 2] = 1
    elif name == "center":
        mask[:] = 1
        mask[:, H // 4:H - H // 4, W // 4:W - W // 4] = 0
    else:
        mask = (torch.rand((1, H, W), generator=generator) < 0.5).float().expand(C, H, W).clone()
    return mask


def check_output(out):
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".png", ".npz", ".gif"):
        raise click.ClickException(f"--out {out}: the suffix must be .png (grid), .npz (array) or .gif (animation)")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise click.ClickException(f"--out {out}: cannot write there ({e.strerror})")
    return suffix


def write_atomic(path, write):
    """write(tmp_path) then rename, so an existing file is replaced only by a complete one."""
    folder, suffix = os.path.dirname(os.path.abspath(path)), os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_png(x, data_range, path, nrow):
    write_atomic(path, lambda tmp: grid_image(to_uint8(x, data_range), nrow).save(tmp))


def save_npz(x, data_range, path, labels=None):
    import numpy as np
    images = to_uint8(x, data_range).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    images = images[..., 0] if images.shape[-1] == 1 else images
    arrays = {"images": images, **({"labels": labels.cpu().numpy()} if labels is not None else {})}
    write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def save_gif(frames, path, nrow):
    """frames: list of (state, denoised) uint8 pairs (B, C, H, W), shown side by side."""
    from PIL import Image
    images = []
    for state, denoised in frames:
        left, right = grid_image(state, nrow), grid_image(denoised, nrow)
        frame = Image.new("L", (left.width * 2 + 8, left.height), 255)
        frame.paste(left.convert("L"), (0, 0))
        frame.paste(right.convert("L"), (left.width + 8, 0))
        images.append(frame)
    images += [images[-1]] * 10  # hold the result
    write_atomic(path, lambda tmp: images[0].save(tmp, save_all=True, append_images=images[1:], duration=80, loop=0))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None, help="Checkpoint [checkpoints/fmnist.pt, else newest runs/*/ckpt.pt].")
@click.option("--solver", type=click.Choice(list(sgm.SOLVERS)), default="ode")
@click.option("--n", type=click.IntRange(1), default=None, help="Images [64; 8 with --inpaint, 10 with --interpolate].")
@click.option("--steps", type=click.IntRange(1), default=None, help="Time steps [1000; heun 18 (35 NFE); unused by ode].")
@click.option("--snr", type=click.FloatRange(0, min_open=True), default=0.16, help="Langevin signal-to-noise ratio (pc, ald).")
@click.option("--corrector-steps", type=click.IntRange(0), default=1, help="Langevin steps per time step (pc, ald).")
@click.option("--rtol", type=click.FloatRange(0, min_open=True), default=1e-5, help="ode relative tolerance.")
@click.option("--atol", type=click.FloatRange(0, min_open=True), default=1e-5, help="ode absolute tolerance.")
@click.option("--eps", type=click.FloatRange(0, 1, min_open=True), default=1e-3, help="Final time.")
@click.option("--seed", type=int, default=0)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--ema/--no-ema", default=True, help="Sample with the EMA weights.")
@click.option("--batch-size", type=click.IntRange(1), default=256, help="Images per chunk.")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", help=".png grid, .npz uint8 array or .gif animation.")
@click.option("--label", default=None, help="Class index, class name (sneaker, ankle-boot, ...) or 'all' (one row per class).")
@click.option("--guidance", type=click.FloatRange(0), default=1.0, help="Classifier-free guidance weight w, with --label.")
@click.option("--inpaint", type=click.Choice(MASKS), default=None, help="Fill in the masked part of test images.")
@click.option("--from-test", type=click.IntRange(0, 9999), default=0, help="First test-set index for --inpaint.")
@click.option("--interpolate", type=click.IntRange(0, 9999), nargs=2, default=None, help="Morph test image A into B.")
@click.option("--data", type=click.Path(file_okay=False), default="data", help="FashionMNIST folder.")
def main(ckpt, solver, n, steps, snr, corrector_steps, rtol, atol, eps, seed, device, ema, batch_size, out, label,
         guidance, inpaint, from_test, interpolate, data):
    """Sample images from a score-based model (Song et al. 2021)."""
    suffix = check_output(out)
    device = resolve_device(device)
    path = ckpt or default_checkpoint()
    net, sde, data_range, config = load_model(path, device, ema)
    shape = (config.image_channels, config.image_size, config.image_size)
    score = sgm.score_model(net, sde)
    steps = steps or DEFAULT_STEPS.get(solver, 1000)
    generator = torch.Generator(device).manual_seed(seed)
    mode = "inpaint" if inpaint else "interpolate" if interpolate else "sample"
    n = n or {"sample": 64, "inpaint": 8, "interpolate": 10}[mode]
    if mode != "sample":
        if suffix != ".png":
            raise click.ClickException(f"--{mode} writes a .png grid; got --out {out}")
        if shape != (1, 28, 28):
            raise click.ClickException(f"{path}: the checkpoint is for {'x'.join(map(str, shape))} images, "
                                       f"but --{mode} takes FashionMNIST test images (1x28x28)")
        test_images, test_labels = load_fashion_mnist(data, train=False)
    if mode == "inpaint" and solver not in sgm.STOCHASTIC_SOLVERS:
        raise click.ClickException(f"--inpaint needs a stochastic solver ({', '.join(sgm.STOCHASTIC_SOLVERS)}), not {solver}")

    labels, nrow = None, min(n, 8)
    if label is not None:
        target = parse_label(label, config)
        if target == "all":
            nrow = max(1, n // config.num_classes)
            labels = torch.arange(config.num_classes).repeat_interleave(nrow)
        else:
            labels = torch.full((n,), target)
        n = len(labels)
        labels = labels.to(device)
    if mode == "inpaint" and from_test + n > len(test_images):
        raise click.ClickException(f"--from-test {from_test} --n {n} runs past the {len(test_images)} test images")

    def score_fn_for(chunk_labels):
        if chunk_labels is None:
            return lambda x, t: score(x, t)
        return sgm.guided_score(score, chunk_labels, guidance)

    start, nfes, frames = time.time(), [], []
    progress = Progress(TextColumn(f"{solver}"), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                        console=console, transient=False)
    with progress:
        if mode == "interpolate":
            task = progress.add_task("", total=None, status="encoding and decoding through the ODE")
            a, b = (to_model_range(test_images[i:i + 1], data_range).to(device) for i in interpolate)
            x, nfe = sgm.interpolate(lambda x, t: score(x, t), sde, a, b, n, eps=eps, rtol=rtol, atol=atol)
            x = torch.cat([a, x, b])
            nrow = len(x)
            nfes.append(nfe)
        else:
            chunks = [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
            task = progress.add_task("", total=len(chunks), status="")
            outputs = []
            for c, (lo, hi) in enumerate(chunks):
                def callback(info, c=c):
                    progress.update(task, completed=c + (sde.T - info["t"]) / (sde.T - eps), status=f"t = {info['t']:.4f}")
                    if suffix == ".gif" and c == 0 and info["i"] % max(1, steps // 50) == 0:  # at most ~50 frames
                        frames.append((to_uint8(info["x"][:64], data_range).cpu(), to_uint8(info["denoised"][:64], data_range).cpu()))
                chunk_labels = labels[lo:hi] if labels is not None else None
                kwargs = dict(eps=eps, snr=snr, corrector_steps=corrector_steps, rtol=rtol, atol=atol,
                              generator=generator, device=device, callback=callback)
                if mode == "inpaint":
                    known = to_model_range(test_images[from_test + lo:from_test + hi], data_range).to(device)
                    mask = make_mask(inpaint, shape, generator=torch.Generator().manual_seed(seed)).to(device)
                    x, nfe = run_solver(sgm.inpaint, score_fn_for(chunk_labels), sde, known, mask, solver, steps, **kwargs)
                    outputs.append(torch.stack([known, mask * known + (1 - mask) * data_range[1], x]))  # (3, b, C, H, W)
                else:
                    x, nfe = run_solver(sgm.sample, score_fn_for(chunk_labels), sde, (hi - lo, *shape), solver, steps, **kwargs)
                    outputs.append(x)
                nfes.append(nfe)
                progress.update(task, completed=c + 1)
            if mode == "inpaint":
                x = torch.cat(outputs, dim=1).flatten(0, 1)  # rows: originals, masked inputs, completions
                nrow = n
            else:
                x = torch.cat(outputs)
    wall = time.time() - start

    if suffix == ".png":
        save_png(x, data_range, out, nrow)
    elif suffix == ".npz":
        save_npz(x, data_range, out, labels)
    else:
        final = to_uint8(x[:64], data_range).cpu()
        save_gif(frames[::max(1, len(frames) // 50)] + [(final, final)], out, min(8, len(final)))
    nfe = sum(nfes) / len(nfes)
    console.print(f"[bold]{solver}[/]: {n} images, {nfe:.0f} NFE per sample, {wall:.1f} s, {n / wall:.2f} img/s on {device} "
                  f"-> {out}" + (f" ({mode}, from {os.path.basename(path)})" if mode != "sample" else f" (from {path})"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        console.print("interrupted; nothing written")
        sys.exit(130)
