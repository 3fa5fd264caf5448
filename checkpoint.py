"""
Training state: what a checkpoint holds and how it is written and read.

    EMA             the moving average of the weights that sampling uses
    TrainConfig     everything that defines a training run, stored whole in each checkpoint
    PRESETS         train.py --preset: `default` for a GPU, `quick` for a laptop CPU
    Checkpoint      a trained model with its SDE, data range and configs; `score_fn` and
                    `prior_labels` for sampling
    save / load     atomic writes of weights that pass `weights_problem`; loads with
                    torch.load(weights_only=True), everything loaded checked, one-line errors
    a run           train.py's run folder (which files are its own, what may be replaced), a
                    fresh checkpoint, and the EMA and optimizer restored for --resume

The paper's mathematics is in sgm.py; this is the bookkeeping around it, used by train.py,
sample.py and evaluate.py.
"""

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

import cli
import data
import files
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


INT_RANGES = (  # TrainConfig's whole numbers: (name, lowest, highest)
    ("channels", 4, 1024), ("num_res_blocks", 1, 64), ("batch_size", 1, 2**20),
    ("steps", 1, 10**10), ("warmup", 0, 10**10), ("seed", -(2**31), 2**31 - 1),
    ("limit_data", 0, 10**9), ("log_every", 1, 10**10), ("sample_every", 1, 10**10),
    ("ckpt_every", 1, 10**10), ("image_size", 0, 4096),
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything that defines a training run; train.py stores it whole in the checkpoint, and
    --resume restores it. Defaults: the `default` preset (a GPU-sized model) but unconditional."""

    preset: str = "default"
    sde: str = "subvp"  # the shipped model's; the SDE study in docs/results.md favours it
    conditional: bool = False  # labels, dropped at label_dropout (guidance); both presets: True
    classifier: bool = False  # a noise-conditional classifier p_t(y | x(t)), not a score model
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
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (train.py: --amp)
    seed: int = 0
    limit_data: int = 0  # 0: all training images
    data: str = "fashion-mnist"  # a dataset name, or the absolute path of a folder or .npz file
    image_size: int = 0  # 0: the size the images have (all one); else resized and cropped
    grayscale: bool = False  # one channel, whatever the images have
    flip: bool = False  # random horizontal flips of the training images
    # May change on --resume:
    log_every: int = 50
    sample_every: int = 5000
    ckpt_every: int = 2500

    def __post_init__(self):
        if self.sde not in sgm.SDES:
            raise sgm.SGMError(f"unknown SDE {self.sde!r}; known: {', '.join(sgm.SDES)}")
        if self.preset not in PRESETS:
            raise sgm.SGMError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        flags = ("conditional", "classifier", "likelihood_weighting", "amp", "grayscale", "flip")
        for name in flags:
            if type(getattr(self, name)) is not bool:
                raise sgm.SGMError(f"{name} must be true or false, not {getattr(self, name)!r}")
        for name, low, high in INT_RANGES:
            cli.check_int(name, getattr(self, name), low, high)
        if not isinstance(self.data, str) or not self.data:
            raise sgm.SGMError(f"data must name a dataset, not {self.data!r}")
        if self.image_size and data.unet_levels(self.image_size) is None:
            raise sgm.SGMError(f"image_size {self.image_size} cannot be halved down to 8 pixels")
        if not 1 <= len(self.channel_mult) <= 8:
            raise sgm.SGMError(f"channel_mult must have 1 to 8 levels, not {self.channel_mult}")
        for mult in self.channel_mult:
            cli.check_int("a channel_mult level", mult, 1, 64)
        cli.check_number("dropout", self.dropout, 0, 0.99)
        cli.check_number("lr", self.lr, 0, 1e3, low_open=True)
        cli.check_number("ema_decay", self.ema_decay, 0, 1)
        cli.check_number("grad_clip", self.grad_clip, 0, 1e6, low_open=True)
        cli.check_number("label_dropout", self.label_dropout, 0, 1)
        cli.check_number("ema_ramp", self.ema_ramp, 0, 1)
        if self.noise_sampling not in sgm.NOISE_SAMPLINGS:
            raise sgm.SGMError(f"noise_sampling must be one of {', '.join(sgm.NOISE_SAMPLINGS)}")
        if self.noise_sampling == "lognormal" and self.likelihood_weighting:
            raise sgm.SGMError("lognormal noise sampling has its own weighting: not with "
                               "likelihood weighting")  # fmt: skip
        if self.lr_schedule not in LR_SCHEDULES:
            raise sgm.SGMError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.sigma_max is not None:
            if self.sde != "ve":
                raise sgm.SGMError(f"sigma_max is the VE SDE's: not with the {self.sde} SDE")
            cli.check_number("sigma_max", self.sigma_max, sgm.VESDE.sigma_min, 1e6, low_open=True)

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
    "quick": dict(  # 0.17 M parameters, for a laptop CPU (README: its time on 2 cores)
        conditional=True, channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, dropout=0.0,
        batch_size=32, steps=6500, lr=2e-3, warmup=100, lr_schedule="constant", ema_decay=0.995,
        sample_every=2500, ckpt_every=500,
    ),
}  # fmt: skip


FORMAT = "sgm-checkpoint-1"
NETWORKS = {"score": sgm.UNet, "classifier": sgm.NoiseClassifier}  # a checkpoint's "kind"
KIND_NAMES = {"score": "score model", "classifier": "noise-conditional classifier"}


class CheckpointError(sgm.SGMError):
    pass


class ResumeStateError(ValueError):
    pass


class DivergedError(sgm.SGMError):
    """Weights that `save` refuses to write; `problem` says what is wrong with them."""

    def __init__(self, message, problem):
        super().__init__(message)
        self.problem = problem


WEIGHT_LIMIT = 1e3  # no trained weight comes near it; an lr far too high passes it in a step


@torch.no_grad()
def weights_problem(net, weights=None):
    """What makes `weights` (a state dict for `net`; by default its own) unfit to save or use, or
    None: a value that is not finite or not below WEIGHT_LIMIT in size, or non-finite output of
    the network on a probe (zeros at t = 0.5; eval mode, so no random numbers are drawn)."""
    weights = net.state_dict() if weights is None else weights
    sizes = [float(w.abs().max()) for w in weights.values() if w.is_floating_point() and w.numel()]
    largest = math.nan if any(map(math.isnan, sizes)) else max(sizes, default=0.0)
    if not largest < WEIGHT_LIMIT:
        return f"largest |w| = {largest:.3g}"
    c, training, param = net.config, net.training, next(net.parameters())
    x = torch.zeros(1, c.image_channels, c.image_size, c.image_size).to(param)
    out = torch.func.functional_call(net.eval(), weights, (x, torch.full((1,), 0.5).to(param)))
    net.train(training)
    return None if torch.isfinite(out).all() else "a probe of the network gives non-finite values"


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

    @property
    def kind(self):
        """ "score" or "classifier" (a noise-conditional classifier, sgm.NoiseClassifier)."""
        return "classifier" if isinstance(self.net, sgm.NoiseClassifier) else "score"

    def classifier_fn(self):
        """A classifier's logits(x, t), for sgm.classifier_guided_score."""
        return lambda x, t: sgm.classifier_logits(self.net, self.sde, x, t)

    def score_fn(self, labels=None, guidance=0.0):
        """score_fn(x, t): unconditional without labels; else for labels (B,) with classifier-free
        guidance of weight `guidance`."""
        score = sgm.score_model(self.net, self.sde)
        return score if labels is None else sgm.guided_score(score, labels, guidance)

    @property
    def classes(self):
        """The class names of a conditional model (files of older versions: FashionMNIST's)."""
        num_classes = self.model_config.num_classes
        stored = self.extra.get("classes")
        if stored is not None:
            return tuple(stored)[:num_classes]
        if num_classes == len(data.FASHION):
            return data.FASHION
        return tuple(map(str, range(num_classes)))

    @property
    def shape(self):
        """The image shape (C, H, W)."""
        return (self.model_config.image_channels, *[self.model_config.image_size] * 2)

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


def save(ckpt_path, ckpt, *, ema=None, optimizer=None, rng=None, log=None, half=False):
    """Write `ckpt` atomically: its net's weights (as "ema" if ckpt.is_ema, else as "model"), and
    for a resumable training checkpoint the EMA, optimizer and RNG states and train.py's log
    interval in progress too. Weights with a `weights_problem` are refused (DivergedError).
    half: store float weights as fp16 (`load` casts them back)."""
    weights, ema_weights = ckpt.net.state_dict(), ema.state_dict() if ema is not None else None
    for checked in (weights, ema_weights):
        problem = checked is not None and weights_problem(ckpt.net, checked)
        if problem:
            message = f"{ckpt_path}: not written, the weights diverged ({problem})"
            raise DivergedError(message, problem)
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    state = {
        "format": FORMAT,
        "kind": ckpt.kind,
        "config": asdict(ckpt.model_config),
        "sde": {"name": ckpt.sde.name, **asdict(ckpt.sde)},
        "data_range": tuple(ckpt.data_range),
        "model": None if ckpt.is_ema else weights,
        "ema": weights if ckpt.is_ema else ema_weights,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": ckpt.step,
        "rng": rng,
        "log": log,
        "extra": {**ckpt.extra, "train": asdict(ckpt.train_config)},
    }
    files.save_torch(state, ckpt_path)


def load(ckpt_path, device="cpu", use_ema=True, kind="score"):
    """Load with weights_only=True, so a malicious file cannot run code, and check everything in
    it as strictly as train.py checks what is typed. Raises CheckpointError naming the file and
    the problem. kind: the kind of network expected ("score", "classifier"; None: either)."""
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"{ckpt_path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about plain pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:
        reason = cli.first_line(e)
        if "Weights only load failed" in reason:
            reason = "it holds objects that weights_only=True refuses: a foreign or unsafe file"
        raise CheckpointError(f"{ckpt_path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_path}: not an sgm checkpoint (no '{FORMAT}' format tag)")
    try:
        ckpt = from_state(state, device, use_ema)
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError, IndexError,
            AssertionError, OverflowError, ZeroDivisionError) as e:  # fmt: skip
        what = "resume state" if isinstance(e, ResumeStateError) else "sgm checkpoint"
        raise CheckpointError(f"{ckpt_path}: damaged {what} ({cli.first_line(e)})") from None
    if kind is not None and ckpt.kind != kind:
        hint = " (sample.py takes it as --classifier)" if ckpt.kind == "classifier" else ""
        raise CheckpointError(f"{ckpt_path} is a {KIND_NAMES[ckpt.kind]}, not a "
                              f"{KIND_NAMES[kind]}{hint}")  # fmt: skip
    return ckpt


