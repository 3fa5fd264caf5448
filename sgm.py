"""
Score-based generative modeling through stochastic differential equations: the mathematics of
Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, ICLR 2021 (arXiv:2011.13456), to be read top
to bottom beside the paper. Nothing is used before it is defined:

    1 SDEs        VE, VP, sub-VP (eqs. 9, 11, section 3.4); the reverse SDE (eq. 6) and ODE (13)
    2 model       the preconditioned U-Net, where it becomes a score; its encoder as p_t(y | x(t))
    3 loss        denoising score matching (eq. 7), t drawn and weighted; classifier cross-entropy
    4 numerics    Dormand-Prince 5(4), for the ODE sampler and the likelihood
    5 samplers    time grids; predictor-corrector (Algorithm 1), the probability-flow ODE; then
                  EDM's Heun and stochastic samplers, DPM-Solver++(2M) with and without noise
    6 sample      solver table, `sample`; inpainting, colorization (appendix I); guidance (eq. 14)
    7 likelihood  log-likelihood (appendix D.2), bits/dim, encode and decode (section 4.3)

Samplers take any `score_fn(x, t)`, so test_sgm.py drives them with exact Gaussian scores; their
keyword arguments are their options. The scripts check what users type before calling in here.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class SGMError(ValueError):
    """What the library refuses at run time (a diverging model, ...): the scripts print one line."""


def append_dims(v, ndim):
    """Reshape a (B,) tensor to (B, 1, ..., 1) of rank `ndim`, to broadcast against x (B, ...)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def randn_like(x, generator=None):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------
# 1. SDEs: dx = f(x, t) dt + g(t) dw, t in [0, T]


class SDE:
    """t (B,), x (B, ...). Subclasses define `sde`, the kernel's `mean_scale` a(t) and `std`, and
    `time_at_noise_level`; they set `name` (train.py's) and `data_range` (as in the paper)."""

    T = 1.0
    prior_std = 1.0
    data_range = (-1.0, 1.0)

    def sde(self, x, t):
        """Forward drift f(x, t) (B, ...) and diffusion g(t) (B,)."""
        raise NotImplementedError

    def marginal_prob(self, x, t):
        """Mean (B, ...) and std (B,) of the kernel p_0t(x(t) | x(0) = x) = N(a x, std^2 I)."""
        return append_dims(self.mean_scale(t), x.ndim) * x, self.std(t)

    def noise_level(self, t):
        """sigma(t) = std(t) / a(t): the noise level of x(t) / a(t), the time variable of EDM."""
        return self.std(t) / self.mean_scale(t)

    def prior_sampling(self, shape, generator=None, device=None):
        return self.prior_std * torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per sample, (B,)."""
        D, var = z[0].numel(), self.prior_std**2
        return -0.5 * D * math.log(2 * math.pi * var) - z.flatten(1).pow(2).sum(1) / (2 * var)

    def reverse_sde(self, x, t, score, probability_flow=False):
        """Reverse-time SDE dx = [f - g^2 s] dt + g dw (eq. 6), or with probability_flow the ODE
        dx = [f - 1/2 g^2 s] dt (eq. 13). Returns drift and diffusion (0 for the ODE)."""
        drift, diffusion = self.sde(x, t)
        factor = 0.5 if probability_flow else 1.0
        drift = drift - factor * append_dims(diffusion**2, x.ndim) * score
        return drift, (0.0 * diffusion if probability_flow else diffusion)

    def discretize(self, x, t, t_next):
        """Forward step x(t) = x(t_next) + f + G z over [t_next, t], for the reverse-diffusion
        predictor. Euler here; VE and VP override it with their exact kernels (appendix E)."""
        drift, diffusion = self.sde(x, t)
        return drift * append_dims(t - t_next, x.ndim), diffusion * (t - t_next).sqrt()

    def langevin_alpha(self, t, t_next):
        """alpha_i of Algorithms 4 and 5: 1 for VE, 1 - beta_i for VP and sub-VP."""
        return torch.ones_like(t)

    def ancestral_step(self, x, t, t_next, score):
        raise SGMError(f"ancestral sampling is not defined for {type(self).__name__}: use the "
                       "reverse diffusion predictor (reverse_diffusion, pc's default)")  # fmt: skip


@dataclass
class VESDE(SDE):
    """Variance exploding SDE (eq. 9), the continuous limit of SMLD:
    sigma(t) = sigma_min (sigma_max / sigma_min)^t. Sees data in [0, 1]."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    name = "ve"
    data_range = (0.0, 1.0)

    def __post_init__(self):
        self.prior_std = self.sigma_max

    def sde(self, x, t):
        g = self.std(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g

    def mean_scale(self, t):
        return torch.ones_like(t)

    def std(self, t):  # sigma(t), the official convention: sigma_min counts as already applied
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def time_at_noise_level(self, sigma):
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def discretize(self, x, t, t_next):
        return torch.zeros_like(x), (self.std(t) ** 2 - self.std(t_next) ** 2).sqrt()

    def ancestral_step(self, x, t, t_next, score):
        """SMLD ancestral sampling (appendix F): returns the mean and the std of x(t_next)."""
        var, var_next = self.std(t) ** 2, self.std(t_next) ** 2
        x_mean = x + append_dims(var - var_next, x.ndim) * score
        return x_mean, (var_next * (var - var_next) / var).sqrt()


@dataclass
class LinearBetaSDE(SDE):
    """What VP and sub-VP share: beta(t) linear in t, drift -1/2 beta(t) x, a(t) = e^(-B/2)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def time_at_integrated_beta(self, B):
        slope = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * slope * B).sqrt()) / slope

    def drift(self, x, t):
        return -0.5 * append_dims(self.beta(t), x.ndim) * x

    def mean_scale(self, t):
        return torch.exp(-0.5 * self.integrated_beta(t))

    def discrete_beta(self, t, t_next):
        """beta_i of the step t_next -> t: prod(1 - beta_i) = exp(-B(t)) exactly; to first order
        the paper's beta(t_i) / N, but below 1 for any step count."""
        return -torch.expm1(-(self.integrated_beta(t) - self.integrated_beta(t_next)))

    def langevin_alpha(self, t, t_next):
        return 1 - self.discrete_beta(t, t_next)


@dataclass
class VPSDE(LinearBetaSDE):
    """Variance preserving SDE (eq. 11), the continuous limit of DDPM. Sees data in [-1, 1]."""

    name = "vp"

    def sde(self, x, t):
        return self.drift(x, t), self.beta(t).sqrt()

    def std(self, t):
        return (-torch.expm1(-self.integrated_beta(t))).sqrt()

    def time_at_noise_level(self, sigma):
        return self.time_at_integrated_beta(torch.log1p(sigma**2))  # sigma^2 = e^B - 1

    def discretize(self, x, t, t_next):
        beta = self.discrete_beta(t, t_next)
        return append_dims((1 - beta).sqrt() - 1, x.ndim) * x, beta.sqrt()

    def ancestral_step(self, x, t, t_next, score):
        """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): the mean and std of x(t_next)."""
        beta = self.discrete_beta(t, t_next)
        x_mean = (x + append_dims(beta, x.ndim) * score) / append_dims((1 - beta).sqrt(), x.ndim)
        return x_mean, beta.sqrt()


@dataclass
class SubVPSDE(LinearBetaSDE):
    """sub-VP SDE (section 3.4): VP's drift, a smaller diffusion, a variance never above VP's. No
    ancestral sampler; reverse diffusion uses the Euler discretization. Sees data in [-1, 1]."""

    name = "subvp"

    def sde(self, x, t):
        return self.drift(x, t), (self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t))).sqrt()

    def std(self, t):
        return -torch.expm1(-self.integrated_beta(t))  # 1 - e^{-B}, no square root

    def time_at_noise_level(self, sigma):
        return self.time_at_integrated_beta(2 * torch.asinh(sigma / 2))  # sigma = 2 sinh(B/2)


