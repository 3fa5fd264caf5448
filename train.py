"""
Train a score-based model on FashionMNIST.

    python train.py --device cuda                   # the default model, on a GPU
    python train.py --preset quick                  # a small model that gives garments in ~15 CPU minutes
    python train.py --resume --out runs/vp          # continue a run exactly where it stopped
    torchrun --nproc_per_node 2 train.py ...        # data-parallel on several GPUs (or CPU processes)

A run folder holds ckpt.pt (atomic, also written on Ctrl-C), log.jsonl (one line per log interval)
and samples_<step>.png (EMA weights, Heun sampler, 35 NFE).
"""
import functools
import gzip
import json
import math
import os
import shutil
import sys
import time

import click
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import sgm

console = Console(stderr=True, soft_wrap=True)
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
# Data scaling per SDE, as in the paper's configs: VE sees [0, 1], VP and sub-VP see [-1, 1].
DATA_RANGE = {"ve": (0.0, 1.0), "vp": (-1.0, 1.0), "subvp": (-1.0, 1.0)}
SDE_CLASSES = {"ve": sgm.VESDE, "vp": sgm.VPSDE, "subvp": sgm.SubVPSDE}
PRESETS = {
    # A CPU-sized model and schedule: 0.65 M parameters, recognizable garments after ~15 minutes on 2 cores.
    "quick": dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, dropout=0.0, batch_size=64, steps=2500,
                  lr=2e-3, warmup=100, ema_decay=0.995, sample_every=500, ckpt_every=250),
    # The default model: 6.19 M parameters, for a GPU.
    "default": dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, dropout=0.1, batch_size=128, steps=100_000,
                    lr=2e-4, warmup=5000, ema_decay=0.999, sample_every=5000, ckpt_every=2500),
}


class DataError(click.ClickException):
    pass


def load_fashion_mnist(root="data", train=True):
    """FashionMNIST images (N, 1, 28, 28) uint8 and labels (N,) int64 through torchvision. Offline, the
    original .gz files are taken from `root` or from Debian's dataset-fashion-mnist package."""
    from torchvision.datasets import FashionMNIST
    raw = os.path.join(root, "FashionMNIST", "raw")
    if not all(os.path.isfile(os.path.join(raw, name)) for name in FMNIST_FILES):
        for source in (raw, root, DEBIAN_DIR):
            if all(os.path.isfile(os.path.join(source, name + ".gz")) for name in FMNIST_FILES):
                os.makedirs(raw, exist_ok=True)
                for name in FMNIST_FILES:
                    with gzip.open(os.path.join(source, name + ".gz"), "rb") as f, open(os.path.join(raw, name), "wb") as out:
                        shutil.copyfileobj(f, out)
                break
    try:
        dataset = FashionMNIST(root, train=train, download=not os.path.isdir(raw) or not os.listdir(raw))
    except Exception:
        raise DataError(f"FashionMNIST not found in {root!r} and the download failed. Either run on a machine with "
                        f"internet access, put the four .gz files from https://github.com/zalandoresearch/fashion-mnist "
                        f"into {root!r}, or install Debian's package: apt-get install -y dataset-fashion-mnist") from None
    return dataset.data[:, None].contiguous(), dataset.targets.long()


def to_model_range(images, data_range, dequantize=False):
    """uint8 (B, C, H, W) -> float in data_range. Dequantization adds U(0, 1) before dividing by 256."""
    lo, hi = data_range
    u = (images.float() + (torch.rand_like(images, dtype=torch.float) if dequantize else 0.5)) / 256
    return lo + (hi - lo) * u


def to_uint8(x, data_range):
    lo, hi = data_range
    return ((x - lo) / (hi - lo) * 256).floor().clamp(0, 255).to(torch.uint8)


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda was asked for, but PyTorch sees no CUDA device")
    return device


def grid_image(images, nrow=8):
    """uint8 (B, C, H, W) -> PIL image of a grid with white 2-pixel gaps."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid
    return to_pil_image(make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=255))


def save_grid(x, data_range, path, nrow=8):
    grid_image(to_uint8(x, data_range), nrow).save(path)


@torch.no_grad()
def sample_grid(model, sde, data_range, path, n=64, steps=18, seed=0, labels=None):
    """A grid of n samples with the Heun sampler (35 NFE) and a generator of its own, so the training RNG stays untouched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    score = sgm.score_model(model, sde)
    c, s = model.config.image_channels, model.config.image_size
    x, _ = sgm.sample(lambda x, t: score(x, t, labels), sde, (n, c, s, s), "heun", steps, generator=generator, device=device)
    save_grid(x, data_range, path)