def from_state(state, device, use_ema):
    """A Checkpoint from what `load` read; ValueError (and the like) for anything unfit."""
    cli.check_int("step", state["step"], 0, 10**12)
    model_config = make_model_config(state["config"])
    sde = make_sde(state["sde"])
    if tuple(state["data_range"]) != sde.data_range:
        raise ValueError(f"data_range {state['data_range']!r} is not the SDE's {sde.data_range}")
    kind = state.get("kind", "score")  # files of older versions: score models
    if kind not in NETWORKS:
        raise ValueError(f"kind {kind!r}; known: {', '.join(NETWORKS)}")
    if kind == "classifier" and not model_config.num_classes:
        raise ValueError("a classifier of no classes")
    check_network(model_config, (state["ema"], state["model"]), NETWORKS[kind])  # no memory yet
    net = NETWORKS[kind](model_config).to(device)
    is_ema = state["ema"] is not None and (use_ema or state["model"] is None)
    chosen, other = (state["ema"], state["model"]) if is_ema else (state["model"], state["ema"])
    if chosen is None:
        raise ValueError("no weights")
    for weights in (other, chosen):  # both checked; the chosen ones stay in the net
        if weights is not None:
            net.load_state_dict(weights)  # strict: every name and shape
            problem = weights_problem(net)
            if problem:
                raise ValueError(f"the weights diverged: {problem}")
    extra = state["extra"]
    check_extra(extra, model_config.num_classes)
    # Files from older versions stored part of the training configuration: the rest follows
    # from the network, or takes the defaults.
    names = ("channels", "channel_mult", "num_res_blocks", "dropout")
    architecture = {k: getattr(model_config, k) for k in names}
    train_config = TrainConfig.from_dict({**architecture, **extra.get("train", {})})
    resume = None
    if state["optimizer"] is not None and state["model"] is not None:
        resume = {k: state.get(k) for k in ("model", "ema", "optimizer", "rng", "log")}
        try:
            check_optimizer(resume["optimizer"], net)
            check_log(resume["log"])
            check_rng(resume["rng"])
        except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError) as e:
            raise ResumeStateError(cli.first_line(e)) from None
    return Checkpoint(
        net=net.eval().requires_grad_(False),
        sde=sde,
        data_range=sde.data_range,
        model_config=model_config,
        train_config=train_config,
        step=state["step"],
        is_ema=is_ema,
        extra=extra,
        resume=resume,
    )


