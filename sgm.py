"""
Score-based generative modeling through stochastic differential equations, in one file.

A reference implementation of Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole,
"Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021
(arXiv:2011.13456). Read it top to bottom next to the paper:

    SDEs         VE, VP and sub-VP forward processes (eqs. 9 and 11, section 3.4), reverse SDE, probability flow
    model        a time-conditioned U-Net that predicts noise, and the one function that makes it a score
    loss         continuous denoising score matching (eq. 7)
    samplers     Euler-Maruyama, reverse diffusion, ancestral, predictor-corrector (Algorithm 1),
                 annealed Langevin, probability-flow ODE (adaptive Dormand-Prince), EDM Heun
    likelihood   exact log-likelihood through the probability-flow ODE (appendix D.2), bits/dim
    control      classifier-free guidance, inpainting (appendix I.2), latent encoding and interpolation
    EMA, checkpoints

Usage: `python train.py` trains a model, `python sample.py --solver ode --n 64` samples from it.
Every sampler takes any `score_fn(x, t)`, so `test_sgm.py` drives them with exact scores of Gaussians.
Only torch is imported: no scipy, nothing leaves the device.
"""
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def append_dims(v, ndim):
    """Append singleton dims so a (B,) tensor broadcasts against a (B, ...) tensor of rank `ndim`."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def randn_like(x, generator=None):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------
# SDEs: dx = f(x, t) dt + g(t) dw, t in [0, T]

class SDE:
    """Base class. `t` has shape (B,); `x` has shape (B, ...) of any rank."""
    T = 1.0
    prior_std = 1.0

    def sde(self, x, t):
        """Forward drift f(x, t) (B, ...) and diffusion g(t) (B,)."""
        raise NotImplementedError

    def mean_scale(self, t):
        """a(t): the perturbation kernel is N(a(t) x(0), std(t)^2 I)."""
        raise NotImplementedError

    def std(self, t):
        raise NotImplementedError

    def marginal_prob(self, x, t):
        """Mean (B, ...) and std (B,) of p_0t(x(t) | x(0) = x)."""
        return append_dims(self.mean_scale(t), x.ndim) * x, self.std(t)

    def noise_level(self, t):
        """sigma(t) = std(t) / a(t): the noise level of x(t) / a(t), the time variable of EDM."""
        return self.std(t) / self.mean_scale(t)

    def time_at_noise_level(self, sigma):
        """Inverse of noise_level."""
        raise NotImplementedError

    def prior_sampling(self, shape, generator=None, device=None):
        return self.prior_std * torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per sample, (B,)."""
        D = z[0].numel()
        return -0.5 * D * math.log(2 * math.pi * self.prior_std ** 2) - z.flatten(1).pow(2).sum(1) / (2 * self.prior_std ** 2)

    def reverse_sde(self, x, t, score, probability_flow=False):
        """Reverse-time SDE dx = [f - g^2 s] dt + g dw (eq. 6), or with probability_flow the ODE
        dx = [f - 1/2 g^2 s] dt (eq. 13). Returns drift and diffusion (0 for the ODE)."""
        drift, diffusion = self.sde(x, t)
        factor = 0.5 if probability_flow else 1.0
        drift = drift - factor * append_dims(diffusion ** 2, x.ndim) * score
        return drift, (0.0 * diffusion if probability_flow else diffusion)

    def discretize(self, x, t, t_next):
        """Forward step x(t) = x(t_next) + f + G z over [t_next, t], for the reverse-diffusion predictor.
        Euler discretization here; VE and VP override it with their exact kernels (appendix E)."""
        drift, diffusion = self.sde(x, t)
        dt = t - t_next
        return drift * append_dims(dt, x.ndim), diffusion * dt.sqrt()

    def langevin_alpha(self, t, t_next):
        """alpha_i of Algorithms 4 and 5: 1 for VE, 1 - beta_i for VP (and sub-VP)."""
        return torch.ones_like(t)

    def ancestral_step(self, x, t, t_next, score):
        raise ValueError(f"ancestral sampling is not defined for {type(self).__name__}; use 'reverse_diffusion' or 'pc'")

    def config(self):
        return {"name": type(self).__name__, **asdict(self)}