@functools.lru_cache(maxsize=1)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, batch_size, n, seed, rank=0, world=1):
    """This rank's indices of the global batch `step`: each epoch is a permutation drawn from (seed, epoch), so the
    data order follows from the step alone and a resumed run sees the same batches."""
    per_epoch = n // (batch_size * world)
    epoch, pos = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    start = (pos * world + rank) * batch_size
    return perm[start:start + batch_size]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--preset", type=click.Choice(list(PRESETS)), default="default", help="Model size and schedule; other options override it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--sde", "sde_name", type=click.Choice(list(SDE_CLASSES)), default="vp")
@click.option("--steps", type=click.IntRange(1), default=None, help="Training steps [preset].")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=None, help="Train this many epochs instead of --steps.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Per process [preset].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Adam learning rate [preset].")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Linear learning-rate warm-up steps [preset].")
@click.option("--grad-clip", type=click.FloatRange(0, min_open=True), default=1.0)
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=None, help="[preset]")
@click.option("--channels", type=click.IntRange(4), default=None, help="U-Net base width [preset].")
@click.option("--conditional", is_flag=True, help="Train with labels, dropped with --label-dropout, for classifier-free guidance.")
@click.option("--label-dropout", type=click.FloatRange(0, 1), default=0.1)
@click.option("--likelihood-weighting", is_flag=True, help="lambda(t) = g(t)^2 instead of std(t)^2.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder [runs/<sde>].")
@click.option("--resume", is_flag=True, help="Continue from <out>/ckpt.pt: weights, EMA, optimizer, step, data order and RNG.")
@click.option("--seed", type=int, default=0)
@click.option("--data", type=click.Path(file_okay=False), default="data", help="FashionMNIST folder.")
@click.option("--limit-data", type=click.IntRange(1), default=None, help="Use only the first N training images.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option("--amp/--no-amp", default=True, help="bf16 autocast on CUDA.")
@click.option("--log-every", type=click.IntRange(1), default=50)
@click.option("--sample-every", type=click.IntRange(1), default=None, help="[preset]")
@click.option("--ckpt-every", type=click.IntRange(1), default=None, help="[preset]")
def main(preset, device, sde_name, steps, epochs, batch_size, lr, warmup, grad_clip, ema_decay, channels, conditional,
         label_dropout, likelihood_weighting, out, resume, seed, data, limit_data, use_compile, amp, log_every,
         sample_every, ckpt_every):
    """Train a score-based generative model (Song et al. 2021) on FashionMNIST."""
    settings = {**PRESETS[preset], **{k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                ema_decay=ema_decay, channels=channels, sample_every=sample_every, ckpt_every=ckpt_every).items() if v is not None}}
    world, rank, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device)
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # OMP_NUM_THREADS=1 runs several trainings side by side
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux / other
        torch.set_num_threads(max(1, cores // world))
    is_main = rank == 0
    out = out or os.path.join("runs", sde_name)
    ckpt_path = os.path.join(out, "ckpt.pt")
    log = console if is_main else Console(quiet=True)

    images, labels = load_fashion_mnist(data, train=True)
    if limit_data:
        images, labels = images[:limit_data], labels[:limit_data]
    B = settings["batch_size"]
    if len(images) < B * world:
        raise click.ClickException(f"{len(images)} images are fewer than one global batch of {B * world}")
    # Model, SDE, optimizer: from the checkpoint when resuming, so the run continues with its own settings.
    torch.manual_seed(seed + rank)
    if resume:
        if not os.path.isfile(ckpt_path):
            raise click.ClickException(f"--resume: no checkpoint at {ckpt_path}")
        try:
            ckpt = sgm.load_checkpoint(ckpt_path, device)
        except sgm.CheckpointError as e:
            raise click.ClickException(str(e))
        config, sde, data_range, model = ckpt["config"], ckpt["sde"], ckpt["data_range"], ckpt["model"]
        train_args = ckpt["extra"]["train"]
        sde_name, seed, conditional, likelihood_weighting = train_args["sde"], train_args["seed"], train_args["conditional"], train_args["likelihood_weighting"]
        settings.update({k: train_args[k] for k in ("batch_size", "lr", "warmup", "ema_decay")})
        B, start = settings["batch_size"], ckpt["step"]
        if steps is None and epochs is None:
            settings["steps"] = train_args["steps"]
    else:
        config = sgm.ModelConfig(image_channels=images.shape[1], image_size=images.shape[2], channels=settings["channels"],
                                 channel_mult=settings["channel_mult"], num_res_blocks=settings["num_res_blocks"],
                                 dropout=settings["dropout"], num_classes=10 if conditional else 0)
        sde, data_range = SDE_CLASSES[sde_name](), DATA_RANGE[sde_name]
        model, start = sgm.UNet(config).to(device), 0
    cuda = device.startswith("cuda")
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CUDA and on the CPU
    ema = sgm.EMA(model, settings["ema_decay"])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    if resume:
        ema.load_state_dict(ckpt["ema"].state_dict())
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["rng"] is not None and is_main:
            torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
            if cuda and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        else:
            torch.manual_seed(seed * 1000 + rank + start)
        del ckpt
    if epochs is not None:
        settings["steps"] = max(1, round(epochs * len(images) / (B * world)))
    total = settings["steps"]
    train_args = dict(sde=sde_name, seed=seed, steps=total, conditional=conditional, likelihood_weighting=likelihood_weighting,
                      label_dropout=label_dropout, **{k: settings[k] for k in ("batch_size", "lr", "warmup", "ema_decay")})

    # Speed set-up: autocast, compile and DDP in three lines.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp)
    net = torch.compile(model) if use_compile else model
    net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if cuda else None) if world > 1 else net
    images, labels = images.to(device), labels.to(device)  # 47 MB of uint8: kept on the device, no per-step copy

    def save(step):
        if is_main:
            rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}
            sgm.save_checkpoint(ckpt_path, config=config, sde=sde, model=model, ema=ema, optimizer=optimizer,
                                data_range=data_range, step=step, rng=rng, extra={"train": train_args})

    def lr_at(step):
        return settings["lr"] * min(1.0, (step + 1) / max(1, settings["warmup"]))

    if is_main:
        os.makedirs(out, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        log.print(f"[bold]sgm[/] {type(sde).__name__} on {device} x{world}, {n_params / 1e6:.2f} M parameters, "
                  f"batch {B}x{world}, steps {start} -> {total}, data {len(images)} images in {data_range}, out {out}")
    progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=log, disable=not is_main)
    loss_sum, loss_count, t_log, step = torch.zeros((), device=device), 0, time.time(), start
    last_loss, throughputs, t_start, imgs_seen = float("nan"), [], time.time(), 0

    def check_finite(step):
        if not math.isfinite(last_loss):
            raise click.ClickException(f"loss became {last_loss} by step {step}; stopped without saving, the last good "
                                       f"checkpoint {ckpt_path} is kept. Try a lower --lr or --grad-clip.")

    model.train()
    try:
        with progress:
            task = progress.add_task("train", total=total, completed=start, status="")
            while step < total:
                idx = batch_indices(step, B, len(images), seed, rank, world).to(device, non_blocking=True)
                x = to_model_range(images[idx], data_range, dequantize=True)
                x = x.contiguous(memory_format=torch.channels_last)
                y = None
                if conditional:
                    y = labels[idx].masked_fill(torch.rand(B, device=device) < label_dropout, -1)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                with autocast:
                    loss = sgm.dsm_loss(net, sde, x, likelihood_weighting=likelihood_weighting, labels=y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                ema.update(model)
                loss_sum += loss.detach().float()
                loss_count, step, imgs_seen = loss_count + 1, step + 1, imgs_seen + B * world

                if step % log_every == 0 or step == total or step % settings["ckpt_every"] == 0:
                    last_loss = (loss_sum / loss_count).item()  # the only host sync
                    check_finite(step)
                    elapsed = time.time() - t_log
                    rate = loss_count * B * world / elapsed
                    throughputs.append(rate)
                    if is_main:
                        with open(os.path.join(out, "log.jsonl"), "a") as f:
                            f.write(json.dumps({"step": step, "loss": last_loss, "lr": lr_at(step - 1), "img_per_s": rate}) + "\n")
                    progress.update(task, completed=step, status=f"loss {last_loss:.4f}  {rate:.0f} img/s")
                    loss_sum.zero_()
                    loss_count, t_log = 0, time.time()
                    if step % settings["ckpt_every"] == 0 or step == total:
                        save(step)
                    if is_main and (step % settings["sample_every"] == 0 or step == total):
                        eval_model = sgm.UNet(config).to(device)
                        ema.copy_to(eval_model)
                        grid_labels = torch.arange(64, device=device) % 10 if conditional else None
                        sample_grid(eval_model.eval(), sde, data_range, os.path.join(out, f"samples_{step:07d}.png"), labels=grid_labels)
                        t_log = time.time()  # sampling time does not count against training throughput
    except KeyboardInterrupt:
        if loss_count:
            last_loss = (loss_sum / loss_count).item()
        if math.isfinite(last_loss) or loss_count == 0:
            save(step)
            log.print(f"[yellow]interrupted at step {step}; checkpoint saved to {ckpt_path}. Continue with --resume --out {out}")
        sys.exit(130)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if is_main:
        wall = time.time() - t_start
        rate = sorted(throughputs)[len(throughputs) // 2] if throughputs else float("nan")
        log.print(f"[bold green]done[/]: {step} steps, final loss {last_loss:.4f}, {imgs_seen} images in {wall:.0f} s, "
                  f"median training throughput {rate:.0f} img/s on {device} x{world}. Checkpoint: {ckpt_path}")


if __name__ == "__main__":
    main()