SDES = {cls.name: cls for cls in (VESDE, VPSDE, SubVPSDE)}


# ------------------------------------------------------------------------------------------------
# 2. Model: a time-conditioned U-Net that predicts the noise, and the score it gives


@dataclass
class ModelConfig:
    image_channels: int = 1
    image_size: int = 28  # sides divisible by 2^(len(channel_mult) - 1)
    channels: int = 64
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attention: bool = True  # self-attention at the lowest resolution
    num_classes: int = 0  # 0: unconditional; else label -1 means "no label"
    dropout: float = 0.1
    fourier_scale: float = 16.0


def group_norm(channels):
    return nn.GroupNorm(math.gcd(min(32, channels // 4), channels), channels)


class GaussianFourierFeatures(nn.Module):
    """Random Fourier features of t (Tancik et al. 2020), as in the paper's NCSN++."""

    def __init__(self, dim, scale):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)  # fixed, not trained

    def forward(self, t):  # (B,) -> (B, dim)
        angles = 2 * math.pi * t[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):  # (B, C, H, W), (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + append_dims(self.emb(F.silu(emb)), 4)  # the time (and label) embedding
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3)  # (B, 3, HW, C)
        h = F.scaled_dot_product_attention(*qkv.unbind(1))  # (B, HW, C)
        return x + self.out(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """A DDPM-style U-Net: Fourier time features, residual blocks, skip connections between
    matching resolutions, self-attention at the lowest one, an optional label embedding."""

    def __init__(self, config: ModelConfig, decoder=True):
        super().__init__()
        self.config = config
        ch, E, levels = config.channels, 4 * config.channels, len(config.channel_mult)
        assert config.image_size % 2 ** (levels - 1) == 0, "image_size: halved at each level"
        fourier = GaussianFourierFeatures(256, config.fourier_scale)  # 128 frequencies at any width
        self.time_embed = nn.Sequential(fourier, nn.Linear(256, E), nn.SiLU(), nn.Linear(E, E))
        labels = config.num_classes + 1  # the last one is "no label"
        self.label_embed = nn.Embedding(labels, E) if config.num_classes and decoder else None
        self.conv_in = nn.Conv2d(config.image_channels, ch, 3, padding=1)
        block = lambda in_ch, out_ch: ResBlock(in_ch, out_ch, E, config.dropout)
        self.down, skip_channels, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(block(cur, ch * mult))
                cur = ch * mult
                skip_channels.append(cur)
            if level < levels - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skip_channels.append(cur)
        attention = SelfAttention(cur) if config.attention else nn.Identity()
        self.mid = nn.ModuleList([block(cur, cur), attention, block(cur, cur)])
        self.width, self.up = cur, nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult)) if decoder else []):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(block(cur + skip_channels.pop(), ch * mult))
                cur = ch * mult
            if level > 0:
                upsample = nn.Upsample(scale_factor=2, mode="nearest")
                self.up.append(nn.Sequential(upsample, nn.Conv2d(cur, cur, 3, padding=1)))
        if decoder:  # the noise-conditional classifier keeps the encoder only
            self.norm_out = group_norm(cur)
            self.conv_out = nn.Conv2d(cur, config.image_channels, 3, padding=1)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, labels=None):
        """x (B, C, H, W), t (B,), labels (B,) in [-1, num_classes), -1 for none -> (B, C, H, W)."""
        emb = self.time_embed(t)  # (B, E)
        if self.label_embed is not None:
            labels = torch.full_like(t, -1, dtype=torch.long) if labels is None else labels
            emb = emb + self.label_embed(torch.where(labels < 0, self.config.num_classes, labels))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