@dataclass
class VESDE(SDE):
    """Variance exploding SDE (eq. 9), the continuous limit of SMLD: sigma(t) = sigma_min (sigma_max/sigma_min)^t."""
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    @property
    def prior_std(self):
        return self.sigma_max

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        g = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g

    def mean_scale(self, t):
        return torch.ones_like(t)

    def std(self, t):
        return self.sigma(t)  # the official convention: sigma_min counts as already applied to the data

    def time_at_noise_level(self, sigma):
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def discretize(self, x, t, t_next):
        return torch.zeros_like(x), (self.sigma(t) ** 2 - self.sigma(t_next) ** 2).sqrt()

    def ancestral_step(self, x, t, t_next, score):
        """SMLD ancestral sampling (appendix F): returns the mean and the std of x(t_next)."""
        var, var_next = self.sigma(t) ** 2, self.sigma(t_next) ** 2
        x_mean = x + append_dims(var - var_next, x.ndim) * score
        return x_mean, (var_next * (var - var_next) / var).sqrt()


@dataclass
class VPSDE(SDE):
    """Variance preserving SDE (eq. 11), the continuous limit of DDPM: beta(t) linear in t."""
    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * t ** 2 * (self.beta_max - self.beta_min)

    def time_at_integrated_beta(self, B):
        d = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min ** 2 + 2 * d * B).sqrt()) / d

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * append_dims(beta, x.ndim) * x, beta.sqrt()

    def mean_scale(self, t):
        return torch.exp(-0.5 * self.integrated_beta(t))

    def std(self, t):
        return (-torch.expm1(-self.integrated_beta(t))).sqrt()

    def time_at_noise_level(self, sigma):
        return self.time_at_integrated_beta(torch.log1p(sigma ** 2))  # sigma^2 = e^B - 1

    def discrete_beta(self, t, t_next):
        """beta_i of the step t_next -> t, chosen so that prod(1 - beta_i) = exp(-B(t)) exactly.
        It equals beta(t) dt to first order (the paper's beta_i = beta(t_i)/N) but stays below 1
        for any step count."""
        return -torch.expm1(-(self.integrated_beta(t) - self.integrated_beta(t_next)))

    def discretize(self, x, t, t_next):
        beta = self.discrete_beta(t, t_next)
        return append_dims((1 - beta).sqrt() - 1, x.ndim) * x, beta.sqrt()

    def langevin_alpha(self, t, t_next):
        return 1 - self.discrete_beta(t, t_next)

    def ancestral_step(self, x, t, t_next, score):
        """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): returns the mean and the std of x(t_next)."""
        beta = self.discrete_beta(t, t_next)
        x_mean = (x + append_dims(beta, x.ndim) * score) / append_dims((1 - beta).sqrt(), x.ndim)
        return x_mean, beta.sqrt()


@dataclass
class SubVPSDE(VPSDE):
    """sub-VP SDE (section 3.4): VP's drift, a smaller diffusion, and a variance that never exceeds VP's."""

    def sde(self, x, t):
        drift, _ = super().sde(x, t)
        return drift, (self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t))).sqrt()

    def std(self, t):
        return -torch.expm1(-self.integrated_beta(t))  # 1 - e^{-B}, no square root

    def time_at_noise_level(self, sigma):
        return self.time_at_integrated_beta(2 * torch.asinh(sigma / 2))  # sigma = 2 sinh(B/2)

    discretize = SDE.discretize  # VP's exact kernel does not hold here: Euler (as the official code)

    ancestral_step = SDE.ancestral_step  # the paper defines none: a clear ValueError


SDES = {cls.__name__: cls for cls in (VESDE, VPSDE, SubVPSDE)}


def sde_from_config(config):
    config = dict(config)
    return SDES[config.pop("name")](**config)


# ------------------------------------------------------------------------------------------------
# Model: a time-conditioned U-Net that predicts the noise

