"""
Training state: what a checkpoint holds and how it is written and read.

    EMA             the moving average of the weights that sampling uses
    TrainConfig     everything that defines a training run, stored whole in each checkpoint
    PRESETS         train.py --preset: `default` for a GPU, `quick` for a laptop CPU
    Checkpoint      a trained model with its SDE, data range and configs; `score_fn` and
                    `prior_labels` for sampling
    save / load
                    atomic writes; loads with torch.load(weights_only=True) and one-line errors

The paper's mathematics is in sgm.py; this is the bookkeeping around it, used by train.py,
sample.py and evaluate.py.
"""

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

import data
import sgm


class EMA:
    """Exponential moving average of a network's weights: shadow <- decay shadow + (1 - decay) w."""

    def __init__(self, net, decay=0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net, decay=None):
        decay = self.decay if decay is None else decay
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, net):
        net.load_state_dict(self.shadow)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        for k, v in state.items():
            self.shadow[k].copy_(v)


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a training run; train.py stores it whole in the checkpoint, and
    --resume restores it. Defaults: the `default` preset (a GPU-sized model) but unconditional."""

    preset: str = "default"
    sde: str = "vp"
    conditional: bool = False  # labels, dropped at label_dropout (guidance); both presets: True
    label_dropout: float = 0.1
    likelihood_weighting: bool = False
    noise_sampling: str = "uniform"  # of t: uniform, lognormal (EDM) or importance (see dsm_loss)
    sigma_max: float = None  # VE only: None keeps VESDE's 50
    channels: int = 64
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    dropout: float = 0.1
    batch_size: int = 128  # per process
    steps: int = 100_000
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warm-up steps
    lr_schedule: str = "constant"  # or "cosine": down to 0 at `steps`
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the largest decay; with ema_ramp, reached late
    ema_ramp: float = 0.0  # > 0: EMA half-life at most ema_ramp x the steps so far (EDM)
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16
    seed: int = 0
    limit_data: int = 0  # 0: all training images
    # May change on --resume:
    log_every: int = 50
    sample_every: int = 5000
    ckpt_every: int = 2500

    def __post_init__(self):
        if self.sde not in sgm.SDES:
            raise sgm.SGMError(f"unknown SDE {self.sde!r}; known: {', '.join(sgm.SDES)}")
        sgm.check_number("lr", self.lr, 0, 1e3, low_open=True)
        sgm.check_number("ema_decay", self.ema_decay, 0, 1)
        sgm.check_number("grad_clip", self.grad_clip, 0, 1e6, low_open=True)
        sgm.check_number("label_dropout", self.label_dropout, 0, 1)
        sgm.check_number("ema_ramp", self.ema_ramp, 0, 1)
        sgm.check_noise_sampling(self.noise_sampling, self.likelihood_weighting)
        if self.lr_schedule not in LR_SCHEDULES:
            raise sgm.SGMError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.sigma_max is not None:
            if self.sde != "ve":
                raise sgm.SGMError(f"sigma_max is the VE SDE's: not with the {self.sde} SDE")
            sgm.check_number("sigma_max", self.sigma_max, sgm.VESDE.sigma_min, 1e6, low_open=True)

    def make_sde(self):
        return (
            sgm.SDES[self.sde]() if self.sigma_max is None else sgm.VESDE(sigma_max=self.sigma_max)
        )

    @classmethod
    def from_dict(cls, stored):
        """From a checkpoint. Fields a file of an older version lacks take their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in stored.items() if k in known}
        if "channel_mult" in values:
            values["channel_mult"] = tuple(values["channel_mult"])
        return cls(**values)


PRESETS = {  # train.py --preset: what each changes from TrainConfig's defaults
    "default": dict(conditional=True),  # 6.19 M parameters, for a GPU
    "quick": dict(  # 0.17 M parameters, for a laptop CPU: 16 minutes on 2 cores (README)
        conditional=True, channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, dropout=0.0,
        batch_size=32, steps=6500, lr=2e-3, warmup=100, lr_schedule="constant", ema_decay=0.995,
        sample_every=2500, ckpt_every=500,
    ),
}  # fmt: skip


FORMAT = "sgm-checkpoint-1"


class CheckpointError(sgm.SGMError):
    pass