MODEL_INTS = (("image_channels", 1, 64), ("image_size", 1, 4096), ("channels", 1, 1024),
              ("num_res_blocks", 1, 64), ("num_classes", 0, 10**5))  # fmt: skip


def make_model_config(stored):
    """The network's configuration, checked (sgm.UNet trusts its caller)."""
    config = sgm.ModelConfig(**{**stored, "channel_mult": tuple(stored["channel_mult"])})
    for name, low, high in MODEL_INTS:
        cli.check_int(name, getattr(config, name), low, high)
    levels = len(config.channel_mult)
    for mult in config.channel_mult:
        cli.check_int("a channel_mult level", mult, 1, 64)
    if not 1 <= levels <= 8 or config.image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size {config.image_size} does not halve {levels - 1} times")
    cli.check_number("dropout", config.dropout, 0, 0.99)
    cli.check_number("fourier_scale", config.fourier_scale, 0, 1e6, low_open=True)
    if type(config.attention) is not bool:
        raise ValueError(f"attention {config.attention!r}")
    return config


MAX_PARAMETERS = 5 * 10**8  # 2 GB in fp32; the default preset's network has 6.19 M


def check_network(config, stored=(), network=sgm.UNet):
    """The network `config` asks for, planned on the meta device (no memory, no random numbers):
    at most MAX_PARAMETERS parameters, and the names and shapes of each of the `stored` weights
    (None: absent) those of its state dict."""
    with torch.device("meta"):
        plan = network(config)
    count = sum(p.numel() for p in plan.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"the network would have {count / 1e6:.0f} M parameters, above the "
                         f"{MAX_PARAMETERS / 1e6:.0f} M this project allows")  # fmt: skip
    shapes = {name: tuple(value.shape) for name, value in plan.state_dict().items()}
    for weights in stored:
        if weights is None:
            continue
        if set(weights) != set(shapes):
            names = sorted(set(weights) ^ set(shapes))
            raise ValueError(f"the weights' names differ from the network's ({names[0]}, ...)")
        for name, shape in shapes.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"the weight {name} has shape {tuple(weights[name].shape)}, "
                                 f"not the network's {shape}")  # fmt: skip