@dataclass
class ModelConfig:
    image_channels: int = 1
    image_size: int = 28             # sides divisible by 2^(len(channel_mult) - 1)
    channels: int = 64
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attention: bool = True           # self-attention at the lowest resolution
    num_classes: int = 0             # 0: unconditional; else label -1 means "no label"
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
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):  # (B, C, H, W), (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # the time (and label) embedding, in every block
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.out(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """A DDPM-style U-Net: Fourier time features, residual blocks with GroupNorm and SiLU, skip connections
    between matching resolutions, self-attention at the lowest one, and an optional label embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch, emb_dim, levels = config.channels, 4 * config.channels, len(config.channel_mult)
        if config.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {config.image_size} is not divisible by {2 ** (levels - 1)}")
        self.time_embed = nn.Sequential(GaussianFourierFeatures(256, config.fourier_scale),  # 128 frequencies at any width
                                        nn.Linear(256, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None
        self.conv_in = nn.Conv2d(config.image_channels, ch, 3, padding=1)

        block = lambda i, o: ResBlock(i, o, emb_dim, config.dropout)
        self.down, skip_channels, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(block(cur, ch * mult))
                cur = ch * mult
                skip_channels.append(cur)
            if level < levels - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skip_channels.append(cur)
        self.mid = nn.ModuleList([block(cur, cur), SelfAttention(cur) if config.attention else nn.Identity(),
                                  block(cur, cur)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(block(cur + skip_channels.pop(), ch * mult))
                cur = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out, self.conv_out = group_norm(cur), nn.Conv2d(cur, config.image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, labels=None):
        """x (B, C, H, W), t (B,), labels (B,) of ints in [-1, num_classes), -1 for none -> noise (B, C, H, W)."""
        emb = self.time_embed(t)  # (B, E)
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full_like(t, -1, dtype=torch.long)
            emb = emb + self.label_embed(torch.where(labels < 0, self.config.num_classes, labels))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


SIGMA_DATA = 0.5  # rough std of the scaled data, for the preconditioning below


def predict_noise(net, sde, x, t, labels=None):
    """The noise estimate for x(t) = a x(0) + std z. Two fixed, SDE-agnostic preconditionings (after EDM):
    the input is scaled to about unit variance by c_in = 1 / sqrt(a^2 sigma_data^2 + std^2), and the network
    predicts the residual of the best linear estimate E[z | x(t)] = std c_in^2 x(t) for data of std sigma_data.
    At high noise (a -> 0) that estimate is nearly exact, so errors are not blown up by std / a."""
    c_in = append_dims((sde.mean_scale(t) ** 2 * SIGMA_DATA ** 2 + sde.std(t) ** 2).rsqrt(), x.ndim)
    return append_dims(sde.std(t), x.ndim) * c_in ** 2 * x + net(x * c_in, t, labels)


def score_model(net, sde):
    """score(x, t, labels=None) = -noise(x, t) / std(t): the one place the network becomes a score."""
    def score(x, t, labels=None):
        return -predict_noise(net, sde, x, t, labels) / append_dims(sde.std(t), x.ndim)
    return score


# ------------------------------------------------------------------------------------------------
# Loss: continuous denoising score matching (eq. 7)

def dsm_loss(model, sde, x, eps=1e-5, likelihood_weighting=False, labels=None):
    """E_t E_z lambda(t) ||s(x_t, t) + z / std(t)||^2 with t ~ U(eps, T), averaged over batch and dimensions.
    Default lambda = std^2: ||std s + z||^2 = ||z - noise||^2. Likelihood weighting lambda = g^2
    (Song et al. 2021b) bounds the negative log-likelihood."""
    t = eps + (sde.T - eps) * torch.rand(x.shape[0], device=x.device)  # (B,)
    z = torch.randn_like(x)
    mean, std = sde.marginal_prob(x, t)
    noise = predict_noise(model, sde, mean + append_dims(std, x.ndim) * z, t, labels)
    per_sample = (noise - z).pow(2).flatten(1).mean(1)  # (B,) = ||std s + z||^2 / D
    if likelihood_weighting:
        per_sample = per_sample * sde.sde(x, t)[1] ** 2 / std ** 2
    return per_sample.mean()


# ------------------------------------------------------------------------------------------------
# Samplers. Each is one function sampler(score_fn, sde, x, ts, ...) from x at ts[0] = T to ts[-1] = eps,
# ending on the noise-free mean. `project(x, t)` (inpainting) overwrites known pixels after each step;
# `callback(info)` gets {"i", "t", "x", "denoised"} after each step.

def time_grid(steps, eps=1e-3, T=1.0, device=None):
    """Uniform grid T = t_0 > ... > t_steps = eps, as in the paper."""
    return torch.linspace(T, eps, steps + 1, device=device)


def edm_sigmas(sde, steps, eps=1e-3, rho=7.0, device=None):
    """Karras et al. 2022 (eq. 5): `steps` noise levels from sigma(T) to sigma(eps), spaced uniformly in
    sigma^(1/rho), then 0."""
    ends = torch.tensor([sde.T, eps], dtype=torch.float64)
    smax, smin = sde.noise_level(ends).tolist()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    sigmas = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float().to(device)


def denoised(sde, x, t, score):
    """Tweedie's estimate E[x(0) | x(t)] = (x + std^2 s) / a."""
    a, std = append_dims(sde.mean_scale(t), x.ndim), append_dims(sde.std(t), x.ndim)
    return (x + std ** 2 * score) / a


def report(callback, sde, i, t, x, score):
    if callback is not None:
        callback({"i": i, "t": float(t[0]), "x": x, "denoised": denoised(sde, x, t, score)})


def keep(x, project, t):
    return x if project is None else project(x, t)


@torch.no_grad()
def sample_em(score_fn, sde, x, ts, generator=None, callback=None, project=None):
    """Euler-Maruyama on the reverse-time SDE (eq. 6)."""
    for i in range(len(ts) - 1):
        t, dt = ts[i].expand(x.shape[0]), ts[i + 1] - ts[i]  # dt < 0
        score = score_fn(x, t)
        report(callback, sde, i, t, x, score)
        drift, diffusion = sde.reverse_sde(x, t, score)
        x_mean = x + drift * dt
        x = keep(x_mean + append_dims(diffusion, x.ndim) * (-dt).sqrt() * randn_like(x, generator), project, ts[i + 1])
    return x_mean


@torch.no_grad()
def reverse_diffusion_step(score_fn, sde, x, t, t_next, generator):
    """Reverse-diffusion predictor (appendix E): x_mean = x - f + G^2 s, x = x_mean + G z."""
    score = score_fn(x, t)
    f, G = sde.discretize(x, t, t_next)
    x_mean = x - f + append_dims(G ** 2, x.ndim) * score
    return x_mean + append_dims(G, x.ndim) * randn_like(x, generator), x_mean, score


@torch.no_grad()
def langevin_step(score_fn, x, t, alpha, snr, generator):
    """Langevin corrector at time t (Algorithms 4 and 5): step 2 alpha (r ||z|| / ||s||)^2, norms averaged over the batch."""
    score = score_fn(x, t)
    z = randn_like(x, generator)
    grad_norm = score.flatten(1).norm(dim=1).mean()
    noise_norm = z.flatten(1).norm(dim=1).mean()
    step = append_dims(2 * alpha * (snr * noise_norm / grad_norm) ** 2, x.ndim)
    x_mean = x + step * score
    return x_mean + (2 * step).sqrt() * z, x_mean, score


@torch.no_grad()
def sample_reverse_diffusion(score_fn, sde, x, ts, generator=None, callback=None, project=None):
    """Reverse-diffusion predictor alone (appendix E): predictor-corrector without the corrector."""
    return sample_pc(score_fn, sde, x, ts, corrector_steps=0, generator=generator, callback=callback, project=project)


@torch.no_grad()
def sample_ancestral(score_fn, sde, x, ts, generator=None, callback=None, project=None):
    """Ancestral sampling: SMLD for VE (appendix F), DDPM for VP."""
    for i in range(len(ts) - 1):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        score = score_fn(x, t)
        report(callback, sde, i, t, x, score)
        x_mean, std = sde.ancestral_step(x, t, t_next, score)
        x = keep(x_mean + append_dims(std, x.ndim) * randn_like(x, generator), project, ts[i + 1])
    return x_mean


@torch.no_grad()
def sample_pc(score_fn, sde, x, ts, snr=0.16, corrector_steps=1, generator=None, callback=None, project=None):
    """Predictor-corrector (Algorithm 1): Langevin corrector at t_i, then the reverse-diffusion predictor
    to t_(i+1). The corrector runs first as in the official code, so the last step is a predictor mean."""
    for i in range(len(ts) - 1):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        for _ in range(corrector_steps):
            x = keep(langevin_step(score_fn, x, t, sde.langevin_alpha(t, t_next), snr, generator)[0], project, ts[i])
        x_now = x
        x, x_mean, score = reverse_diffusion_step(score_fn, sde, x, t, t_next, generator)
        report(callback, sde, i, t, x_now, score)
        x = keep(x, project, ts[i + 1])
    return x_mean


@torch.no_grad()
def sample_ald(score_fn, sde, x, ts, snr=0.16, corrector_steps=1, generator=None, callback=None, project=None):
    """Annealed Langevin dynamics (Song & Ermon 2019): the corrector alone, at t_1, ..., t_N = eps."""
    for i in range(len(ts) - 1):
        t_prev, t = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        for _ in range(corrector_steps):
            x_now = x
            x, x_mean, score = langevin_step(score_fn, x, t, sde.langevin_alpha(t_prev, t), snr, generator)
            x = keep(x, project, ts[i + 1])
        report(callback, sde, i, t, x_now, score)
    return x_mean


# Dormand-Prince 5(4) Butcher tableau (Dormand & Prince 1980). The 7th stage is at the new point (FSAL).
DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI_ERR = tuple(b5 - b4 for b5, b4 in zip(DOPRI_A[6] + (0.0,), DOPRI_B4))


def rms(x):
    return x.pow(2).mean().sqrt().item()


def solve_ode(rhs, y, t0, t1, rtol=1e-5, atol=1e-5, callback=None):
    """Integrate dy/dt = rhs(t, y) from t0 to t1 (either direction) with adaptive Dormand-Prince 5(4).
    Error norm: RMS of err / (atol + rtol max(|y|, |y_new|)); step factor 0.9 err^(-1/5) in [0.2, 10]."""
    t, direction = t0, 1.0 if t1 > t0 else -1.0
    k1 = rhs(t, y)
    scale = atol + rtol * y.abs()
    d0, d1 = rms(y / scale), rms(k1 / scale)
    h = 0.01 * d0 / d1 if min(d0, d1) > 1e-5 else 1e-6
    i = 0
    while direction * (t1 - t) > 1e-9:
        h = direction * min(abs(h), abs(t1 - t))
        ks = [k1]
        for c, a in zip(DOPRI_C[1:], DOPRI_A[1:]):
            y_stage = y + h * sum(a_j * k for a_j, k in zip(a, ks) if a_j)
            ks.append(rhs(t + c * h, y_stage))
        y_new = y_stage  # the last stage is the 5th-order solution
        err = h * sum(e * k for e, k in zip(DOPRI_ERR, ks) if e)
        err_norm = rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if err_norm <= 1.0:
            t, y, k1, i = t + h, y_new, ks[-1], i + 1
            if callback is not None:
                callback(i, t, y)
        h *= min(10.0, max(0.2, 0.9 * err_norm ** -0.2)) if err_norm > 0 else 10.0
    return y


@torch.no_grad()
def sample_ode(score_fn, sde, x, ts, rtol=1e-5, atol=1e-5, callback=None):
    """Probability-flow ODE (eq. 13) from ts[0] to ts[-1] with adaptive Dormand-Prince 5(4)."""
    last = {}

    def rhs(t, x):
        t = torch.full((x.shape[0],), t, device=x.device)
        last["t"], last["score"] = t, score_fn(x, t)
        return sde.reverse_sde(x, t, last["score"], probability_flow=True)[0]

    def on_step(i, t, x):  # the last evaluation of a DoPri step is at the accepted point (FSAL)
        report(callback, sde, i, last["t"], x, last["score"])

    return solve_ode(rhs, x, float(ts[0]), float(ts[-1]), rtol, atol, on_step if callback else None)


@torch.no_grad()
def sample_heun(score_fn, sde, x, sigmas, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1) in the
    variables x_hat = x / a(t) and sigma = std / a, where dx_hat/dsigma = -sigma a s(x, t) for every SDE.
    The last step, into sigma = 0, is an Euler step (a Tweedie denoising). NFE = 2 len(sigmas) - 3."""
    def time(sigma):
        return sde.time_at_noise_level(sigma).expand(x.shape[0])

    def slope(x_hat, sigma):  # dx_hat / dsigma
        t = time(sigma)
        a = append_dims(sde.mean_scale(t), x_hat.ndim)
        score = score_fn(a * x_hat, t)
        return -sigma * a * score, t, score

    x_hat = x / append_dims(sde.mean_scale(time(sigmas[0])), x.ndim)
    for i in range(len(sigmas) - 1):
        d, t, score = slope(x_hat, sigmas[i])
        x_next = x_hat + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] > 0:
            x_next = x_hat + (sigmas[i + 1] - sigmas[i]) * 0.5 * (d + slope(x_next, sigmas[i + 1])[0])
        if callback is not None:
            a = append_dims(sde.mean_scale(t), x.ndim)
            callback({"i": i, "t": float(t[0]), "x": a * x_hat, "denoised": denoised(sde, a * x_hat, t, score)})
        x_hat = x_next
    return x_hat


SOLVERS = {
    "em": sample_em,
    "reverse_diffusion": sample_reverse_diffusion,
    "ancestral": sample_ancestral,
    "pc": sample_pc,
    "ald": sample_ald,
    "ode": sample_ode,
    "heun": sample_heun,
}
STOCHASTIC_SOLVERS = ("em", "reverse_diffusion", "ancestral", "pc", "ald")


class CountedScore:
    """Wraps a score function and counts its evaluations (the NFE)."""

    def __init__(self, score_fn):
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.score_fn(x, t)


def sample(score_fn, sde, shape, solver="pc", steps=1000, *, eps=1e-3, snr=0.16, corrector_steps=1,
           rtol=1e-5, atol=1e-5, generator=None, device=None, callback=None, x_T=None, known=None, mask=None):
    """Draw samples of `shape` by solving the reverse process from T to eps. Returns (x, nfe).

    x_T: start here instead of a prior draw (decoding). known, mask: inpainting, see `inpaint`."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if solver == "ald" and corrector_steps < 1:
        raise ValueError("ald needs corrector_steps >= 1")
    counted = CountedScore(score_fn)
    x = sde.prior_sampling(shape, generator, device) if x_T is None else x_T
    project = None
    if known is not None:
        if solver not in STOCHASTIC_SOLVERS:
            raise ValueError(f"inpainting needs a stochastic solver ({', '.join(STOCHASTIC_SOLVERS)}), not {solver!r}")
        project = replace_known(sde, known, mask, generator)
        x = project(x, sde.T)
    kwargs = {"pc": dict(snr=snr, corrector_steps=corrector_steps), "ald": dict(snr=snr, corrector_steps=corrector_steps),
              "ode": dict(rtol=rtol, atol=atol)}.get(solver, {})
    if solver in STOCHASTIC_SOLVERS:
        kwargs.update(generator=generator, project=project)
    grid = edm_sigmas(sde, steps, eps, device=x.device) if solver == "heun" else time_grid(steps, eps, sde.T, x.device)
    x = SOLVERS[solver](counted, sde, x, grid, callback=callback, **kwargs)
    if known is not None:
        x = mask * known + (1 - mask) * x
    return x, counted.nfe


# ------------------------------------------------------------------------------------------------
# Likelihood (appendix D.2) and latent codes

def log_likelihood(score_fn, sde, x, *, eps=1e-5, rtol=1e-5, atol=1e-5, exact_trace=False, generator=None):
    """log p_eps(x) in nats per sample (B,), and the NFE: integrate the probability-flow ODE from eps to T
    with d(log p)/dt = -div f~, so log p_eps(x) = log p_T(x(T)) + int_eps^T div f~ dt. The divergence is
    the Skilling-Hutchinson estimate v^T (df~/dx) v with one Rademacher v per sample fixed along the
    trajectory, or exact (one backward pass per dimension) with exact_trace."""
    shape, D = x.shape, x[0].numel()
    probe = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    counted = CountedScore(score_fn)

    def rhs(t, state):  # state (B, D + 1) = [x(t), accumulated divergence]
        t = torch.full((shape[0],), t, device=x.device)
        with torch.enable_grad():
            xt = state[:, :D].reshape(shape).detach().requires_grad_(True)
            drift = sde.reverse_sde(xt, t, counted(xt, t), probability_flow=True)[0]
            if exact_trace:
                flat = drift.flatten(1)
                div = sum(torch.autograd.grad(flat[:, k].sum(), xt, retain_graph=True)[0].flatten(1)[:, k] for k in range(D))
            else:
                div = (torch.autograd.grad((drift * probe).sum(), xt)[0] * probe).flatten(1).sum(1)
        return torch.cat([drift.detach().flatten(1), div.detach()[:, None]], dim=1)

    state = solve_ode(rhs, torch.cat([x.flatten(1), x.new_zeros(shape[0], 1)], dim=1), eps, sde.T, rtol, atol)
    return sde.prior_logp(state[:, :D].reshape(shape)) + state[:, D], counted.nfe


def bits_per_dim(score_fn, sde, images, data_range=(-1.0, 1.0), *, generator=None, **kwargs):
    """Bits/dim of 8-bit images (B, ...) in {0..255}, and the NFE. Uniform dequantization u = (y + U(0,1)) / 256
    turns the discrete data into a density on [0, 1]^D; the model sees x = c u + d with c = hi - lo, so
    log p(u) = log p(x) + D ln c and bpd = [-log p(x) - D ln c] / (D ln 2) + 8 (the +8 is log2 256 per
    dim: the dequantization bin has volume 256^-D). Without dequantization bits/dim is meaningless."""
    lo, hi = data_range
    u = (images.float() + torch.rand(images.shape, generator=generator, device=images.device)) / 256
    logp, nfe = log_likelihood(score_fn, sde, lo + (hi - lo) * u, generator=generator, **kwargs)
    D = images[0].numel()
    return (-logp - D * math.log(hi - lo)) / (D * math.log(2)) + 8, nfe


@torch.no_grad()
def encode(score_fn, sde, x, *, eps=1e-3, rtol=1e-5, atol=1e-5):
    """Data -> latent x(T) through the probability-flow ODE. Returns (z, nfe). Decode with `decode`."""
    counted = CountedScore(score_fn)
    return sample_ode(counted, sde, x, torch.tensor([eps, sde.T]), rtol, atol), counted.nfe  # the ODE, run forwards


def decode(score_fn, sde, z, *, eps=1e-3, rtol=1e-5, atol=1e-5):
    """Latent -> data: the ODE sampler started from z. Returns (x, nfe)."""
    return sample(score_fn, sde, z.shape, "ode", eps=eps, rtol=rtol, atol=atol, x_T=z)


def slerp(z_a, z_b, weight):
    """Spherical interpolation between latents (B, ...), weight in [0, 1]."""
    a, b = z_a.flatten(1), z_b.flatten(1)
    omega = torch.arccos((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1))[:, None]  # (B, 1)
    so = omega.sin().clamp_min(1e-8)
    out = torch.where(so > 1e-6, (((1 - weight) * omega).sin() * a + (weight * omega).sin() * b) / so, (1 - weight) * a + weight * b)
    return out.reshape(z_a.shape)


def interpolate(score_fn, sde, x_a, x_b, n=8, **kwargs):
    """n images (n, ...) morphing x_a (1, ...) into x_b along spherical interpolation of their ODE latents,
    and the NFE per image."""
    z, nfe_encode = encode(score_fn, sde, torch.cat([x_a, x_b]), **kwargs)
    weights = torch.linspace(0, 1, n, device=z.device)
    latents = torch.cat([slerp(z[:1], z[1:], float(w)) for w in weights])
    x, nfe_decode = decode(score_fn, sde, latents, **kwargs)
    return x, nfe_encode + nfe_decode


# ------------------------------------------------------------------------------------------------
# Controllable generation

def guided_score(model, labels, w):
    """Classifier-free guidance (Ho & Salimans 2022): (1 + w) s(x, t, y) - w s(x, t, none), for a
    `model(x, t, labels)` score trained with dropped labels. The paper's eq. 14 adds grad log p_t(y | x)
    of a separate classifier; by Bayes, s(x, t, y) - s(x, t, none) is that gradient for the implicit
    classifier, so this is eq. 14 with the classifier term scaled by (1 + w). w = 0 is plain conditional."""
    def score(x, t):
        if w == 0:
            return model(x, t, labels)
        none = torch.full_like(labels, -1)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, none])).chunk(2)
        return (1 + w) * cond - w * uncond
    return score


