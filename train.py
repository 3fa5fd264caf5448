"""
Train a score-based model on FashionMNIST, MNIST, CIFAR-10 or your own images.

    python train.py --preset quick --out runs/quick    # 0.17 M parameters, for a CPU (see --help)
    python train.py --device cuda                      # the default preset: 6.19 M, for a GPU
    python train.py --resume --out runs/quick          # continue a stopped run exactly
    python train.py --preset quick --data my_images --image-size 32 --out runs/mine
    python train.py --preset quick --classifier --out runs/clf  # p_t(y | x(t)) for sample.py
    torchrun --nproc_per_node 2 train.py --device cuda # data-parallel (DDP)
    python sample.py --ckpt runs/quick                 # then sample the run

A run folder holds ckpt.pt (written atomically at intervals, on Ctrl-C and SIGTERM), log.jsonl
and samples_<step>.png (EMA weights, Heun, 35 NFE). A --classifier run trains a noise-conditional
classifier instead, and logs its accuracy on held-out noisy test images where a score run draws
a grid. ckpt.pt stores the run's whole configuration
(checkpoint.TrainConfig: the preset, then the flags), which --resume restores.
"""

import copy
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import sys
import time

import click
import torch
import torch.distributed as dist
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import checkpoint
import cli
import data
import files
import sgm

console = Console(file=cli.ConsoleStream(), soft_wrap=True)  # a closed pipe costs no result
RESUMABLE = ("steps", "log_every", "sample_every", "ckpt_every")  # may change on --resume
GRID_STEPS = sgm.SOLVERS["heun"].steps  # the sample grids: Heun, 35 NFE
HELD_OUT = 500  # test images on which a classifier's accuracy is logged
HELD_OUT_TIMES = (0.1, 0.3, 0.5, 0.7)  # ... at these times t of its SDE

# ------------------------------------------------------------------------------------------------
# Set-up: processes, configuration, run folder, network and optimizer