def first_line(error, limit=100):
    """An exception's message cut to one short line, for the one-line errors of a damaged file."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


@dataclass
class Checkpoint:
    """A trained model and what it takes to use it. `load` returns `net` in eval mode
    with the EMA weights (is_ema). `resume` holds what train.py --resume needs: raw and EMA
    weights, optimizer and RNG states (None in an export, which keeps only the EMA weights)."""

    net: sgm.UNet
    sde: sgm.SDE
    data_range: tuple
    model_config: sgm.ModelConfig
    train_config: TrainConfig
    step: int = 0
    is_ema: bool = False
    extra: dict = field(default_factory=dict)
    resume: dict = None

    def score_fn(self, labels=None, guidance=0.0):
        """score_fn(x, t): unconditional without labels; else for labels (B,) with classifier-free
        guidance of weight `guidance`."""
        score = sgm.score_model(self.net, self.sde)
        return score if labels is None else sgm.guided_score(score, labels, guidance)

    def prior_labels(self, n, seed=0, device=None):
        """n labels in the proportions of the training classes (`extra["class_counts"]`; equal
        for files that lack it): sampling p(x | y) for them samples p(x) = sum_y p(y) p(x | y).
        Systematic sampling gives each class its share to within one; the order is random."""
        num_classes = self.model_config.num_classes
        counts = self.extra.get("class_counts", [1] * num_classes)
        counts = torch.tensor(counts, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        points = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(n)) / n
        labels = torch.searchsorted(counts.cumsum(0) / counts.sum(), points, right=True)
        labels = labels.clamp(max=num_classes - 1)[torch.randperm(n, generator=generator)]
        return labels.to(device)


def save(ckpt_path, ckpt, *, ema=None, optimizer=None, rng=None):
    """Write `ckpt` atomically: its net's weights (as "ema" if ckpt.is_ema, else as "model"), and
    for a resumable training checkpoint the EMA, optimizer and RNG states too."""
    weights = ckpt.net.state_dict()
    state = {
        "format": FORMAT,
        "config": asdict(ckpt.model_config),
        "sde": ckpt.sde.config(),
        "data_range": tuple(ckpt.data_range),
        "model": None if ckpt.is_ema else weights,
        "ema": weights if ckpt.is_ema else (ema.state_dict() if ema is not None else None),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": ckpt.step,
        "rng": rng,
        "extra": {**ckpt.extra, "train": asdict(ckpt.train_config)},
    }
    data.atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))


def load(ckpt_path, device="cpu", use_ema=True):
    """Load with weights_only=True, so a malicious file cannot run code. Raises CheckpointError
    naming the file and the problem."""
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"{ckpt_path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about plain pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:
        reason = first_line(e)
        if "Weights only load failed" in reason:
            reason = "it holds objects that weights_only=True refuses: a foreign or unsafe file"
        raise CheckpointError(f"{ckpt_path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_path}: not an sgm checkpoint (no '{FORMAT}' format tag)")
    try:
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"step {state['step']!r}")
        low, high = (float(v) for v in state["data_range"])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"data_range {state['data_range']!r}")
        stored = {**state["config"], "channel_mult": tuple(state["config"]["channel_mult"])}
        model_config = sgm.ModelConfig(**stored)
        net = sgm.UNet(model_config).to(device)
        is_ema = state["ema"] is not None and (use_ema or state["model"] is None)
        net.load_state_dict(state["ema"] if is_ema else state["model"])
        # Files from older versions stored part of the training configuration: the rest follows
        # from the network, or takes the defaults.
        architecture = {
            k: stored[k] for k in ("channels", "channel_mult", "num_res_blocks", "dropout")
        }
        train_config = TrainConfig.from_dict({**architecture, **state["extra"].get("train", {})})
        resumable = state["optimizer"] is not None and state["model"] is not None
        return Checkpoint(
            net=net.eval().requires_grad_(False),
            sde=sgm.sde_from_config(state["sde"]),
            data_range=(low, high),
            model_config=model_config,
            train_config=train_config,
            step=state["step"],
            is_ema=is_ema,
            extra=state["extra"],
            resume={k: state[k] for k in ("model", "ema", "optimizer", "rng")}
            if resumable
            else None,
        )
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{ckpt_path}: damaged sgm checkpoint ({first_line(e)})") from None