def replace_known(sde, known, mask, generator=None):
    """Imputation (appendix I.2): overwrite the known coordinates (mask == 1) of x(t) with the data
    noised to time t, a(t) y + std(t) z, from the very first step (the official code starts them clean)."""
    def project(x, t):
        t = torch.full((x.shape[0],), float(t), device=x.device)
        mean, std = sde.marginal_prob(known, t)
        return mask * (mean + append_dims(std, x.ndim) * randn_like(x, generator)) + (1 - mask) * x
    return project


def inpaint(score_fn, sde, known, mask, solver="pc", steps=1000, **kwargs):
    """Fill in the pixels where mask == 0 given `known` (B, ...) where mask == 1. Returns (x, nfe)."""
    kwargs.setdefault("device", known.device)
    return sample(score_fn, sde, known.shape, solver, steps, known=known, mask=mask, **kwargs)


# ------------------------------------------------------------------------------------------------
# EMA

class EMA:
    """Exponential moving average of a model's weights: shadow <- decay shadow + (1 - decay) weights."""

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model):
        model.load_state_dict(self.shadow)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        for k, v in state.items():
            self.shadow[k].copy_(v)


# ------------------------------------------------------------------------------------------------
# Checkpoints

FORMAT = "sgm-checkpoint-1"


class CheckpointError(Exception):
    pass