SIGMA_DATA = 0.5  # rough std of the scaled data, for the preconditioning below


def predict_noise(net, sde, x, t, labels=None):
    """The noise z in x(t) = a x(0) + std z, preconditioned after EDM (Karras et al. 2022): input
    scaled by c_in = 1 / sqrt(a^2 sigma_data^2 + std^2) to about unit variance, and the network
    predicts the residual of the best linear estimate E[z | x(t)] = std c_in^2 x(t)."""
    a, std = sde.mean_scale(t), sde.std(t)
    c_in = append_dims((a**2 * SIGMA_DATA**2 + std**2).rsqrt(), x.ndim)
    return append_dims(std, x.ndim) * c_in**2 * x + net(x * c_in, t, labels)


def score_model(net, sde):
    """score(x, t, labels=None) = -noise(x, t) / std(t): where the network becomes a score."""

    def score(x, t, labels=None):
        return -predict_noise(net, sde, x, t, labels) / append_dims(sde.std(t), x.ndim)

    return score


class NoiseClassifier(UNet):
    """The time-dependent classifier p_t(y | x(t)) of eq. 14 (appendix I.1): the U-Net's time
    embedding, down and middle blocks (no labels in, no decoder), then a head on pooled features."""

    def __init__(self, config: ModelConfig):  # config.num_classes: the classes it tells apart
        super().__init__(config, decoder=False)
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # UNet.forward ends in conv_out
        self.norm_out = group_norm(self.width)
        self.conv_out = nn.Sequential(pool, nn.Linear(self.width, config.num_classes))  # logits


def classifier_logits(net, sde, x, t):
    """The classifier's logits (B, classes) at x(t), scaled by c_in as in predict_noise."""
    a, std = sde.mean_scale(t), sde.std(t)
    return net(x * append_dims((a**2 * SIGMA_DATA**2 + std**2).rsqrt(), x.ndim), t)


# ------------------------------------------------------------------------------------------------
# 3. Loss: continuous denoising score matching (eq. 7)


def dsm_loss(net, sde, x, eps=1e-5, likelihood_weighting=False, labels=None,
             noise_sampling="uniform"):  # fmt: skip
    """E_t E_z lambda(t) / std^2 ||std s(x_t, t) + z||^2 (eq. 7), t ~ U(eps, T), averaged over
    batch and dimensions; with s = -noise / std the norm is ||noise - z||^2. lambda = std^2 by
    default, or g^2 (likelihood weighting, Song et al. 2021b), which bounds the negative
    log-likelihood. `training_times` gives t and the weight of each term."""
    t, weight = training_times(sde, len(x), noise_sampling, eps, x.device, likelihood_weighting)
    z = torch.randn_like(x)
    mean, std = sde.marginal_prob(x, t)
    noise = predict_noise(net, sde, mean + append_dims(std, x.ndim) * z, t, labels)
    return ((noise - z).pow(2).flatten(1).mean(1) * weight).mean()  # per sample ||std s + z||^2 / D


NOISE_SAMPLINGS = ("uniform", "lognormal", "importance")
P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal distribution of training noise levels


def training_times(sde, batch, noise_sampling, eps, device, likelihood_weighting=False):
    """t (B,) and each term's weight lambda(t) / std^2 / (p(t) / p_uniform(t)) (B,), unbiased for
    eq. 7. "importance" draws log sigma(t) uniformly: its density in t is proportional to
    d log sigma^2 / dt = g^2 / std^2, the likelihood weight, which it makes constant. "lognormal"
    (Karras et al. 2022) draws log sigma ~ N(P_MEAN, P_STD^2), weighed by sigma^2 / SIGMA_DATA^2 + 1
    instead (the network's target then has unit variance)."""
    g2_over_var = lambda t: sde.sde(torch.zeros_like(t), t)[1] ** 2 / sde.std(t) ** 2
    if noise_sampling == "uniform":
        t = eps + (sde.T - eps) * torch.rand(batch, device=device)
        return t, g2_over_var(t) if likelihood_weighting else torch.ones_like(t)
    u = torch.rand(batch, device=device, dtype=torch.float64)
    ends = sde.noise_level(torch.tensor([eps, sde.T], dtype=torch.float64, device=device))
    log_lo, log_hi = ends.log().tolist()
    if noise_sampling == "lognormal":
        assert not likelihood_weighting, "lognormal noise sampling has its own weighting"
        sigma = torch.exp(P_MEAN + P_STD * torch.randn_like(u)).clamp(*ends.tolist())
        t = sde.time_at_noise_level(sigma).clamp(eps, sde.T).float()
        return t, sde.noise_level(t) ** 2 / SIGMA_DATA**2 + 1
    assert noise_sampling == "importance", noise_sampling
    t = sde.time_at_noise_level(torch.exp(log_lo + (log_hi - log_lo) * u)).clamp(eps, sde.T).float()
    density = g2_over_var(t) / (2 * (log_hi - log_lo))  # of t
    return t, (g2_over_var(t) if likelihood_weighting else 1) / ((sde.T - eps) * density)


