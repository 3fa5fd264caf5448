"""
Train a score-based model on FashionMNIST.

    python train.py --device cuda                   # the default model, on a GPU
    python train.py --preset quick                  # a small model for a laptop CPU, ~16 minutes
    python train.py --resume --out runs/vp          # continue a run exactly where it stopped
    torchrun --nproc_per_node 2 train.py ...        # data-parallel on GPUs (or CPU processes)

A run folder holds ckpt.pt (atomic; also written on Ctrl-C and SIGTERM), log.jsonl (a line per log
interval) and samples_<step>.png (EMA weights, Heun, 35 NFE). The run's whole configuration
(checkpoint.TrainConfig: the preset, then the flags) is stored in the checkpoint; --resume
restores it.
"""

import copy
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time

import click
import torch
import torch.distributed as dist
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import checkpoint
import data
import sgm

console = Console(stderr=True, soft_wrap=True)
RESUMABLE = ("steps", "log_every", "sample_every", "ckpt_every")  # may change on --resume
GRID_STEPS = sgm.SOLVERS["heun"].steps  # the sample grids: Heun, 35 NFE
CALIBRATION = 5  # --minutes: the speed is timed from this step on (the first ones are slow)


class Command(click.Command):
    """The one error handler: library errors (bad checkpoint, missing data, ...) become one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except sgm.SGMError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full disk, a read-only folder, ...: the files written stay intact
            raise click.ClickException(f"{e.filename or 'I/O'}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------------------
# Set-up: processes, configuration, network and optimizer


def setup_processes(device):
    """(device, world size, rank) for a plain run or a torchrun process; sets the CPU threads."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = data.resolve_device(device)
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # =1 lets runs share a machine
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // world))
    return device, world, rank