def save_checkpoint(path, *, config, sde, model=None, ema=None, optimizer=None, data_range=(-1.0, 1.0),
                    step=0, rng=None, extra=None):
    """Write atomically: a temporary file in the same folder, then a rename, so a crash never leaves half a file."""
    state = {"format": FORMAT, "config": asdict(config), "sde": sde.config(), "data_range": tuple(data_range),
             "model": model.state_dict() if model is not None else None,
             "ema": ema.state_dict() if ema is not None else None,
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "step": step, "rng": rng, "extra": extra or {}}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, device="cpu"):
    """Load with weights_only=True. Returns a dict with the raw entries plus "config" (ModelConfig), "sde"
    (an SDE), "model" (UNet with the trained weights, or the EMA weights where only those were kept) and
    "ema" (an EMA, or None). Raises CheckpointError naming the file and the problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file: {reason[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sgm checkpoint (no '{FORMAT}' format tag)")
    try:
        config = ModelConfig(**{**state["config"], "channel_mult": tuple(state["config"]["channel_mult"])})
        model = UNet(config).to(device)
        model.load_state_dict(state["model"] if state["model"] is not None else state["ema"])
        ema = None
        if state["ema"] is not None:
            ema = EMA(model)
            ema.load_state_dict(state["ema"])
        return {**state, "config": config, "sde": sde_from_config(state["sde"]), "model": model, "ema": ema}
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged sgm checkpoint ({str(e).splitlines()[0][:120]})") from None