def distributed_env():
    """(world size, rank, local rank) from torchrun's variables, checked: a plain run sets none of
    them; several processes need all four of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    values = {}
    for name, text in env.items():
        try:
            values[name] = int(text) if text is not None else None
        except ValueError:
            raise sgm.SGMError(f"{name}={text!r} in the environment: not a whole number") from None
    world = 1 if values["WORLD_SIZE"] is None else values["WORLD_SIZE"]
    if world < 1:
        raise sgm.SGMError(f"WORLD_SIZE={world} in the environment: it must be at least 1")
    rank, local = values["RANK"], values["LOCAL_RANK"]
    if values["WORLD_SIZE"] is None and rank not in (None, 0):
        raise sgm.SGMError(f"RANK={rank} is set but not WORLD_SIZE: start the processes with "
                           "torchrun, or unset RANK")  # fmt: skip
    if world > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise sgm.SGMError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the "
                               "processes with torchrun")  # fmt: skip
    rank = rank or 0
    if not 0 <= rank < world:
        raise sgm.SGMError(f"RANK={rank} in the environment: it must be from 0 to {world - 1}")
    if local is not None and local < 0:
        raise sgm.SGMError(f"LOCAL_RANK={local} in the environment: it must be at least 0")
    return world, rank, local or 0


DIST_TIMEOUT = 1800  # seconds: torch's default; SGM_DIST_TIMEOUT sets another


def init_processes(backend, world, rank):
    """Join the other processes, saying what is awaited; a timeout (SGM_DIST_TIMEOUT seconds, also
    the limit of each collective) is one line."""
    text = os.environ.get("SGM_DIST_TIMEOUT", str(DIST_TIMEOUT))
    try:
        seconds = float(text)
        cli.check_number("SGM_DIST_TIMEOUT", seconds, 0, 1e7, low_open=True)
    except ValueError:
        raise sgm.SGMError(f"SGM_DIST_TIMEOUT={text!r}: give seconds, above 0") from None
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if rank == 0:
        console.print(f"process 0 of {world}: waiting for the others at {where} (up to {seconds:g} "
                      "s; SGM_DIST_TIMEOUT=SECONDS sets the limit)", highlight=False)  # fmt: skip
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as e:  # torch's DistStoreError and timeouts
        raise sgm.SGMError(
            f"process {rank} of {world} could not join the others at {where} "
            f"within {seconds:g} s ({cli.first_line(e, 200)})"
        ) from None


def setup_processes(device):
    """(device, world size, rank) for a plain run or a torchrun process; sets the CPU threads."""
    world, rank, local_rank = distributed_env()
    device = cli.resolve_device(device)
    if world > 1:
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        init_processes("nccl" if device.startswith("cuda") else "gloo", world, rank)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # =1 lets runs share a machine
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // world))
    return device, world, rank


def build_config(ctx, flags, device, stored=None):
    """The run's TrainConfig: the preset, then the flags given. On --resume, the stored config; a
    flag that contradicts it is refused, except those in RESUMABLE. On a CPU, bf16 autocast is
    used only when --amp is given: the quick preset ran 1.7x slower with it (docs/results.md)."""
    names = {f.name for f in dataclasses.fields(checkpoint.TrainConfig)}
    source = ctx.get_parameter_source
    given = {
        k: v for k, v in flags.items() if k in names and source(k) == ParameterSource.COMMANDLINE
    }
    if stored is None:
        preset = {**checkpoint.PRESETS[flags["preset"]], "preset": flags["preset"]}
        return checkpoint.TrainConfig(**{**preset, "amp": not device.startswith("cpu"), **given})
    for name, value in given.items():
        if name not in RESUMABLE and value != getattr(stored, name):
            flag = f"--{'no-' * (value is False)}{name.replace('_', '-')}"
            flag += "" if isinstance(value, bool) else f" {value}"
            raise click.ClickException(
                f"{flag} contradicts the run's {name} = {getattr(stored, name)}; with --resume "
                "only --steps/--epochs and the logging intervals may change (or give another --out)"
            )
    return dataclasses.replace(stored, **{k: v for k, v in given.items() if k in RESUMABLE})


# ------------------------------------------------------------------------------------------------
# One step


@dataclasses.dataclass
class Run:
    """What the training loop works on."""

    cfg: checkpoint.TrainConfig
    ckpt: checkpoint.Checkpoint  # ckpt.net is the network being trained, with its raw weights
    net: torch.nn.Module  # ckpt.net, compiled and/or wrapped for data parallelism
    ema: checkpoint.EMA
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast
    images: torch.Tensor  # (N, C, H, W) uint8, on the device: 47 MB, no copy per step
    labels: torch.Tensor  # (N,), None for unlabelled data
    device: str
    world: int
    rank: int
    out: str
    time_limit: float = None  # minutes
    snapshots: list = dataclasses.field(default_factory=list)  # minutes at which to export EMA
    stop: int = 0  # the signal that asked to stop
    held_out: tuple = None  # a classifier's test images and labels (rank 0)


def learning_rate(cfg, step):
    """At optimizer step `step`: a linear warm-up, then constant or a cosine down to 0."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.steps))))
    return lr


def ema_decay(cfg, step):
    """The EMA decay for update `step`: cfg.ema_decay, or with ema_ramp a half-life of at most
    ema_ramp x (step + 1) updates (EDM), so a young run forgets its first weights quickly."""
    if not cfg.ema_ramp:
        return cfg.ema_decay
    return min(cfg.ema_decay, 0.5 ** (1 / (cfg.ema_ramp * (step + 1))))