def build_config(ctx, flags, stored=None):
    """The run's TrainConfig: the preset, then the flags given. On --resume, the stored config; a
    flag that contradicts it is refused, except those in RESUMABLE."""
    names = {f.name for f in dataclasses.fields(checkpoint.TrainConfig)}
    given = {
        name: value
        for name, value in flags.items()
        if name in names and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    if stored is None:
        preset = flags["preset"]
        return checkpoint.TrainConfig(**{**checkpoint.PRESETS[preset], "preset": preset, **given})
    for name, value in given.items():
        if name not in RESUMABLE and value != getattr(stored, name):
            flag = name.replace("_", "-")
            flag = (
                f"--{flag} {value}"
                if not isinstance(value, bool)
                else f"--{'' if value else 'no-'}{flag}"
            )
            raise click.ClickException(
                f"{flag} contradicts the run's {name} = "
                f"{getattr(stored, name)}; with --resume only --steps/--epochs and the logging "
                f"intervals may change (or start a new run with another --out)"
            )
    return dataclasses.replace(stored, **{k: v for k, v in given.items() if k in RESUMABLE})


RUN_FILE = re.compile(r"ckpt\.pt|log\.jsonl|samples_\d{7}\.png|snapshot_[0-9.e+-]+min\.pt")


def run_files(out):
    """The files in `out` with the names train.py gives a run's files."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(os.path.join(out, name) for name in names if RUN_FILE.fullmatch(name))


def check_run_folder(out, resume, overwrite):
    """Before any work: --out can be written, and a new run replaces no file silently. Files with
    a run's names are replaced only with --overwrite, and only when the folder verifiably holds a
    run (each of its ckpt.pt and snapshots loads as an sgm checkpoint); no other file is ever
    touched. Nothing is created or removed yet (see start_run_folder)."""
    if os.path.isfile(out):
        raise click.ClickException(f"--out {out} is a file, not a folder")
    data.check_writable(os.path.join(out, "ckpt.pt"))
    found = run_files(out)
    if resume or not found:
        return
    steps, foreign = {}, []
    for name in [os.path.basename(path) for path in found if path.endswith(".pt")]:
        try:
            steps[name] = checkpoint.load(os.path.join(out, name)).step
        except checkpoint.CheckpointError:
            foreign.append(name)
    if foreign or not steps:
        names = ", ".join(foreign or [os.path.basename(path) for path in found])
        why = "not sgm checkpoints" if foreign else "no sgm checkpoint shows them to be a run's"
        raise click.ClickException(
            f"{out} holds {names} ({why}): nothing there is replaced; give another --out"
        )
    if not overwrite:
        held = "a run's snapshots: use "
        if "ckpt.pt" in steps:
            held = f"a run at step {steps['ckpt.pt']}: use --resume to continue it, "
        raise click.ClickException(
            f"{out} holds {held}--out for a new run, or --overwrite to replace it"
        )


def start_run_folder(out, resume_step=None):
    """Once the run is built, just before training: create the folder and remove temporary files
    of a save that was killed. A new run removes the run files that check_run_folder allowed it
    to replace; a resumed run drops the log rows written after its checkpoint, so each step
    appears once."""
    os.makedirs(out, exist_ok=True)
    data.remove_stale(out)
    log_path = os.path.join(out, "log.jsonl")
    if resume_step is None:
        for path in run_files(out):
            os.remove(path)
    elif os.path.exists(log_path):
        rows = []
        with open(log_path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= resume_step:
                        rows.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    pass
        data.save_text("".join(rows), log_path)


def training_data(cfg, data_dir, world):
    """Images (N, C, H, W) uint8 and labels (N,): the first cfg.limit_data, if set."""
    images, labels = data.load_fashion_mnist(data_dir, train=True)
    if cfg.limit_data:
        images, labels = images[: cfg.limit_data], labels[: cfg.limit_data]
    if len(images) < cfg.batch_size * world:
        raise click.ClickException(
            f"{len(images)} images are fewer than one global batch of {cfg.batch_size * world}"
        )
    return images, labels


def new_checkpoint(cfg, images, labels, device):
    """A fresh network (initialised from the seed) for this config and data. A conditional one
    stores the class counts of its data, for unconditional sampling (`Checkpoint.prior_labels`)."""
    model_config = sgm.ModelConfig(
        image_channels=images.shape[1],
        image_size=images.shape[2],
        channels=cfg.channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        dropout=cfg.dropout,
        num_classes=10 if cfg.conditional else 0,
    )
    sde = cfg.make_sde()
    net = sgm.UNet(model_config).to(device)
    ckpt = checkpoint.Checkpoint(net, sde, sde.data_range, model_config, cfg)
    if cfg.conditional:
        ckpt.extra["class_counts"] = torch.bincount(labels, minlength=10).tolist()
    return ckpt


def training_state(ckpt, cfg, device, rank):
    """EMA and optimizer for ckpt.net, restored from ckpt.resume when resuming."""
    net = ckpt.net.to(memory_format=torch.channels_last).train().requires_grad_(True)
    ema = checkpoint.EMA(net, cfg.ema_decay)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    if ckpt.resume is not None:
        ema.load_state_dict(ckpt.resume["ema"])
        moments = ckpt.resume["optimizer"]["state"]  # with this config's settings, not the file's
        optimizer.load_state_dict({**optimizer.state_dict(), "state": moments})
        rng = ckpt.resume["rng"]
        if rng is not None and rank == 0:
            torch.set_rng_state(rng["cpu"].cpu())
            if device.startswith("cuda") and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu())
        else:  # other ranks: a fresh stream per rank and step
            torch.manual_seed(cfg.seed * 1000 + rank + ckpt.step)
    return ema, optimizer


# ------------------------------------------------------------------------------------------------
# One step, and what happens at intervals


@dataclasses.dataclass
class Run:
    """What the training loop works on."""

    cfg: checkpoint.TrainConfig
    ckpt: checkpoint.Checkpoint  # ckpt.net is the network being trained, with its raw weights
    net: torch.nn.Module  # ckpt.net, compiled and/or wrapped for data parallelism
    ema: checkpoint.EMA
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast
    images: torch.Tensor  # (N, C, H, W) uint8, on the device
    labels: torch.Tensor  # (N,)
    device: str
    world: int
    rank: int
    out: str
    time_limit: float = None  # minutes
    minutes: float = None  # --minutes: fit the steps to this budget
    snapshots: list = dataclasses.field(default_factory=list)  # minutes at which to export EMA
    seconds_before: float = 0.0  # training time of the run before this process (--resume)
    calibration: tuple = None  # (steps, seconds) when --minutes starts timing
    fits: int = 0  # how often --minutes has fitted the steps
    progress: Progress = None
    task: int = None
    stop: int = 0  # the signal that asked to stop

    @property
    def ckpt_path(self):
        return os.path.join(self.out, "ckpt.pt")


def batch_indices(step, batch_size, n, seed, rank=0, world=1):
    """This rank's indices of the global batch `step`: each epoch is a permutation drawn from
    (seed, epoch), so the data order follows from the step alone and a resumed run sees the same
    batches."""
    per_epoch = n // (batch_size * world)
    epoch, pos = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    start = (pos * world + rank) * batch_size
    return perm[start : start + batch_size]


_permutation = {}


def epoch_permutation(n, seed, epoch):
    key = (n, seed, epoch)
    if key not in _permutation:  # one epoch's permutation, cached: drawn once per epoch
        _permutation.clear()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        _permutation[key] = torch.randperm(n, generator=generator)
    return _permutation[key]


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
    idx = batch_indices(step, B, len(run.images), cfg.seed, run.rank, run.world)
    idx = idx.to(run.device, non_blocking=True)
    x = data.to_model_range(run.images[idx], run.ckpt.data_range, dequantize=True)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = None
    if cfg.conditional:  # dropped labels (-1) train the unconditional score for guidance
        dropped = torch.rand(B, device=run.device) < cfg.label_dropout
        labels = run.labels[idx].masked_fill(dropped, -1)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)
    with run.autocast:
        loss = sgm.dsm_loss(run.net, run.ckpt.sde, x, likelihood_weighting=cfg.likelihood_weighting,
                            labels=labels, noise_sampling=cfg.noise_sampling)  # fmt: skip
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.ckpt.net.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.ema.update(run.ckpt.net, ema_decay(cfg, step))
    return loss


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
        save_checked(run, step, run.ckpt_path, run.ckpt, **state)


def save_checked(run, step, path, ckpt, **state):
    """checkpoint.save, which refuses weights that diverged: then the run stops, saving nothing."""
    try:
        checkpoint.save(path, ckpt, **state)
    except checkpoint.DivergedError as e:
        raise stopped(run, f"the weights diverged by step {step} ({e.problem})") from None


def stopped(run, what):
    """The one line of a run stopped without saving."""
    kept = f"{run.ckpt_path} is kept" if os.path.exists(run.ckpt_path) else "is none yet"
    return click.ClickException(
        f"{what}; stopped without saving, the last good checkpoint {kept}. Try a lower --lr or "
        "--grad-clip."
    )


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
    labels = torch.arange(n, device=run.device) % 10 if run.cfg.conditional else None
    shape = (n, *run.images.shape[1:])
    generator = torch.Generator(run.device).manual_seed(0)
    score_fn = sampler.score_fn(labels)
    x, _ = sgm.sample(
        score_fn, sampler.sde, shape, "heun", GRID_STEPS, generator=generator, device=run.device
    )
    data.save_png(x, sampler.data_range, os.path.join(run.out, f"samples_{step:07d}.png"))


def check_loss(run, step, loss_sum, count):
    """The mean loss since the last log row (the only host sync); NaN or inf stops the run."""
    loss = (loss_sum / count).item()
    if not math.isfinite(loss):
        raise stopped(run, f"loss became {loss} by step {step}")
    return loss


def log_row(run, step, loss, count, seconds, log):
    """A row of log.jsonl (rank 0) and the progress display; returns the throughput."""
    rate = count * run.cfg.batch_size * run.world / seconds
    if run.rank == 0:
        lr = run.optimizer.param_groups[0]["lr"]
        row = {"step": step, "loss": loss, "lr": lr, "img_per_s": rate}
        with open(os.path.join(run.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    status = f"loss {loss:.4f}  {rate:.0f} img/s"
    run.progress.update(run.task, completed=step, status=status)
    if not log.is_terminal:  # redirected: the bar shows nothing until the end, so print a line
        log.print(f"step {step}/{run.cfg.steps} {status}", highlight=False)
    return rate


def use_bf16(device, cfg):
    """bf16 autocast (fp32 master weights) on CUDA and on CPUs with native bf16 (AVX-512 BF16 or
    AMX); elsewhere fp32, since emulated bf16 is about 10x slower than fp32."""
    if not cfg.amp:
        return False
    if device.startswith("cuda"):
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def parse_minutes(text):
    """--snapshot-minutes "5,10" -> [5.0, 10.0], sorted; a clear error for anything else."""
    if text is None:
        return []
    values = sorted(set(data.parse_list(text, "--snapshot-minutes", what="minutes")))
    for value in values:
        data.check_number("--snapshot-minutes", value, 0, 1e6, low_open=True)
    return values


def fit_steps(run, step, done, elapsed, log):
    """--minutes, after `step`, the `done`-th of this process: set the run's steps (stored in
    its config, so --resume keeps them) to what the speed fits in the budget, 2% kept in reserve.
    Fitted after 4 x CALIBRATION steps, then once more at a quarter of the budget with the speed
    measured over more steps. Returns whether the steps changed."""
    if done == CALIBRATION:
        run.calibration = (done, elapsed)
    first, second = done == 4 * CALIBRATION, run.fits == 1 and elapsed > 15 * run.minutes
    early_stop = run.stop and not run.fits  # Ctrl-C before the first fit: --resume needs steps
    if not (first or second or early_stop):
        return False
    if run.calibration and done > run.calibration[0]:
        seconds_per_step = (elapsed - run.calibration[1]) / (done - run.calibration[0])
    else:
        seconds_per_step = elapsed / done
    run.cfg.steps = step + max(1, int(0.98 * (60 * run.minutes - elapsed) / seconds_per_step))
    run.fits += 1
    run.progress.update(run.task, total=run.cfg.steps)
    log.print(
        f"{run.minutes:g} minutes at {seconds_per_step * 1e3:.0f} ms/step: {run.cfg.steps} steps",
        highlight=False,
    )
    return True


def save_snapshot(run, step, minutes):
    """The EMA weights after `step`, at `minutes` of training: <out>/snapshot_<M>min.pt."""
    snapshot = ema_checkpoint(run, step=step, is_ema=True, resume=None)
    snapshot.extra = {**run.ckpt.extra, "train_seconds": 60 * minutes}
    save_checked(run, step, os.path.join(run.out, f"snapshot_{minutes:g}min.pt"), snapshot)


# ------------------------------------------------------------------------------------------------
# The command


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--preset",
    type=click.Choice(list(checkpoint.PRESETS)),
    default="default",
    show_default=True,
    help="Model size and schedule; the options below override it.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--sde", type=click.Choice(list(sgm.SDES)), default="vp", show_default=True)
@click.option("--steps", type=click.IntRange(1), help="Training steps [preset].")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), help="Instead of --steps.")
@click.option(
    "--time-limit",
    type=click.FloatRange(0, 1e6, min_open=True),
    help="Minutes of training (sampling excluded), then save and stop.",
)
@click.option(
    "--minutes",
    type=click.FloatRange(0, 1e6, min_open=True),
    help="A training budget: the steps (and so the LR schedule) are fitted to it from the speed "
    "of the first steps; training stops at the budget in any case.",
)
@click.option(
    "--snapshot-minutes",
    help="Comma-separated minutes of training at which to export the EMA weights "
    "(snapshot_<M>min.pt), e.g. 5,10.",
)
@click.option("--batch-size", type=click.IntRange(1), help="Per process [preset].")
@click.option("--lr", type=click.FloatRange(0, 1e3, min_open=True), help="Adam's [preset].")
@click.option("--warmup", type=click.IntRange(0), help="Linear warm-up steps [preset].")
@click.option(
    "--lr-schedule", type=click.Choice(checkpoint.LR_SCHEDULES), help="After warm-up [preset]."
)
@click.option("--grad-clip", type=click.FloatRange(0, 1e6, min_open=True), help="[1.0]")
@click.option("--ema-decay", type=click.FloatRange(0, 1), help="The largest decay [preset].")
@click.option(
    "--ema-ramp",
    type=click.FloatRange(0, 1),
    help="EMA half-life at most this fraction of the steps so far; 0: fixed decay [preset].",
)
@click.option("--channels", type=click.IntRange(4), help="U-Net base width [preset].")
@click.option(
    "--conditional/--no-conditional",
    default=None,
    help="Train with labels, dropped at --label-dropout for guidance [on in both presets].",
)
@click.option("--label-dropout", type=click.FloatRange(0, 1), help="With --conditional [0.1].")
@click.option("--likelihood-weighting", is_flag=True, help="lambda(t) = g(t)^2, not std(t)^2.")
@click.option(
    "--noise-sampling",
    type=click.Choice(sgm.NOISE_SAMPLINGS),
    help="How t is drawn: uniform, lognormal (EDM, with its weighting) or importance "
    "(log-uniform noise level; with --likelihood-weighting its weight is constant) [preset].",
)
@click.option(
    "--sigma-max",
    type=click.FloatRange(0, 1e6, min_open=True),
    help="VE only: the largest noise level [50].",
)
@click.option("--out", type=click.Path(file_okay=False), help="Run folder [runs/<sde>].")
@click.option("--resume", is_flag=True, help="Continue <out>/ckpt.pt with its stored config.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out (else it is refused).")
@click.option("--seed", type=int, help="[0]")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default=data.DATA_DIR,
    show_default=True,
    help="FashionMNIST folder.",
)
@click.option("--limit-data", type=click.IntRange(1), help="Use the first N training images.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the network.")
@click.option(
    "--amp/--no-amp", default=True, help="bf16 autocast on CUDA and CPUs with native bf16 [on]."
)
@click.option("--log-every", type=click.IntRange(1), help="[50]")
@click.option("--sample-every", type=click.IntRange(1), help="[preset]")
@click.option("--ckpt-every", type=click.IntRange(1), help="[preset]")
@click.pass_context
def main(ctx, **flags):
    """Train a score-based generative model (Song et al. 2021) on FashionMNIST."""
    if sum(flags[name] is not None for name in ("steps", "epochs", "minutes")) > 1:
        raise click.ClickException("give one of --steps, --epochs and --minutes")
    for name in ("time_limit", "epochs", "minutes", "sigma_max"):  # click lets NaN through
        if flags[name] is not None:
            data.check_number(f"--{name.replace('_', '-')}", flags[name], 0, 1e6, low_open=True)
    if flags["minutes"] and flags["resume"]:
        raise click.ClickException("--minutes fits a new run's steps; --resume continues to them")
    if flags["minutes"] and flags["time_limit"]:
        raise click.ClickException("--minutes is already a time limit: give one of the two")
    snapshots = parse_minutes(flags["snapshot_minutes"])
    budget = flags["minutes"] or flags["time_limit"]
    if budget and snapshots and snapshots[-1] > budget:
        raise click.ClickException(
            f"--snapshot-minutes {snapshots[-1]:g} is past the run's {budget:g} minutes"
        )
    device, world, rank = setup_processes(flags["device"])
    if (flags["time_limit"] or flags["minutes"] or snapshots) and world > 1:
        raise click.ClickException("--time-limit, --minutes and snapshots need one process")
    out = flags["out"] or os.path.join("runs", flags["sde"])
    ckpt_path = os.path.join(out, "ckpt.pt")
    if flags["resume"] and flags["overwrite"]:
        raise click.ClickException("--resume continues the run in --out; --overwrite replaces it")
    stored = None
    if flags["resume"]:
        stored = checkpoint.load(ckpt_path, device, use_ema=False)
        if stored.resume is None:
            raise click.ClickException(f"{ckpt_path} has no optimizer state: it cannot be resumed")
    cfg = build_config(ctx, flags, stored.train_config if stored else None)
    if flags["epochs"] is None:
        check_steps_left(out, stored, cfg.steps, "--steps")
    if rank == 0:
        check_run_folder(out, flags["resume"], flags["overwrite"])

    images, labels = training_data(cfg, flags["data_dir"], world)
    if flags["epochs"] is not None:
        cfg.steps = max(1, round(flags["epochs"] * len(images) / (cfg.batch_size * world)))
        check_steps_left(out, stored, cfg.steps, f"--epochs {flags['epochs']:g}")
    torch.manual_seed(cfg.seed + rank)  # the network's initial weights
    ckpt = stored or new_checkpoint(cfg, images, labels, device)
    ckpt.train_config = cfg
    try:
        ema, optimizer = training_state(ckpt, cfg, device, rank)
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
        reason = data.first_line(e)
        raise click.ClickException(f"{ckpt_path}: damaged resume state ({reason})") from None

    # Speed set-up: autocast, compile and DDP in three lines.
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=use_bf16(device, cfg))
    net = torch.compile(ckpt.net) if flags["use_compile"] else ckpt.net
    net = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    run = Run(
        cfg=cfg,
        ckpt=ckpt,
        net=net,
        ema=ema,
        optimizer=optimizer,
        autocast=autocast,
        images=images.to(device),  # uint8, 47 MB: kept on the device, no copy per step
        labels=labels.to(device),
        device=device,
        world=world,
        rank=rank,
        out=out,
        time_limit=flags["time_limit"] or flags["minutes"],
        minutes=flags["minutes"],
        snapshots=snapshots,
        seconds_before=ckpt.extra.get("train_seconds", 0.0),
    )
    if rank == 0:
        start_run_folder(out, stored.step if stored else None)
    train(run)


def check_steps_left(out, stored, steps, given):
    """A resumed run must have steps left to train."""
    if stored and steps <= stored.step:
        raise click.ClickException(
            f"nothing to do: {out} is at step {stored.step} and {given} asks for {steps}"
        )


def stop_on_signals(run):
    """Ctrl-C (SIGINT) and SIGTERM (timeout, a cluster's scheduler) set run.stop; the loop then
    saves at the end of the step, so --resume continues exactly. Returns the previous handlers."""

    def handler(signum, frame):
        run.stop = signum

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def announce(run, log):
    n_params = sum(p.numel() for p in run.ckpt.net.parameters()) / 1e6
    bf16 = use_bf16(run.device, run.cfg)
    precision = "bf16 autocast" if bf16 else "fp32"
    if run.cfg.amp and not bf16:
        precision += " (this CPU has no native bf16)"
    log.print(
        f"[bold]sgm[/] {type(run.ckpt.sde).__name__} on {run.device} x{run.world} in {precision}, "
        f"{n_params:.2f} M parameters, batch {run.cfg.batch_size}x{run.world}, steps "
        f"{run.ckpt.step} -> {run.cfg.steps}, {len(run.images)} images in {run.ckpt.data_range}, "
        f"out {run.out}"
    )


def train(run):
    """The training loop: a step, then at intervals a log line, a checkpoint and a sample grid."""
    cfg, start = run.cfg, run.ckpt.step
    log = console if run.rank == 0 else Console(quiet=True)
    announce(run, log)
    columns = (BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    run.progress = Progress(TextColumn("step {task.completed}/{task.total}"), *columns,
                            TimeRemainingColumn(), console=log, disable=run.rank != 0)  # fmt: skip
    saved = (run.ckpt.resume or {}).get("log") or {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
    loss_sum = torch.as_tensor(saved["loss_sum"], dtype=torch.float32).to(run.device).reshape(())
    count, t_log, step = saved["count"], time.time() - saved["seconds"], start  # the interval
    loss, rates, t_start, sampling = float("nan"), [], time.time(), 0.0
    handlers = stop_on_signals(run)
    try:
        with run.progress:
            run.task = run.progress.add_task("train", total=cfg.steps, completed=start, status="")
            end = cfg.steps  # earlier with --time-limit; the config keeps the planned steps
            snapshots = [m for m in run.snapshots if 60 * m > run.seconds_before]
            while step < end:
                loss_sum += train_step(run, step).detach().float()
                count, step = count + 1, step + 1
                elapsed = time.time() - t_start - sampling
                if run.minutes and fit_steps(run, step, step - start, elapsed, log):
                    end = cfg.steps
                while snapshots and run.seconds_before + elapsed >= 60 * snapshots[0]:
                    save_snapshot(run, step, snapshots.pop(0))
                if run.time_limit and elapsed > 60 * run.time_limit and step < end:
                    end = step  # out of time: this step is the last, saved below
                    run.progress.update(run.task, total=step)
                    if run.minutes:  # the budget is spent: the run is complete
                        cfg.steps = step
                last = step == end or run.stop
                row = step % cfg.log_every == 0 or step == cfg.steps  # a log interval ends
                if not (row or last or step % cfg.ckpt_every == 0):
                    continue
                loss = check_loss(run, step, loss_sum, count)
                if row:  # a stop in mid-interval saves the interval, and --resume completes it
                    rates.append(log_row(run, step, loss, count, time.time() - t_log, log))
                    loss_sum.zero_()
                    count, t_log = 0, time.time()
                if step % cfg.ckpt_every == 0 or last:
                    run.ckpt.extra["train_seconds"] = run.seconds_before + elapsed
                    save(run, step, (loss_sum, count, time.time() - t_log))
                if run.stop:
                    break
                if run.rank == 0 and (step % cfg.sample_every == 0 or last):
                    t_grid = time.time()
                    sample_grid(run, step)
                    sampling += time.time() - t_grid  # not training time
                    t_log += time.time() - t_grid
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        if run.world > 1:
            dist.destroy_process_group()
    if run.stop:
        log.print(
            f"[yellow]stopped by {signal.Signals(run.stop).name} at step {step}; checkpoint saved "
            f"to {run.ckpt_path}. Continue with --resume --out {run.out}"
        )
        sys.exit(128 + run.stop)  # 130 for Ctrl-C, 143 for SIGTERM
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
    log.print(
        f"[bold green]done[/]: {step} steps, final loss {loss:.4f}, "
        f"{(step - start) * cfg.batch_size * run.world} images in {time.time() - t_start:.0f} s, "
        f"median training throughput {rate:.0f} img/s on {run.device} x{run.world}. "
        f"Checkpoint: {run.ckpt_path}"
    )


if __name__ == "__main__":
    main()