def make_sde(stored):
    """The SDE stored as {"name", its numbers}, checked (sgm trusts its caller): a known name
    (files written before the short names stored the class's), numbers finite, positive, ordered."""
    numbers = {k: v for k, v in stored.items() if k != "name"}
    for name, value in numbers.items():
        cli.check_number(name, value, 0, 1e6, low_open=True)
    for low, high in (("sigma_min", "sigma_max"), ("beta_min", "beta_max")):
        if low in numbers and high in numbers and not numbers[low] < numbers[high]:
            raise ValueError(f"{high} must be above {low}, not {numbers[high]!r}")
    classes = [cls for cls in sgm.SDES.values() if stored["name"] in (cls.name, cls.__name__)]
    if not classes:
        raise CheckpointError(f"unknown SDE {stored['name']!r}; known: {', '.join(sgm.SDES)}")
    return classes[0](**numbers)


def check_extra(extra, num_classes):
    """What the scripts read from `extra`: class counts (one per class, some positive) and the
    training time."""
    classes = extra.get("classes")
    if classes is not None:
        named = isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)
        if not named or num_classes and len(classes) != num_classes:
            raise ValueError(f"classes {classes!r} are not {num_classes} names")
    counts = extra.get("class_counts")
    if counts is not None:
        fits = isinstance(counts, (list, tuple)) and len(counts) == num_classes
        if not (fits and all(type(c) is int and c >= 0 for c in counts) and sum(counts) > 0):
            raise ValueError(f"class_counts {counts!r} are not {num_classes} counts, some positive")
    cli.check_number("train_seconds", extra.get("train_seconds", 0.0), 0, 1e10)
    cli.check_int("train_images", extra.get("train_images", 1), 1, 10**12)
    if not isinstance(extra.get("train", {}), dict):
        raise ValueError("the stored training configuration is not a table")