def train_step(run, step):
    """One optimizer step on batch `step`; returns the loss (on the device, no host sync)."""
    cfg, B = run.cfg, run.cfg.batch_size
    idx = data.batch_indices(step, B, len(run.images), cfg.seed, run.rank, run.world)
    idx = idx.to(run.device, non_blocking=True)
    x = data.to_model_range(run.images[idx], run.ckpt.data_range, dequantize=True)
    if cfg.flip:  # half the images mirrored left-right
        flipped = torch.rand(B, device=run.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = None
    if cfg.classifier:
        with run.autocast:
            loss = sgm.classifier_loss(run.net, run.ckpt.sde, x, run.labels[idx],
                                       noise_sampling=cfg.noise_sampling)  # fmt: skip
        return optimizer_step(run, step, loss)
    if cfg.conditional:  # dropped labels (-1) train the unconditional score for guidance
        dropped = torch.rand(B, device=run.device) < cfg.label_dropout
        labels = run.labels[idx].masked_fill(dropped, -1)
    with run.autocast:
        loss = sgm.dsm_loss(run.net, run.ckpt.sde, x, likelihood_weighting=cfg.likelihood_weighting,
                            labels=labels, noise_sampling=cfg.noise_sampling)  # fmt: skip
    return optimizer_step(run, step, loss)


def optimizer_step(run, step, loss):
    """Backpropagate `loss`, clip, step the optimizer and the EMA; returns the loss."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.cfg, step)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.ckpt.net.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.ema.update(run.ckpt.net, ema_decay(run.cfg, step))
    return loss


# ------------------------------------------------------------------------------------------------
# What happens at intervals: checkpoints, grids, log rows


def save(run, step, interval):
    """The checkpoint, with the RNG state as it is after `step` and the log interval in progress
    (loss sum, steps, seconds), so --resume continues exactly and logs the same rows."""
    if run.rank == 0:
        rng = {"cpu": torch.get_rng_state()}
        if run.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        loss_sum, count, seconds = interval
        log = {"loss_sum": loss_sum.detach().cpu().clone(), "count": count, "seconds": seconds}
        run.ckpt.step = step
        state = dict(ema=run.ema, optimizer=run.optimizer, rng=rng, log=log)
        save_checked(run, step, os.path.join(run.out, "ckpt.pt"), run.ckpt, **state)


def save_checked(run, step, path, ckpt, **state):
    """checkpoint.save, which refuses weights that diverged: then the run stops, saving nothing."""
    try:
        checkpoint.save(path, ckpt, **state)
    except checkpoint.DivergedError as e:
        raise stopped(run, f"the weights diverged by step {step} ({e.problem})") from None


def stopped(run, what):
    """The one line of a run stopped without saving."""
    path = os.path.join(run.out, "ckpt.pt")
    kept = f"{path} is kept" if os.path.exists(path) else "is none yet"
    return click.ClickException(f"{what}; stopped without saving, the last good checkpoint "
                                f"{kept}. Try a lower --lr or --grad-clip.")  # fmt: skip


def ema_checkpoint(run, **changes):
    """The run's checkpoint, with `changes`, around a copy of its net that holds the EMA weights;
    the training net is untouched."""
    net = copy.deepcopy(run.ckpt.net).eval()  # a copy, not a new UNet: that would draw weights
    run.ema.copy_to(net)
    return dataclasses.replace(run.ckpt, net=net, **changes)


@torch.no_grad()
def sample_grid(run, step, n=64):
    """A grid from the EMA weights, with generators of its own: the training RNG stays untouched."""
    sampler = ema_checkpoint(run)
    classes = run.ckpt.model_config.num_classes
    labels = torch.arange(n, device=run.device) % classes if classes else None
    generator = torch.Generator(run.device).manual_seed(0)
    x, _ = sgm.sample(sampler.score_fn(labels), sampler.sde, (n, *run.images.shape[1:]), "heun",
                      GRID_STEPS, generator=generator, device=run.device)  # fmt: skip
    files.save_png(x, sampler.data_range, os.path.join(run.out, f"samples_{step:07d}.png"))


@torch.no_grad()
def held_out_accuracy(run, step, log):
    """A classifier's accuracy (EMA weights) on HELD_OUT test images noised to each of
    HELD_OUT_TIMES, with a generator of its own: a row of log.jsonl, and a line."""
    classifier, (images, labels) = ema_checkpoint(run), run.held_out
    generator, sde, accuracy = torch.Generator().manual_seed(0), run.ckpt.sde, {}
    x0 = data.to_model_range(images, run.ckpt.data_range)
    for at in HELD_OUT_TIMES:
        t = torch.full((len(x0),), at)
        mean, std = sde.marginal_prob(x0, t)
        x = mean + sgm.append_dims(std, x0.ndim) * torch.randn(x0.shape, generator=generator)
        logits = sgm.classifier_logits(classifier.net, sde, x.to(run.device), t.to(run.device))
        accuracy[f"{at:g}"] = (logits.argmax(1).cpu() == labels).float().mean().item()
    with open(os.path.join(run.out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "held_out_accuracy": accuracy}) + "\n")
    sigmas = sde.noise_level(torch.tensor(HELD_OUT_TIMES)).tolist()
    at = " / ".join(f"{t:g}" for t in HELD_OUT_TIMES)
    log.print(f"step {step}: held-out accuracy at t = {at} (noise level "
              f"{' / '.join(f'{s:.2g}' for s in sigmas)}): "
              f"{' / '.join(f'{a:.3f}' for a in accuracy.values())}", highlight=False)  # fmt: skip


def save_snapshot(run, step, minutes):
    """The EMA weights after `step`, at `minutes` of training: <out>/snapshot_<M>min.pt."""
    snapshot = ema_checkpoint(run, step=step, is_ema=True, resume=None)
    snapshot.extra = {**run.ckpt.extra, "train_seconds": 60 * minutes}
    save_checked(run, step, os.path.join(run.out, f"snapshot_{minutes:g}min.pt"), snapshot)


def check_loss(run, step, loss_sum, count):
    """The mean loss since the last log row (the only host sync); NaN or inf stops the run."""
    loss = (loss_sum / count).item()
    if not math.isfinite(loss):
        raise stopped(run, f"loss became {loss} by step {step}")
    return loss


def log_row(run, step, loss, count, seconds):
    """A row of log.jsonl (rank 0); returns the throughput in images per second."""
    rate = count * run.cfg.batch_size * run.world / seconds
    if run.rank == 0:
        row = {"step": step, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"]}
        with open(os.path.join(run.out, "log.jsonl"), "a") as f:
            f.write(json.dumps({**row, "img_per_s": rate}) + "\n")
    return rate


def report(run, log, progress, step, end, status, seconds_per_step):
    """The progress bar, and with stderr redirected a plain line: step, status and time left."""
    seconds = (end - step) * (seconds_per_step or 0)
    left = f"{seconds / 3600:.1f} h left" if seconds > 5400 else f"{seconds / 60:.1f} min left"
    left = left if seconds_per_step else "time left after a few steps"
    progress.update(progress.task_ids[0], completed=step, total=end, status=f"{status}  {left}")
    if not log.is_terminal:  # redirected: the bar shows nothing until the end
        log.print(f"step {step}/{end} {status}, {left}", highlight=False)


# ------------------------------------------------------------------------------------------------
# The training loop


CPU_RATE = 19 / 2  # img/s per CPU core of the default preset's 6.19 M network in fp32 (README)


def announce(run, log):
    n_params = sum(p.numel() for p in run.ckpt.net.parameters()) / 1e6
    precision = "bf16 autocast" if cli.use_bf16(run.device, run.cfg.amp) else "fp32"
    precision += " (this CPU has no native bf16)" * (run.cfg.amp and precision == "fp32")
    log.print(
        f"[bold]sgm[/] {type(run.ckpt.sde).__name__} on {run.device} x{run.world} in {precision}, "
        f"{n_params:.2f} M parameters, batch {run.cfg.batch_size}x{run.world}, steps "
        f"{run.ckpt.step} -> {run.cfg.steps}, {len(run.images)} images, out {run.out}"
    )
    if run.device == "cpu" and run.cfg.preset == "default":  # the cost scales with the parameters
        rate = CPU_RATE * torch.get_num_threads() * 6.19 / n_params
        hours = (run.cfg.steps - run.ckpt.step) * run.cfg.batch_size * run.world / rate / 3600
        took = f"{hours / 24:.0f} days" if hours > 48 else f"{hours:.1f} hours"
        log.print(f"[yellow]note[/]: the default preset is meant for a GPU; here it would take "
                  f"about {took}. On a CPU, --preset quick trains in minutes.")  # fmt: skip


def train(run):
    """The training loop: a step, then at intervals a log row, a checkpoint and a sample grid."""
    cfg, start = run.cfg, run.ckpt.step
    log = console if run.rank == 0 else Console(quiet=True)
    announce(run, log)
    columns = (BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    progress = Progress(TextColumn("step {task.completed}/{task.total}"), *columns, console=log,
                        disable=run.rank != 0)  # fmt: skip
    saved = (run.ckpt.resume or {}).get("log") or {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
    loss_sum = torch.as_tensor(saved["loss_sum"], dtype=torch.float32).to(run.device).reshape(())
    count, t_log, step = saved["count"], time.time() - saved["seconds"], start  # the interval
    loss, rates, t_start, sampling, t_first = float("nan"), [], time.time(), 0.0, 0.0
    seconds_before = run.ckpt.extra.get("train_seconds", 0.0)  # of the run before this process
    snapshots = [m for m in run.snapshots if 60 * m > seconds_before]
    # Ctrl-C and SIGTERM (a timeout, a scheduler) set run.stop: the step ends, is saved, and stops.
    stop = lambda signum, frame: setattr(run, "stop", signum)
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress:
            progress.add_task("train", total=cfg.steps, completed=start, status="")
            end = cfg.steps  # earlier with --time-limit; the config keeps the planned steps
            while step < end:
                loss_sum += train_step(run, step).detach().float()
                count, step = count + 1, step + 1
                elapsed = time.time() - t_start - sampling
                while snapshots and seconds_before + elapsed >= 60 * snapshots[0]:
                    save_snapshot(run, step, snapshots.pop(0))
                if run.time_limit and elapsed > 60 * run.time_limit and step < end:
                    end = step  # out of time: this step is the last, saved below
                last = step == end or run.stop
                row = step % cfg.log_every == 0 or step == cfg.steps  # a log interval ends
                t_first = elapsed if step == start + 1 else t_first  # with the start-up costs
                if step - start in (1, 6) and not row:  # early lines, timed from the second step
                    pace = (elapsed - t_first) / 5 if step - start == 6 else None
                    report(run, log, progress, step, end, "starting", pace)
                if not (row or last or step % cfg.ckpt_every == 0):
                    continue
                loss = check_loss(run, step, loss_sum, count)
                if row:  # a stop in mid-interval saves the interval, and --resume completes it
                    rates.append(log_row(run, step, loss, count, time.time() - t_log))
                    status = f"loss {loss:.4f}  {rates[-1]:.0f} img/s"
                    pace = cfg.batch_size * run.world / rates[-1]  # as the speed shown: of late
                    report(run, log, progress, step, end, status, pace)
                    loss_sum.zero_()
                    count, t_log = 0, time.time()
                if step % cfg.ckpt_every == 0 or last:
                    run.ckpt.extra["train_seconds"] = seconds_before + elapsed
                    save(run, step, (loss_sum, count, time.time() - t_log))
                if run.stop:
                    break
                if run.rank == 0 and (step % cfg.sample_every == 0 or last):
                    t_grid = time.time()
                    if cfg.classifier:
                        held_out_accuracy(run, step, log)
                    else:
                        sample_grid(run, step)
                    sampling += time.time() - t_grid  # not training time
                    t_log += time.time() - t_grid
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        if run.world > 1:
            dist.destroy_process_group()
    finish(run, log, step, start, loss, rates, time.time() - t_start)


def finish(run, log, step, start, loss, rates, seconds):
    """The last lines: what was done, how to go on, and how to sample the run."""
    if run.stop:
        log.print(f"[yellow]stopped by {signal.Signals(run.stop).name} at step {step}; checkpoint "
                  f"saved in {run.out}. Continue with: python train.py --resume --out "
                  f"{shlex.quote(run.out)}", highlight=False)  # fmt: skip
    else:
        rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
        images = (step - start) * run.cfg.batch_size * run.world
        speed = f"median {rate:.0f} img/s on {run.device} x{run.world}"
        log.print(f"[bold green]done[/]: {step} steps, final loss {loss:.4f}, {images} images in "
                  f"{seconds:.0f} s, {speed}")  # fmt: skip
    young = step < 3 / (1 - run.cfg.ema_decay)  # the EMA still holds much of the initial network
    hint = " --no-ema  # the EMA weights still remember the untrained network" if young else ""
    if run.cfg.classifier:
        hint = f" --classifier {shlex.quote(run.out)} --label {run.ckpt.classes[0]}"
        log.print(f"Guide a score model with it: python sample.py{hint}", highlight=False)
    else:
        log.print(f"Sample it: python sample.py --ckpt {shlex.quote(run.out)}{hint}",
                  highlight=False)  # fmt: skip
    if run.stop:
        sys.exit(128 + run.stop)  # 130 for Ctrl-C, 143 for SIGTERM


# ------------------------------------------------------------------------------------------------
# The command


def preset_help(name, text=""):
    """Help text with the real defaults of each preset (TrainConfig's, then the preset's)."""
    default = getattr(checkpoint.TrainConfig(), name)
    values = {p: changes.get(name, default) for p, changes in checkpoint.PRESETS.items()}
    shown = ", ".join(f"{p} preset: {v}" for p, v in values.items())
    same = len(set(values.values())) == 1  # then the presets' common value
    return f"{text} [{next(iter(values.values())) if same else shown}]".strip()


PRESET_HELP = (
    "quick: 0.17 M parameters, 6,500 steps of 32 images, for a CPU (about 7 minutes on 2 cores); "
    "default: 6.19 M parameters, 100,000 steps of 128, for a GPU."
)


@click.command(cls=cli.Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(list(checkpoint.PRESETS)), default="default",
              show_default=True, help=PRESET_HELP)  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--sde", type=click.Choice(list(sgm.SDES)), help=preset_help("sde"))
@click.option("--steps", type=click.IntRange(1), help=preset_help("steps", "Training steps"))
@click.option("--epochs", type=cli.Number(0, 1e6, low_open=True), help="Instead of --steps.")
@click.option("--time-limit", type=cli.Number(0, 1e6, low_open=True),
              help="Minutes of training in this process, then save and stop.")  # fmt: skip
@click.option("--snapshot-minutes", hidden=True, help="Export the EMA at these minutes: 30,60.")
@click.option("--batch-size", type=click.IntRange(1), help=preset_help("batch_size", "Per process"))
@click.option("--lr", type=cli.Number(0, 1e3, low_open=True), help=preset_help("lr"))
@click.option("--warmup", type=click.IntRange(0), help=preset_help("warmup", "Linear, in steps"))
@click.option("--lr-schedule", type=click.Choice(checkpoint.LR_SCHEDULES),
              help=preset_help("lr_schedule", "After warm-up"))  # fmt: skip
@click.option("--grad-clip", type=cli.Number(0, 1e6, low_open=True), help=preset_help("grad_clip"))
@click.option("--ema-decay", type=cli.Number(0, 1), help=preset_help("ema_decay"))
@click.option("--ema-ramp", type=cli.Number(0, 1), help=preset_help(
    "ema_ramp", "EMA half-life at most this fraction of the steps done; 0: fixed"))  # fmt: skip
@click.option("--channels", type=click.IntRange(4), help=preset_help("channels", "U-Net width"))
@click.option("--classifier", is_flag=True, default=None, help="Train a noise-conditional "
              "classifier p_t(y | x(t)) for sample.py --classifier.")  # fmt: skip
@click.option("--conditional/--no-conditional", default=None, help=preset_help(
    "conditional", "Labels, dropped at --label-dropout for guidance"))  # fmt: skip
@click.option("--label-dropout", type=cli.Number(0, 1), help=preset_help("label_dropout"))
@click.option("--likelihood-weighting", is_flag=True, help="lambda(t) = g(t)^2, not std(t)^2.")
@click.option("--noise-sampling", type=click.Choice(sgm.NOISE_SAMPLINGS), help=preset_help(
    "noise_sampling", "How t is drawn (see sgm.training_times)"))  # fmt: skip
@click.option("--sigma-max", type=cli.Number(0, 1e6, low_open=True), help="VE only [50].")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder [runs/<sde>].")
@click.option("--resume", is_flag=True, help="Continue <out>/ckpt.pt with its stored config.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out (else it is refused).")
@click.option("--seed", type=int, help=preset_help("seed"))
@click.option(
    "--data",
    default="fashion-mnist",
    show_default=True,
    help="fashion-mnist, mnist, "
    "cifar10, a folder of images (first-level subfolders: classes) or an .npz file.",
)
@cli.data_root_option
@click.option(
    "--image-size",
    type=click.IntRange(1, 4096),
    help="Resize the shorter side and centre-crop to SxS [the images' own size].",
)
@click.option("--grayscale", is_flag=True, default=None, help="One channel [as the images].")
@click.option("--flip", is_flag=True, default=None, help="Random horizontal flips in training.")
@click.option("--limit-data", type=click.IntRange(1), help="Use the first N training images.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the network.")
@click.option("--amp/--no-amp", default=None, help="bf16 autocast [on CUDA; off on a CPU].")
@click.option("--log-every", type=click.IntRange(1), help=preset_help("log_every"))
@click.option("--sample-every", type=click.IntRange(1), help=preset_help("sample_every"))
@click.option("--ckpt-every", type=click.IntRange(1), help=preset_help("ckpt_every"))
@click.pass_context
def main(ctx, **flags):
    """Train a score-based generative model (Song et al. 2021) on FashionMNIST or other images."""
    if flags["steps"] is not None and flags["epochs"] is not None:
        raise click.ClickException("give one of --steps and --epochs")
    snapshots = parse_minutes(flags["snapshot_minutes"])
    if flags["resume"] and flags["overwrite"]:
        raise click.ClickException("--resume continues the run in --out; --overwrite replaces it")
    data.check_image_size(flags["image_size"])
    flags["data"] = data.describe(flags["data"])  # a folder's or file's absolute path
    device, world, rank = setup_processes(flags["device"])
    if (flags["time_limit"] or snapshots) and world > 1:
        raise click.ClickException("--time-limit and snapshots need one process")
    out = flags["out"] or os.path.join("runs", flags["sde"] or checkpoint.TrainConfig.sde)
    stored = (
        checkpoint.load(os.path.join(out, "ckpt.pt"), device, False, kind=None)
        if flags["resume"]
        else None
    )
    if stored and stored.resume is None:
        raise click.ClickException(f"{out}/ckpt.pt has no optimizer state: it cannot be resumed")
    check_snapshots(snapshots, flags["time_limit"], stored)
    cfg = build_config(ctx, flags, device, stored.train_config if stored else None)
    if flags["epochs"] is None:
        check_steps_left(out, stored, cfg.steps, "--steps")
    if rank == 0:
        data.check_not_into(out, cfg.data)  # a run's files would become training images
        checkpoint.check_run_folder(out, flags["resume"], flags["overwrite"])
    dataset = data.load(
        cfg.data,
        flags["data_root"],
        True,
        cfg.image_size or None,
        cfg.grayscale,
        note=console.print if rank == 0 else lambda text: None,
    )
    images, labels = data.training_data(dataset, cfg.limit_data, cfg.batch_size * world)
    cfg = fit_to_data(ctx, cfg, dataset, len(images), stored)
    if flags["epochs"] is not None:
        cfg.steps = max(1, round(flags["epochs"] * len(images) / (cfg.batch_size * world)))
        check_steps_left(out, stored, cfg.steps, f"--epochs {flags['epochs']:g}")
    torch.manual_seed(cfg.seed + rank)  # the network's initial weights
    ckpt = stored or checkpoint.new_checkpoint(cfg, images, labels, dataset.classes, device)
    ckpt.train_config = cfg
    ema, optimizer = checkpoint.training_state(ckpt, cfg, device, rank, f"{out}/ckpt.pt")
    bf16 = cli.use_bf16(device, cfg.amp)
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16)
    net = torch.compile(ckpt.net) if flags["use_compile"] else ckpt.net
    net = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    labels = None if labels is None else labels.to(device)
    run = Run(cfg, ckpt, net, ema, optimizer, autocast, images.to(device), labels,
              device, world, rank, out, flags["time_limit"], snapshots)  # fmt: skip
    if cfg.classifier and rank == 0:  # the test images it is scored on
        test = data.load_shaped(cfg.data, flags["data_root"], False, cfg.image_size,
                                cfg.grayscale, dataset.shape, "the run", console.print)  # fmt: skip
        run.held_out = (test.images[:HELD_OUT], test.labels[:HELD_OUT])
    if rank == 0:
        checkpoint.start_run_folder(out, stored.step if stored else None)
    train(run)


def fit_to_data(ctx, cfg, dataset, n_images, stored):
    """A new run's network follows the data: a level per halving down to 7 or 8 pixels, labels
    only where the data has them. A resumed run must find the data it was trained on: its
    shape, its classes (files of older versions: their number) and its number of images."""
    if stored is not None:
        then = (stored.shape, stored.extra.get("classes"), stored.extra.get("train_images"))
        now = (dataset.shape, list(dataset.classes), n_images)
        names = ("image shape", "classes", "training images")
        for what, before, after in zip(names, then, now, strict=True):
            if before is not None and before != after:
                raise click.ClickException(f"--data {cfg.data} has changed since the run began "
                                           f"(its {what}: {after}, not {before}): --resume "
                                           "continues on the same data")  # fmt: skip
        if stored.model_config.num_classes not in (0, len(dataset.classes)):
            raise click.ClickException(f"--data {cfg.data} now has {len(dataset.classes)} classes"
                                       f", the run {stored.model_config.num_classes}")  # fmt: skip
        return cfg
    if cfg.classifier:  # it has no use for the score model's label dropout
        if dataset.labels is None:
            raise click.ClickException(f"--classifier needs labels, and {cfg.data} has none: "
                                       "put the images in one subfolder per class")  # fmt: skip
        cfg = dataclasses.replace(cfg, conditional=False)
    if cfg.conditional and dataset.labels is None:
        if ctx.get_parameter_source("conditional") == ParameterSource.COMMANDLINE:
            raise click.ClickException(f"--conditional needs labels, and {cfg.data} has none: "
                                       "put the images in one subfolder per class")  # fmt: skip
        cfg = dataclasses.replace(cfg, conditional=False)
    mult = data.channel_mult(dataset.shape[-1], cfg.channel_mult, cfg.data)
    return dataclasses.replace(cfg, channel_mult=mult)


def parse_minutes(text):
    """--snapshot-minutes "5,10" -> [5.0, 10.0]: minutes of the run's training in all."""
    minutes = (
        sorted(set(cli.parse_list(text, "--snapshot-minutes", what="minutes"))) if text else []
    )
    for value in minutes:
        cli.check_number("--snapshot-minutes", value, 0, 1e6, low_open=True)
    return minutes


def check_snapshots(minutes, time_limit, stored):
    """Snapshots count the run's minutes in all; --time-limit those of this process, which
    resumes a run after its minutes so far."""
    done = stored.extra.get("train_seconds", 0.0) / 60 if stored else 0.0
    if time_limit and minutes and minutes[-1] > done + time_limit:
        raise click.ClickException(f"--snapshot-minutes {minutes[-1]:g} is past the run's "
                                   f"{done + time_limit:g} minutes ({done:.1f} done and "
                                   f"--time-limit {time_limit:g})")  # fmt: skip


def check_steps_left(out, stored, steps, given):
    """A resumed run must have steps left to train."""
    if stored and steps <= stored.step:
        raise click.ClickException(
            f"nothing to do: {out} is at step {stored.step} and {given} asks for {steps}"
        )


if __name__ == "__main__":
    main()