def classifier_loss(net, sde, x, labels, eps=1e-5, noise_sampling="uniform"):
    """Cross-entropy of p_t(y | x(t)) on x(t) from the kernel, t drawn as for eq. 7, unweighted."""
    t = training_times(sde, len(x), noise_sampling, eps, x.device)[0]
    mean, std = sde.marginal_prob(x, t)
    x_t = mean + append_dims(std, x.ndim) * torch.randn_like(x)
    return F.cross_entropy(classifier_logits(net, sde, x_t, t).float(), labels)


# ------------------------------------------------------------------------------------------------
# 4. Numerics: Dormand-Prince 5(4) (Dormand & Prince 1980), for the ODE sampler and the likelihood.
# The 7th stage is at the new point (first same as last).

DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI_ERR = tuple(b5 - b4 for b5, b4 in zip(DOPRI_A[6] + (0.0,), DOPRI_B4, strict=True))


def dopri_step(rhs, t, y, k1, h):
    """One Dormand-Prince step of size h: the 5th-order solution, its error estimate, the stages."""
    ks = [k1]
    for c, a in zip(DOPRI_C[1:], DOPRI_A[1:], strict=True):
        y_stage = y + h * sum(a_j * k for a_j, k in zip(a, ks, strict=False) if a_j)
        ks.append(rhs(t + c * h, y_stage))
    error = h * sum(e * k for e, k in zip(DOPRI_ERR, ks, strict=True) if e)
    return y_stage, error, ks  # the last stage is the 5th-order solution