def check_optimizer(optimizer, net):
    """Adam's state for `net`: its parameters in order, each with a step and two moments of its
    shape (torch checks neither before the first step), all finite, the step and the second
    moment not negative."""
    params = list(net.parameters())
    if [i for group in optimizer["param_groups"] for i in group["params"]] != [*range(len(params))]:
        raise ValueError("the optimizer state is for another network")
    for i, moments in optimizer["state"].items():
        if i not in range(len(params)):
            raise ValueError(f"the optimizer state names a parameter {i!r} the network lacks")
        if set(moments) != {"step", "exp_avg", "exp_avg_sq"} or moments["step"].numel() != 1:
            raise ValueError(f"the optimizer state of parameter {i} is not Adam's")
        for name in ("exp_avg", "exp_avg_sq"):
            if moments[name].shape != params[i].shape or not moments[name].is_floating_point():
                raise ValueError(
                    f"the optimizer's {name} of parameter {i} has shape "
                    f"{tuple(moments[name].shape)}, not {tuple(params[i].shape)}"
                )
        values = {name: moments[name].double() for name in ("step", "exp_avg", "exp_avg_sq")}
        for name, value in values.items():
            if not torch.isfinite(value).all() or name != "exp_avg" and (value < 0).any():
                raise ValueError(f"the optimizer's {name} of parameter {i} is not finite and "
                                 f"non-negative (it holds {float(value.min()):.3g})")  # fmt: skip


def check_rng(rng):
    """The RNG states train.py stores: a CPU generator state, and a CUDA one where it ran on a GPU
    (seed and offset, 16 bytes)."""
    if rng is None:
        return
    if not isinstance(rng, dict) or set(rng) - {"cpu", "cuda"} or "cpu" not in rng:
        raise ValueError("the RNG state is not {'cpu': ..., 'cuda': ...}")
    for name, state in rng.items():
        if state is None and name == "cuda":
            continue
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError(f"the {name} RNG state is not a byte tensor")
    torch.Generator().set_state(rng["cpu"].cpu())  # RuntimeError for a state of the wrong size
    if rng.get("cuda") is not None and rng["cuda"].numel() != 16:
        raise ValueError(f"the cuda RNG state has {rng['cuda'].numel()} bytes, not 16")


def check_log(log):
    """train.py's log interval in progress: a finite loss sum over `count` steps, in `seconds`."""
    if log is not None:
        loss_sum = log["loss_sum"]
        if loss_sum.numel() != 1 or not torch.isfinite(loss_sum).all():
            raise ValueError(f"log loss_sum {loss_sum!r}")
        cli.check_int("log count", log["count"], 0, 10**10)
        cli.check_number("log seconds", log["seconds"], 0, 1e10)


# ------------------------------------------------------------------------------------------------
# A run: its folder, a fresh checkpoint, and the training state restored from one (train.py)

RUN_FILE = re.compile(r"ckpt\.pt|log\.jsonl|samples_\d{7}\.png|snapshot_[0-9.e+-]+min\.pt")