def solve_ode(rhs, y, t0, t1, rtol=1e-5, atol=1e-5, callback=None, max_steps=10_000):
    """Integrate dy/dt = rhs(t, y) from t0 to t1 (either direction) with adaptive Dormand-Prince.
    Error norm: RMS of err / (atol + rtol max(|y|, |y_new|)); step factor 0.9 err^(-1/5) in
    [0.2, 10]. The first step size follows Hairer, Norsett & Wanner's rule of thumb. At most
    max_steps steps (accepted or not), so nothing can hang."""
    t, direction, accepted = t0, 1.0 if t1 > t0 else -1.0, 0
    rms = lambda v: v.pow(2).mean().sqrt().item()
    k1 = rhs(t, y)
    d0, d1 = rms(y / (atol + rtol * y.abs())), rms(k1 / (atol + rtol * y.abs()))
    h = 0.01 * d0 / d1 if min(d0, d1) > 1e-5 else 1e-6
    for _ in range(max_steps):
        if direction * (t1 - t) <= 1e-9:
            return y
        h = direction * min(abs(h), abs(t1 - t))
        y_new, error, ks = dopri_step(rhs, t, y, k1, h)
        err_norm = rms(error / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if not math.isfinite(err_norm) or abs(h) < 1e-12:
            problem = f"non-finite values or a vanishing step at t = {t:.4g}"
            raise SGMError(f"the ODE solver met {problem} (rtol {rtol:g}, atol {atol:g})")
        if err_norm <= 1.0:
            t, y, k1, accepted = t + h, y_new, ks[-1], accepted + 1
            if callback is not None:
                callback(accepted, t, y)
        h *= min(10.0, max(0.2, 0.9 * err_norm**-0.2)) if err_norm > 0 else 10.0
    if direction * (t1 - t) <= 1e-9:
        return y
    raise SGMError(f"the ODE solver did not reach t = {t1:g} in {max_steps} steps (at t = {t:.4g},"
                   f" rtol {rtol:g}, atol {atol:g}): loosen the tolerances?")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 5. Samplers: sample_NAME(score_fn, sde, x, ts, *, generator, callback, **options) runs from x at
# ts[0] = T down the time grid ts in len(ts) - 1 steps and ends on a noise-free estimate. Those that
# can inpaint take `project(x, t)`, which overwrites the known pixels after each step.
# `callback(info)` gets {"i", "t", "x", "denoised"} after each step.


def time_grid(sde, steps, eps=1e-3, device=None):
    """The paper's uniform grid T = t_0 > ... > t_steps = eps."""
    return torch.linspace(sde.T, eps, steps + 1, device=device)


def edm_time_grid(sde, steps, eps=1e-3, device=None, rho=7.0):
    """Karras et al. 2022 (eq. 5): `steps` times from T to eps, uniform in sigma^(1/rho) (float64),
    then t = 0, the data (zero noise)."""
    s_max, s_min = sde.noise_level(torch.tensor([sde.T, eps], dtype=torch.float64)) ** (1 / rho)
    sigmas = (s_max + torch.linspace(0, 1, steps, dtype=torch.float64) * (s_min - s_max)) ** rho
    ts = torch.cat([sde.time_at_noise_level(sigmas), torch.zeros(1, dtype=torch.float64)])
    return ts.float().to(device)


def noise_levels(sde, ts):
    """sigma(t) along a grid; t = 0 is the data itself, sigma = 0 (VE puts sigma_min there)."""
    return torch.where(ts > 0, sde.noise_level(ts), torch.zeros_like(ts))


def denoised(sde, x, t, score):
    """Tweedie's estimate E[x(0) | x(t)] = (x + std^2 s) / a."""
    a, std = append_dims(sde.mean_scale(t), x.ndim), append_dims(sde.std(t), x.ndim)
    return (x + std**2 * score) / a


def report(callback, sde, i, t, x, score):
    if callback is not None:
        callback({"i": i, "t": float(t[0]), "x": x, "denoised": denoised(sde, x, t, score)})


# Predictors: one step of the reverse process from t to t_next < t. Each returns the new x, its
# noise-free mean and the score it used.
def euler_maruyama_step(score_fn, sde, x, t, t_next, generator):
    """Euler-Maruyama on the reverse-time SDE (eq. 6): x_mean = x + [f - g^2 s] dt, dt < 0."""
    score = score_fn(x, t)
    drift, diffusion = sde.reverse_sde(x, t, score)
    dt = append_dims(t_next - t, x.ndim)
    x_mean = x + drift * dt
    noise = append_dims(diffusion, x.ndim) * (-dt).sqrt() * randn_like(x, generator)
    return x_mean + noise, x_mean, score


def reverse_diffusion_step(score_fn, sde, x, t, t_next, generator):
    """Reverse-diffusion predictor (appendix E): x_mean = x - f + G^2 s, x = x_mean + G z."""
    score = score_fn(x, t)
    f, G = sde.discretize(x, t, t_next)
    x_mean = x - f + append_dims(G**2, x.ndim) * score
    return x_mean + append_dims(G, x.ndim) * randn_like(x, generator), x_mean, score


def ancestral_step(score_fn, sde, x, t, t_next, generator):
    """Ancestral sampling: SMLD for VE (appendix F), DDPM for VP; sub-VP has none."""
    score = score_fn(x, t)
    x_mean, std = sde.ancestral_step(x, t, t_next, score)
    return x_mean + append_dims(std, x.ndim) * randn_like(x, generator), x_mean, score


# Correctors: one Langevin step at time t, x <- x + step s + sqrt(2 step) z, with different steps.
def langevin_step(score_fn, sde, x, t, alpha, snr, generator):
    """Langevin corrector (Algorithms 4 and 5): step 2 alpha (r ||z|| / ||s||)^2, with the norms
    averaged over the batch as in the official code."""
    score = score_fn(x, t)
    z = randn_like(x, generator)
    grad_norm = score.flatten(1).norm(dim=1).mean()
    noise_norm = z.flatten(1).norm(dim=1).mean()
    step = append_dims(2 * alpha * (snr * noise_norm / grad_norm) ** 2, x.ndim)
    x_mean = x + step * score
    return x_mean + (2 * step).sqrt() * z, x_mean, score


def ald_step(score_fn, sde, x, t, alpha, snr, generator):
    """Annealed Langevin dynamics step of the official code (after Song & Ermon 2019): step
    2 alpha (r std(t))^2, set by the noise level instead of the score's norm."""
    score = score_fn(x, t)
    step = append_dims(2 * alpha * (snr * sde.std(t)) ** 2, x.ndim)
    x_mean = x + step * score
    return x_mean + (2 * step).sqrt() * randn_like(x, generator), x_mean, score


PREDICTORS = {"euler_maruyama": euler_maruyama_step, "reverse_diffusion": reverse_diffusion_step,
              "ancestral": ancestral_step, "none": None}  # fmt: skip
CORRECTORS = {"langevin": langevin_step, "ald": ald_step, "none": None}


@torch.no_grad()
def sample_pc(score_fn, sde, x, ts, *, generator=None, callback=None, project=None,
              predictor="reverse_diffusion", corrector="langevin", snr=0.16,
              corrector_steps=1):  # fmt: skip
    """Predictor-corrector (Algorithm 1) with any predictor and any corrector, as the official
    `pc_sampler`: the corrector at t_i, then the predictor to t_(i+1), so the last step is a
    predictor mean. Without a predictor the corrector runs at t_1 ... t_N = eps instead."""
    predict, correct = PREDICTORS[predictor], CORRECTORS[corrector]
    corrector_steps = corrector_steps if correct else 0
    assert predict or corrector_steps, "no predictor and no corrector steps"
    for i in range(len(ts) - 1):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        alpha = sde.langevin_alpha(t, t_next)
        at = i if predict else i + 1  # the corrector's time, and the last score's
        for _ in range(corrector_steps):
            x_now = x
            x, x_mean, score = correct(score_fn, sde, x, ts[at].expand(x.shape[0]), alpha, snr,
                                       generator)  # fmt: skip
            x = x if project is None else project(x, ts[at])
        if predict:
            x_now = x
            x, x_mean, score = predict(score_fn, sde, x, t, t_next, generator)
            x = x if project is None else project(x, ts[i + 1])
        report(callback, sde, i, ts[at].expand(x.shape[0]), x_now, score)
    return x_mean


# The paper's other samplers are predictor-corrector with a fixed pair.
def sample_em(score_fn, sde, x, ts, *, generator=None, callback=None, project=None):
    """Euler-Maruyama on the reverse-time SDE (eq. 6): `pc` without a corrector."""
    options = dict(generator=generator, callback=callback, project=project)
    return sample_pc(score_fn, sde, x, ts, predictor="euler_maruyama", corrector="none", **options)


def sample_reverse_diffusion(score_fn, sde, x, ts, *, generator=None, callback=None, project=None):
    """Reverse-diffusion predictor (appendix E): `pc` without a corrector."""
    options = dict(generator=generator, callback=callback, project=project)
    return sample_pc(score_fn, sde, x, ts, corrector="none", **options)


def sample_ancestral(score_fn, sde, x, ts, *, generator=None, callback=None, project=None):
    """Ancestral sampling, SMLD for VE (appendix F), DDPM for VP: `pc` without a corrector."""
    options = dict(generator=generator, callback=callback, project=project)
    return sample_pc(score_fn, sde, x, ts, predictor="ancestral", corrector="none", **options)


def sample_ald(score_fn, sde, x, ts, *, generator=None, callback=None, project=None, snr=0.16,
               corrector_steps=1):  # fmt: skip
    """Annealed Langevin dynamics (Song & Ermon 2019): `pc` with the Langevin corrector alone."""
    options = dict(generator=generator, callback=callback, project=project, snr=snr)
    return sample_pc(score_fn, sde, x, ts, predictor="none", corrector_steps=corrector_steps,
                     **options)  # fmt: skip


@torch.no_grad()
def sample_ode(score_fn, sde, x, ts, *, generator=None, callback=None, rtol=1e-5, atol=1e-5):
    """Probability-flow ODE (eq. 13) from ts[0] to ts[-1], adaptive Dormand-Prince 5(4)."""
    last = {}

    def rhs(t, x):
        t = torch.full((x.shape[0],), t, device=x.device)
        last["t"], last["score"] = t, score_fn(x, t)
        return sde.reverse_sde(x, t, last["score"], probability_flow=True)[0]

    def on_step(i, t, x):  # the last evaluation of a DoPri step is at the accepted point (FSAL)
        report(callback, sde, i, last["t"], x, last["score"])

    return solve_ode(rhs, x, float(ts[0]), float(ts[-1]), rtol, atol, on_step)


# Beyond the paper: few-step solvers on EDM's grid (Karras et al. 2022; Lu et al. 2022). They work
# in x_hat = x / a(t) and the noise level sigma = std / a, where every SDE's x_hat is the data plus
# noise of std sigma, and dx_hat / dsigma = -sigma a s(x, t) is its probability flow.
@torch.no_grad()
def sample_edm(score_fn, sde, x, ts, *, generator=None, callback=None, s_churn=20.0,
               s_tmin=0.05, s_tmax=50.0, s_noise=1.0):  # fmt: skip
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): churn raises sigma_i by 1 + gamma
    with gamma = min(s_churn / N, sqrt 2 - 1) in [s_tmin, s_tmax], never above sigma(T); then Heun's
    step to sigma_(i+1), Euler into sigma = 0 (Tweedie). NFE = 2 (len(ts) - 1) - 1."""
    sigmas, steps = noise_levels(sde, ts), len(ts) - 1
    gamma_max = min(s_churn / steps, math.sqrt(2) - 1)

    def slope(x_hat, t, sigma):  # dx_hat / dsigma
        t = t.expand(x_hat.shape[0])
        a = append_dims(sde.mean_scale(t), x_hat.ndim)
        score = score_fn(a * x_hat, t)
        return -sigma * a * score, a, score

    x_hat = x / sde.mean_scale(ts[0])
    for i in range(steps):
        gamma = gamma_max if s_tmin <= sigmas[i] <= s_tmax else 0.0
        gamma = min(gamma, float(sigmas[0] / sigmas[i]) - 1)  # times stay within [eps, T]
        t, sigma = ts[i], sigmas[i]
        if gamma > 0:  # lines 4-6: raise the noise level from sigma_i to sigma (1 + gamma)
            sigma = sigmas[i] * (1 + gamma)
            noise = (sigma**2 - sigmas[i] ** 2).sqrt() * s_noise * randn_like(x_hat, generator)
            x_hat, t = x_hat + noise, sde.time_at_noise_level(sigma)
        d, a, score = slope(x_hat, t, sigma)
        x_next = x_hat + (sigmas[i + 1] - sigma) * d
        if sigmas[i + 1] > 0:  # Heun's correction, except on the step into sigma = 0
            d_next = slope(x_next, ts[i + 1], sigmas[i + 1])[0]
            x_next = x_hat + (sigmas[i + 1] - sigma) * 0.5 * (d + d_next)
        report(callback, sde, i, t.expand(x.shape[0]), a * x_hat, score)
        x_hat = x_next
    return x_hat


def sample_heun(score_fn, sde, x, ts, *, generator=None, callback=None):
    """Heun's method on the probability flow (Karras et al. 2022, Algorithm 1): edm, no churn."""
    return sample_edm(score_fn, sde, x, ts, generator=generator, callback=callback, s_churn=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(score_fn, sde, x, ts, *, generator=None, callback=None, eta=1.0,
                        s_noise=1.0):  # fmt: skip
    """DPM-Solver++(2M) SDE (k-diffusion's, midpoint form), in lambda = -log sigma, h = lambda_(i+1)
    - lambda_i and the data prediction D: x_hat <- (sigma_(i+1) / sigma_i) e^(-eta h) x_hat +
    (1 - e^(-(1 + eta) h)) D' + sigma_(i+1) sqrt(1 - e^(-2 eta h)) z, D' = D + (D - D_prev) / 2r,
    r = h_prev / h. eta = 0 is DPM-Solver++(2M). Returns D at sigma = 0. NFE = len(ts) - 1."""
    sigmas = noise_levels(sde, ts)
    x_hat, previous, h_previous = x / sde.mean_scale(ts[0]), None, None
    for i in range(len(ts) - 1):
        t = ts[i].expand(x.shape[0])
        x_now = sde.mean_scale(ts[i]) * x_hat
        score = score_fn(x_now, t)
        report(callback, sde, i, t, x_now, score)
        data = denoised(sde, x_now, t, score)  # D(x_hat; sigma_i)
        if sigmas[i + 1] == 0:
            return data
        h = torch.log(sigmas[i] / sigmas[i + 1])
        correction = 0 if previous is None else (data - previous) / (2 * h_previous / h)
        decay = (sigmas[i + 1] / sigmas[i]) * torch.exp(-eta * h)
        weight = -torch.expm1(-(1 + eta) * h)  # 1 - e^(-(1 + eta) h), accurate for small h
        x_hat = decay * x_hat + weight * (data + correction)
        if eta:
            noise_std = sigmas[i + 1] * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise
            x_hat = x_hat + noise_std * randn_like(x_hat, generator)
        previous, h_previous = data, h
    return sde.mean_scale(ts[-1]) * x_hat


def sample_dpmpp_2m(score_fn, sde, x, ts, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the probability flow: eta = 0 above."""
    return sample_dpmpp_2m_sde(score_fn, sde, x, ts, generator=generator, callback=callback, eta=0)


# ------------------------------------------------------------------------------------------------
# 6. The solver table and `sample`; inpainting (appendix I.2) and guidance (eq. 14)


class Solver(NamedTuple):
    sample: Callable  # sample_NAME(score_fn, sde, x, ts, *, generator, callback, **options)
    steps: int  # the default number of steps; NFE in the README's solver table
    grid: Callable  # grid(sde, steps, eps, device) -> steps + 1 times, T down to the final time
    inpaints: bool  # takes `project`: re-noises every step, so it can inpaint


SOLVERS = {
    "em": Solver(sample_em, 1000, time_grid, True),
    "reverse_diffusion": Solver(sample_reverse_diffusion, 1000, time_grid, True),
    "ancestral": Solver(sample_ancestral, 1000, time_grid, True),
    "pc": Solver(sample_pc, 1000, time_grid, True),  # 2 NFE per step
    "ald": Solver(sample_ald, 1000, time_grid, True),
    "ode": Solver(sample_ode, 1, time_grid, False),  # adaptive: only the grid's ends matter
    "heun": Solver(sample_heun, 18, edm_time_grid, False),  # 2 x steps - 1 = 35 NFE
    "edm": Solver(sample_edm, 18, edm_time_grid, False),
    "dpmpp_2m": Solver(sample_dpmpp_2m, 20, edm_time_grid, False),  # NFE = steps
    "dpmpp_2m_sde": Solver(sample_dpmpp_2m_sde, 20, edm_time_grid, False),
}
INPAINTING_SOLVERS = tuple(name for name, solver in SOLVERS.items() if solver.inpaints)


class CountedScore:
    """Wraps a score function and counts its evaluations (the NFE)."""

    def __init__(self, score_fn):
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.score_fn(x, t)


def impute(x, known, mask, matrix=None):
    """x where mask == 0, `known` where mask == 1 (appendix I.2); with an orthonormal `matrix` M
    (C, C) in the decoupled space x M over channels, then back by M^T = M^-1 (colorization)."""
    mix = lambda v, m: v if m is None else torch.einsum("bi...,ij->bj...", v, m.to(v))
    x = mask * mix(known, matrix) + (1 - mask) * mix(x, matrix)
    return mix(x, None if matrix is None else matrix.T)


def replace_known(sde, known, mask, generator=None, matrix=None):
    """Imputation (appendix I.2): known coordinates (mask == 1) of x(t) become a(t) y + std(t) z,
    from the first step on (the official code starts them clean); with a `matrix`, in x M."""

    def project(x, t):
        t = torch.full((x.shape[0],), float(t), device=x.device)
        mean, std = sde.marginal_prob(known, t)
        return impute(x, mean + append_dims(std, x.ndim) * randn_like(x, generator), mask, matrix)

    return project


def sample(score_fn, sde, shape, solver="pc", steps=None, *, eps=1e-3, generator=None,
           device=None, callback=None, x_T=None, known=None, mask=None, matrix=None,
           **options):  # fmt: skip
    """Samples of `shape`, solving the reverse process from T to eps, and the NFE. options: the
    solver's keyword arguments (a wrong one is a TypeError). x_T: start here, not at a prior draw
    (decoding). known, mask, matrix: imputation, see `inpaint` and `colorize`."""
    spec = SOLVERS[solver]
    counted = CountedScore(score_fn)
    x = sde.prior_sampling(shape, generator, device) if x_T is None else x_T
    ts = spec.grid(sde, spec.steps if steps is None else steps, eps, device=x.device)
    assert len(ts) > 1, f"at least one step, not {steps}"
    if known is not None:  # only solvers that re-noise every step take `project`
        options["project"] = replace_known(sde, known, mask, generator, matrix)
        x = options["project"](x, ts[0])
    x = spec.sample(counted, sde, x, ts, generator=generator, callback=callback, **options)
    if known is not None:
        x = impute(x, known, mask, matrix)
    if not torch.isfinite(x).all():  # NaN would be written as black pixels without a word
        raise SGMError(f"{solver} produced non-finite values: the model or the settings diverge")
    return x, counted.nfe


def inpaint(score_fn, sde, known, mask, solver="pc", steps=None, **kwargs):
    """Fill in the pixels where mask == 0, given `known` (B, ...) where mask == 1. -> (x, nfe)"""
    kwargs.setdefault("device", known.device)
    return sample(score_fn, sde, known.shape, solver, steps, known=known, mask=mask, **kwargs)


# get_pc_colorizer's M: orthonormal, column 0 (1, 1, 1) / sqrt 3, so channel 0 of x M is the gray
COLOR_MATRIX = torch.tensor([[2**0.5, -2, 0], [2**0.5, 1, 3**0.5], [2**0.5, 1, -(3**0.5)]]) / 6**0.5


def colorize(score_fn, sde, gray, solver="pc", steps=None, matrix=COLOR_MATRIX, **kwargs):
    """Colorization (appendix I): RGB images keeping the gray level (channel 0 of x M) of `gray`."""
    mask = torch.tensor([1.0, 0.0, 0.0], device=gray.device)[:, None, None]  # known: channel 0
    return inpaint(score_fn, sde, gray, mask, solver, steps, matrix=matrix, **kwargs)


def guided_score(score, labels, w):
    """Classifier-free guidance (Ho & Salimans 2022): (1 + w) s(x, t, y) - w s(x, t, none). Eq. 14
    adds grad log p_t(y | x) of a classifier; s(x, t, y) - s(x, t, none) is that of the implicit
    classifier (Bayes), so this is eq. 14 with its classifier term scaled by 1 + w."""

    def score_fn(x, t):
        if w == 0:
            return score(x, t, labels)
        none = torch.full_like(labels, -1)
        both = score(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, none]))
        cond, uncond = both.chunk(2)
        return (1 + w) * cond - w * uncond

    return score_fn


def classifier_guided_score(score_fn, classifier, labels, w=1.0):
    """Eq. 14: s + w grad_x log p_t(y | x(t)), classifier(x, t) giving logits; w = 1 the paper's."""
    log_p = lambda x, t: F.log_softmax(classifier(x, t).float(), 1).gather(1, labels[:, None]).sum()
    return lambda x, t: score_fn(x, t) + w * torch.func.grad(log_p)(x, t).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# 7. Likelihood (appendix D.2) and latent codes (section 4.3)


def divergence(drift, x, probe=None):
    """div drift (B,) with respect to x: exact (one backward pass per dimension) without a probe,
    else the Skilling-Hutchinson estimate v^T (d drift / dx) v."""
    if probe is not None:
        return (torch.autograd.grad((drift * probe).sum(), x)[0] * probe).flatten(1).sum(1)
    rows = [torch.autograd.grad(d.sum(), x, retain_graph=True)[0] for d in drift.flatten(1).T]
    return sum(row.flatten(1)[:, k] for k, row in enumerate(rows))  # the Jacobian's diagonal


def log_likelihood(score_fn, sde, x, *, eps=1e-5, rtol=1e-5, atol=1e-5, exact_trace=False,
                   generator=None):  # fmt: skip
    """log p_eps(x) (B,) in nats, and the NFE: the probability-flow ODE from eps to T with
    d(log p)/dt = -div f~, so log p_eps(x) = log p_T(x(T)) + int div f~ dt. div f~ is estimated with
    one Rademacher probe per sample, fixed along the path, or exact with exact_trace."""
    shape, D = x.shape, x[0].numel()
    probe = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    counted = CountedScore(score_fn)

    def rhs(t, state):  # state (B, D + 1) = [x(t), accumulated divergence]
        t = torch.full((shape[0],), t, device=x.device)
        with torch.enable_grad():
            xt = state[:, :D].reshape(shape).detach().requires_grad_(True)
            drift = sde.reverse_sde(xt, t, counted(xt, t), probability_flow=True)[0]
            div = divergence(drift, xt, None if exact_trace else probe)
        return torch.cat([drift.detach().flatten(1), div.detach()[:, None]], dim=1)

    start = torch.cat([x.flatten(1), x.new_zeros(shape[0], 1)], dim=1)
    state = solve_ode(rhs, start, eps, sde.T, rtol, atol)
    return sde.prior_logp(state[:, :D].reshape(shape)) + state[:, D], counted.nfe


def bits_per_dim(score_fn, sde, images, data_range=(-1.0, 1.0), *, generator=None, **kwargs):
    """Bits/dim of 8-bit images (B, ...), and the NFE. Dequantized, u = (y + U(0,1)) / 256 has a
    density on [0, 1]^D; the model sees x = c u + d, c = hi - lo, so log p(u) = log p(x) + D ln c
    and bpd = [-log p(x) - D ln c] / (D ln 2) + 8 (a bin has volume 256^-D)."""
    lo, hi = data_range
    u = (images.float() + torch.rand(images.shape, generator=generator, device=images.device)) / 256
    logp, nfe = log_likelihood(score_fn, sde, lo + (hi - lo) * u, generator=generator, **kwargs)
    D = images[0].numel()
    return (-logp - D * math.log(hi - lo)) / (D * math.log(2)) + 8, nfe


def encode(score_fn, sde, x, *, eps=1e-3, rtol=1e-5, atol=1e-5):
    """Data -> latent x(T) through the probability-flow ODE, run forwards. Returns (z, nfe)."""
    counted = CountedScore(score_fn)
    z = sample_ode(counted, sde, x, torch.tensor([eps, sde.T]), rtol=rtol, atol=atol)
    return z, counted.nfe


def decode(score_fn, sde, z, *, eps=1e-3, rtol=1e-5, atol=1e-5):
    """Latent -> data: the ODE sampler started from z. Returns (x, nfe)."""
    return sample(score_fn, sde, z.shape, "ode", eps=eps, rtol=rtol, atol=atol, x_T=z)