def run_files(out):
    """The files in `out` with the names train.py gives a run's files."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(os.path.join(out, name) for name in names if RUN_FILE.fullmatch(name))


def check_run_folder(out, resume, overwrite):
    """Before any work: --out can be written, and a new run replaces no file silently. Files with
    a run's names are replaced only with --overwrite, and only when the folder verifiably holds a
    run (each of its checkpoints loads); no other file is ever touched."""
    if os.path.isfile(out):
        raise sgm.SGMError(f"--out {out} is a file, not a folder")
    cli.check_writable(os.path.join(out, "ckpt.pt"))
    found = run_files(out)
    odd = [os.path.basename(path) for path in found if not os.path.isfile(path)]
    if odd:  # a folder, a FIFO, a dangling link: neither removed, read nor written
        raise sgm.SGMError(
            f"{out} holds {', '.join(odd)}, not a plain file but with a run file's name: nothing "
            "there is touched; move it or give another --out"
        )
    if resume or not found:
        return
    steps, foreign = {}, []
    for name in [os.path.basename(path) for path in found if path.endswith(".pt")]:
        try:
            steps[name] = load(os.path.join(out, name), kind=None).step
        except CheckpointError:
            foreign.append(name)
    if foreign or not steps:
        names = ", ".join(foreign or [os.path.basename(path) for path in found])
        why = "not sgm checkpoints" if foreign else "no sgm checkpoint shows them to be a run's"
        raise sgm.SGMError(f"{out} holds {names} ({why}): nothing there is replaced; "
                           "give another --out")  # fmt: skip
    if not overwrite:
        held = "a run's snapshots: use "
        if "ckpt.pt" in steps:
            held = f"a run at step {steps['ckpt.pt']}: use --resume to continue it, "
        raise sgm.SGMError(f"{out} holds {held}--out for a new run, or --overwrite")


def start_run_folder(out, resume_step=None):
    """Just before training: create the folder and remove temporary files of a killed save. A new
    run removes the run files check_run_folder allowed it to replace; a resumed run drops the log
    rows written after its checkpoint, so each step appears once."""
    os.makedirs(out, exist_ok=True)
    files.remove_stale(out)
    log_path = os.path.join(out, "log.jsonl")
    if resume_step is None:
        for path in run_files(out):
            os.remove(path)
    elif os.path.exists(log_path):
        rows = []
        with open(log_path, "rb") as f:  # bytes: a line that is not UTF-8 is dropped, not fatal
            for line in f:
                try:
                    if json.loads(line)["step"] <= resume_step:
                        rows.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or damaged
                    pass
        files.save_text(b"".join(rows).decode(errors="replace"), log_path)


def new_checkpoint(cfg, images, labels, classes, device):
    """A fresh network (initialised from the seed) for this config and data (N, C, S, S): a score
    model, or with cfg.classifier a noise-conditional classifier of the classes. It stores the
    class names and, when labelled, the class counts of its data, for unconditional sampling
    (`Checkpoint.prior_labels`)."""
    labelled = cfg.conditional or cfg.classifier
    num_classes = len(classes) if labelled else 0
    model_config = sgm.ModelConfig(image_channels=images.shape[1], image_size=images.shape[2],
                                   channels=cfg.channels, channel_mult=cfg.channel_mult,
                                   num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
                                   num_classes=num_classes)  # fmt: skip
    sde, network = cfg.make_sde(), NETWORKS["classifier" if cfg.classifier else "score"]
    try:
        check_network(model_config, network=network)
    except ValueError as e:
        raise sgm.SGMError(str(e)) from None
    net = network(model_config).to(device)
    ckpt = Checkpoint(net, sde, sde.data_range, model_config, cfg)
    ckpt.extra["train_images"] = len(images)  # --resume checks that the data is the same
    if classes:
        ckpt.extra["classes"] = list(classes)
    if labelled:
        ckpt.extra["class_counts"] = torch.bincount(labels, minlength=num_classes).tolist()
    return ckpt


def training_state(ckpt, cfg, device, rank, path):
    """EMA and optimizer for ckpt.net, restored from ckpt.resume (read from `path`) to resume."""
    net = ckpt.net.to(memory_format=torch.channels_last).train().requires_grad_(True)
    ema = EMA(net, cfg.ema_decay)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    if ckpt.resume is not None:
        try:
            ema.load_state_dict(ckpt.resume["ema"])
            moments = ckpt.resume["optimizer"]["state"]  # this config's settings, not the file's
            optimizer.load_state_dict({**optimizer.state_dict(), "state": moments})
        except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: damaged resume state ({cli.first_line(e)})") from None
        rng = ckpt.resume["rng"]
        if rng is not None and rank == 0:
            torch.set_rng_state(rng["cpu"].cpu())
            if device.startswith("cuda") and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu())
        else:  # other ranks: a fresh stream per rank and step
            torch.manual_seed(cfg.seed * 1000 + rank + ckpt.step)
    return ema, optimizer


def check_guidance_pair(score, classifier, score_path, classifier_path):
    """A noise-conditional classifier can guide a score model only if it was trained for the same
    SDE (its numbers too), the same image shape and the same classes, in order (an unconditional
    model of unlabelled data has no classes to compare)."""
    sde_text = lambda sde: f"{sde.name} ({', '.join(f'{k} {v:g}' for k, v in asdict(sde).items())})"
    classes = score.extra.get("classes")
    classes = score.classes if classes is None and score.model_config.num_classes else classes
    for what, theirs, ours in (
        ("SDE", sde_text(classifier.sde), sde_text(score.sde)),
        ("images", data.shape_text(classifier.shape), data.shape_text(score.shape)),
        ("classes", ", ".join(classifier.classes), classes and ", ".join(classes)),
    ):
        if ours is not None and theirs != ours:
            raise CheckpointError(f"{classifier_path} cannot guide {score_path}: its {what} "
                                  f"({theirs}) are not the score model's ({ours})")  # fmt: skip
