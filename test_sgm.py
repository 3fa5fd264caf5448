"""Tests for sgm.py, data.py and the scripts: closed-form math for Gaussian data, and the CLIs end to end.

    python -m pytest -q            # the fast tests
    python -m pytest -q -m slow    # the slow end-to-end ones
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import click
import pytest
import torch
from click.testing import CliRunner

import checkpoint
import cli
import data
import files
import sgm

SDES = [sgm.VESDE(), sgm.VPSDE(), sgm.SubVPSDE()]
IDS = ["ve", "vp", "subvp"]
MU = torch.tensor([1.0, -0.5, 0.3, 2.0])
S = 0.5
HERE = os.path.dirname(os.path.abspath(__file__))
# The tests' models are tiny: one thread runs them as fast as two, and on a busy machine a second
# thread waits on the first (a test can take 5x longer). The scripts run here get OMP_NUM_THREADS=1.
torch.set_num_threads(1)


# ---------------------------------------------------------------- Ctrl-C stops the tests

INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # 130, 143: the scripts' exit codes when stopped


def was_interrupted(result):
    """Whether a command was stopped by Ctrl-C or SIGTERM: the scripts exit with 130 or 143, and
    click turns a KeyboardInterrupt it sees into "Aborted!" and exit code 1."""
    seen, e = set(), result.exception
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    aborted = result.exit_code == 1 and result.output.splitlines()[-1:] == ["Aborted!"]  # click 8.5 keeps no chain
    return result.exit_code in INTERRUPTED or aborted


def invoke(command, args=(), expect_interrupt=False, **kwargs):
    """Every in-process run of a script's click command goes through here. A Ctrl-C (or SIGTERM)
    that lands while the command runs becomes its exit code, which would fail the test and let
    pytest carry on: raise it again as KeyboardInterrupt, so that pytest stops at once.
    expect_interrupt: the test itself stops the command and checks its exit code."""
    result = CliRunner().invoke(command, [str(a) for a in args], **kwargs)
    if not expect_interrupt and was_interrupted(result):
        raise KeyboardInterrupt(f"{command.name} was interrupted (exit code {result.exit_code})")
    return result


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """No SIGINT or SIGTERM handler that a script installs outlives its test: Ctrl-C and SIGTERM
    reach pytest as usual. A handler left installed is restored, and fails the test."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    left = [sig.name for sig, handler in before.items() if signal.getsignal(sig) is not handler]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not left, f"a {' and '.join(left)} handler was left installed"


def marginal_var(sde, t, s2):
    """Variance of p_t for data with variance s2 (scalar or matrix diagonal)."""
    return sde.mean_scale(t) ** 2 * s2 + sde.std(t) ** 2


def gaussian_score(sde, mu=MU, s=S):
    """Exact score of p_t when the data is N(mu, s^2 I): -(x - a mu) / (a^2 s^2 + std^2)."""
    def score(x, t):
        a = sgm.append_dims(sde.mean_scale(t), x.ndim)
        return -(x - a * mu) / sgm.append_dims(marginal_var(sde, t, s ** 2), x.ndim)
    return score


torch.manual_seed(0)
_L = torch.randn(4, 4)
COV = 0.1 * _L @ _L.T + 0.05 * torch.eye(4)  # a correlated covariance


def correlated_score(sde, mu, cov):
    """Exact score of p_t for data N(mu, cov): -(a^2 cov + std^2 I)^-1 (x - a mu), x of shape (B, D)."""
    def score(x, t):
        a, std = sde.mean_scale(t), sde.std(t)  # (B,)
        cov_t = a[:, None, None] ** 2 * cov + std[:, None, None] ** 2 * torch.eye(len(mu))  # (B, D, D)
        return -torch.linalg.solve(cov_t, x - a[:, None] * mu)
    return score


def gaussian_logp(sde, x, t, mu=MU, s=S):
    t = torch.full((x.shape[0],), t)
    std = marginal_var(sde, t, s ** 2).sqrt()[:, None]
    return torch.distributions.Normal(sde.mean_scale(t)[:, None] * mu, std).log_prob(x).sum(1)


def tiny_config(**kw):
    return sgm.ModelConfig(**{**dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0), **kw})


def randomize(net):
    """Give the zero-initialised output layers random weights so every path through the net is live."""
    torch.manual_seed(0)
    for p in net.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, 0, 0.2)
    return net


# ---------------------------------------------------------------- SDEs

@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_prob_matches_simulated_forward_sde(sde):
    torch.manual_seed(0)
    x0 = torch.tensor([1.0, -0.5])
    n, steps = 20000, 1000
    x = x0.expand(n, 2).clone()
    checkpoints = {100: None, 500: None, 1000: None}
    dt = sde.T / steps
    for i in range(steps):
        t = torch.full((n,), i * dt)
        drift, diffusion = sde.sde(x, t)
        x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * torch.randn_like(x)
        if i + 1 in checkpoints:
            checkpoints[i + 1] = x.clone()
    for k, xs in checkpoints.items():
        t = torch.full((1,), k * dt)
        mean, std = sde.marginal_prob(x0[None], t)
        # VE: official convention std = sigma(t) treats sigma_min as applied at t = 0; the SDE from x0 gives
        # sqrt(sigma(t)^2 - sigma_min^2), so compare with that exact value.
        exact_std = (std ** 2 - (sde.sigma_min ** 2 if isinstance(sde, sgm.VESDE) else 0)).sqrt()
        assert torch.allclose(xs.mean(0), mean[0], atol=0.03 * float(exact_std) + 0.01), (k, xs.mean(0), mean)
        assert abs(xs.std(0).mean() / exact_std - 1) < 0.03, (k, xs.std(0), exact_std)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior(sde):
    z = sde.prior_sampling((4000, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert abs(z.std() / sde.prior_std - 1) < 0.02
    expected = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(sde.prior_logp(z), expected, rtol=1e-5)
    # The marginal at T is close to the prior: mean scale near 0 (or 1 with std >> data for VE), std near prior_std.
    T = torch.ones(1)
    assert abs(float(sde.std(T)) / sde.prior_std - 1) < 0.01
    assert float(sde.mean_scale(T)) < 0.01 or float(sde.std(T)) > 40


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_noise_level_inverse_and_subvp_variance(sde):
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    assert torch.allclose(sde.time_at_noise_level(sde.noise_level(t)), t, atol=1e-6)
    assert (sgm.SubVPSDE().std(t) <= sgm.VPSDE().std(t) + 1e-12).all()


def test_reverse_drift_differs_by_one_half():
    sde, x, t = sgm.VPSDE(), torch.randn(3, 2), torch.rand(3)
    score = torch.randn(3, 2)
    f, g = sde.sde(x, t)
    drift, diffusion = sde.reverse_sde(x, t, score)
    ode_drift, ode_diffusion = sde.reverse_sde(x, t, score, probability_flow=True)
    assert torch.allclose(drift, f - g[:, None] ** 2 * score)
    assert torch.allclose(ode_drift, f - 0.5 * g[:, None] ** 2 * score)
    assert torch.equal(diffusion, g) and (ode_diffusion == 0).all()


# ---------------------------------------------------------------- model and loss

def test_unet_shapes_time_and_label_dependence():
    net = randomize(sgm.UNet(tiny_config(num_classes=3, attention=True, image_channels=2, image_size=12)))
    x, t = torch.randn(4, 2, 12, 12), torch.full((4,), 0.5)
    for mode in (net.eval, net.train):
        mode()
        assert net(x, t).shape == x.shape
    net.eval()
    out = net(x, t, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(out, net(x, t + 0.3, torch.zeros(4, dtype=torch.long)))
    assert not torch.allclose(out, net(x, t, torch.ones(4, dtype=torch.long)))
    assert torch.allclose(net(x, t), net(x, t, torch.full((4,), -1)))  # no label = the extra index
    with pytest.raises(AssertionError, match="image_size"):  # checkpoint.load and train.py refuse it for users
        sgm.UNet(tiny_config(channel_mult=(1, 2, 2), image_size=10))


class ExactNoise(torch.nn.Module):
    """A 'network' whose noise prediction is the exact one for Gaussian data (times `scale`)."""

    def __init__(self, sde, scale=1.0):
        super().__init__()
        self.sde, self.scale = sde, scale

    def forward(self, x_in, t, labels=None):
        c_in = (self.sde.mean_scale(t) ** 2 * sgm.SIGMA_DATA ** 2 + self.sde.std(t) ** 2).rsqrt()[:, None]
        x, std = x_in / c_in, self.sde.std(t)[:, None]
        # predict_noise adds std c_in^2 x to the network's output; return the rest.
        return -self.scale * std * gaussian_score(self.sde)(x, t) - std * c_in ** 2 * x


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dsm_loss_is_minimised_by_the_exact_score(sde):
    x = MU + S * torch.randn(100_000, 4, generator=torch.Generator().manual_seed(0))
    losses = {}
    for scale in (1.0, 0.8, 1.2):
        torch.manual_seed(1)
        losses[scale] = float(sgm.dsm_loss(ExactNoise(sde, scale), sde, x))
    assert losses[1.0] < min(losses[0.8], losses[1.2])
    # Closed form: the irreducible DSM loss is E_t[a^2 s^2 / (a^2 s^2 + std^2)] per dimension.
    t = torch.linspace(1e-5, 1, 100_001)
    expected = float((sde.mean_scale(t) ** 2 * S ** 2 / marginal_var(sde, t, S ** 2)).mean())
    assert abs(losses[1.0] - expected) < 0.01 + 0.03 * expected, (losses[1.0], expected)
    torch.manual_seed(1)
    weighted = float(sgm.dsm_loss(ExactNoise(sde), sde, x, likelihood_weighting=True))
    assert math.isfinite(weighted) and weighted != losses[1.0]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_importance_sampling_estimates_the_likelihood_weighted_loss(sde):
    """Drawing log sigma uniformly has density g^2 / std^2 in t (d log sigma^2 / dt = g^2 / std^2 for
    linear SDEs): with the exact score it must give eq. 7's expectation under uniform t, for both weightings."""
    x = MU + S * torch.randn(100_000, 4, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(1e-5, 1, 2_000_001, dtype=torch.float64)  # a Riemann sum over uniform t
    floor = sde.mean_scale(t) ** 2 * S ** 2 / marginal_var(sde, t, S ** 2)  # the loss per dimension at t
    g2_over_var = sde.sde(torch.zeros_like(t), t)[1] ** 2 / sde.std(t) ** 2
    for likelihood, expected in [(False, float(floor.mean())), (True, float((g2_over_var * floor).mean()))]:
        torch.manual_seed(2)
        loss = float(sgm.dsm_loss(ExactNoise(sde), sde, x, likelihood_weighting=likelihood, noise_sampling="importance"))
        assert abs(loss - expected) < 0.03 * expected, (likelihood, loss, expected)
    t, ratio = sgm.training_times(sde, 200_000, "importance", 1e-5, "cpu")
    log_sigma = sde.noise_level(t.double()).log()
    ends = sde.noise_level(torch.tensor([1e-5, 1.0], dtype=torch.float64)).log()
    assert abs(float(log_sigma.mean()) - float(ends.mean())) < 0.01 * float(ends[1] - ends[0])  # uniform in log sigma
    assert abs(float(ratio.mean()) - 1) < 0.02 and abs(float((ratio * t).mean()) - 0.5) < 0.01  # E_p[q f] = E_U[f]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_lognormal_noise_sampling_follows_edm_and_is_minimised_by_the_exact_score(sde):
    t, weight = sgm.training_times(sde, 100_000, "lognormal", 1e-5, "cpu")
    log_sigma = sde.noise_level(t.double()).log()
    lo, hi = sde.noise_level(torch.tensor([1e-5, 1.0], dtype=torch.float64)).log().tolist()
    inside = (log_sigma > lo + 1e-6) & (log_sigma < hi - 1e-6)
    assert inside.float().mean() > 0.99  # EDM's weight, no density ratio: it is not importance sampling
    assert torch.allclose(weight, sde.noise_level(t) ** 2 / sgm.SIGMA_DATA ** 2 + 1)
    assert abs(float(log_sigma[inside].mean()) - sgm.P_MEAN) < 0.03 and abs(float(log_sigma[inside].std()) - sgm.P_STD) < 0.03
    x = MU + S * torch.randn(100_000, 4, generator=torch.Generator().manual_seed(0))
    losses = {}
    for scale in (1.0, 0.9, 1.1):
        torch.manual_seed(1)
        losses[scale] = float(sgm.dsm_loss(ExactNoise(sde, scale), sde, x, noise_sampling="lognormal"))
    assert losses[1.0] < min(losses[0.9], losses[1.1]), losses
    with pytest.raises(AssertionError, match="own weighting"):  # TrainConfig refuses it for users
        sgm.dsm_loss(ExactNoise(sde), sde, x[:4], likelihood_weighting=True, noise_sampling="lognormal")
    with pytest.raises(AssertionError, match="normal"):
        sgm.dsm_loss(ExactNoise(sde), sde, x[:4], noise_sampling="normal")


def test_learning_rate_schedule_and_ema_ramp():
    from train import ema_decay, learning_rate
    cfg = checkpoint.TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(1e-4, rel=1e-2)  # warm-up, and the cosine has barely begun
    assert learning_rate(cfg, 55) == pytest.approx(5e-4) and learning_rate(cfg, 110) == pytest.approx(0, abs=1e-12)
    assert [learning_rate(checkpoint.TrainConfig(lr=1e-3, warmup=10), s) for s in (0, 9, 500)] == pytest.approx([1e-4, 1e-3, 1e-3])
    ramp = checkpoint.TrainConfig(ema_decay=0.999, ema_ramp=0.1)
    assert ema_decay(ramp, 0) == pytest.approx(0.5 ** 10)  # half-life 0.1 steps: the first weights are forgotten
    assert ema_decay(ramp, 99) == pytest.approx(0.5 ** 0.1)  # half-life 10 steps after 100
    assert ema_decay(ramp, 10**6) == 0.999 and ema_decay(checkpoint.TrainConfig(ema_decay=0.99), 0) == 0.99
    for bad, message in [(dict(noise_sampling="x"), "noise_sampling must be"), (dict(lr_schedule="step"), "lr_schedule must be"),
                         (dict(ema_ramp=2.0), "ema_ramp must be"), (dict(sigma_max=22.0), "not with the subvp SDE"),
                         (dict(sde="ve", sigma_max=0.001), "sigma_max must be"),
                         (dict(noise_sampling="lognormal", likelihood_weighting=True), "own weighting")]:
        with pytest.raises(sgm.SGMError, match=message):
            checkpoint.TrainConfig(**bad)
    ve = checkpoint.TrainConfig(sde="ve", sigma_max=22.0).make_sde()
    assert isinstance(ve, sgm.VESDE) and ve.sigma_max == 22.0 and checkpoint.TrainConfig(sde="ve").make_sde().sigma_max == 50.0


def test_small_unet_overfits_one_batch():
    images = data.load("fashion-mnist", note=print).images
    x = data.to_model_range(images[:32], (-1, 1))  # a batch of 32: the loss falls to ~0.38x in 60 steps
    torch.manual_seed(0)
    net, sde = sgm.UNet(tiny_config(channels=16, attention=False)), sgm.VPSDE()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def fixed_loss():  # the same t and z each time, so the comparison is not noise
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sgm.dsm_loss(net, sde, x.repeat(4, 1, 1, 1)))

    before = fixed_loss()
    for _ in range(60):
        loss = sgm.dsm_loss(net, sde, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.5 * before, (before, after)
    # bf16 autocast (train.py's --amp on CPUs with native bf16) leaves the loss of the trained net within 2%.
    losses = []
    for enabled in (False, True):
        torch.manual_seed(123)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            losses.append(float(sgm.dsm_loss(net, sde, x)))
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0], losses


# ---------------------------------------------------------------- checkpoints and EMA

def test_ema_moves_towards_the_weights():
    net = torch.nn.Linear(2, 2)
    ema = checkpoint.EMA(net, decay=0.9)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], before + 0.1)


def test_checkpoint_round_trip_and_errors(tmp_path):
    config = tiny_config(num_classes=10)
    net = randomize(sgm.UNet(config)).eval()
    ema, opt = checkpoint.EMA(net), torch.optim.Adam(net.parameters())
    path = tmp_path / "ck.pt"
    sde = sgm.VESDE(sigma_max=30.0)
    train_config = checkpoint.TrainConfig(sde="ve", channels=8, channel_mult=(1, 2), lr=3e-4)
    with torch.no_grad():
        ema.shadow["conv_in.bias"] += 1.0  # EMA weights that differ from the raw ones
    ckpt = checkpoint.Checkpoint(net, sde, (0.0, 1.0), config, train_config, step=7, extra={"note": 1})
    checkpoint.save(path, ckpt, ema=ema, optimizer=opt, rng={"cpu": torch.get_rng_state()})
    ck = checkpoint.load(str(path))
    assert isinstance(ck, checkpoint.Checkpoint)
    assert ck.sde == sde and ck.step == 7 and ck.data_range == (0.0, 1.0) and ck.model_config == config
    assert ck.train_config == train_config and ck.extra["note"] == 1
    assert ck.is_ema and not ck.net.training and not any(p.requires_grad for p in ck.net.parameters())
    assert torch.equal(ck.net.conv_in.bias, ema.shadow["conv_in.bias"])
    assert set(ck.resume) == {"model", "ema", "optimizer", "rng", "log"}
    raw = checkpoint.load(str(path), use_ema=False)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert not raw.is_ema and torch.equal(raw.net(x, t), net(x, t))
    labels = torch.tensor([3, -1])
    expected = sgm.guided_score(sgm.score_model(ck.net, sde), labels, 2.0)(x, t)
    assert torch.equal(ck.score_fn(labels, 2.0)(x, t), expected)
    assert torch.equal(ck.score_fn()(x, t), sgm.score_model(ck.net, sde)(x, t))
    assert not list(tmp_path.glob("*.tmp"))

    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(5000))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, words in [("trunc.pt", "not a readable"), ("random.pt", "not a readable"), ("foreign.pt", "not an sgm checkpoint"),
                        ("missing.pt", "no such")]:
        with pytest.raises(checkpoint.CheckpointError, match=words) as e:
            checkpoint.load(str(tmp_path / name))
        assert name in str(e.value)


# ---------------------------------------------------------------- samplers against exact scores

SDE_SOLVERS = [s for s in sgm.INPAINTING_SOLVERS]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("solver", SDE_SOLVERS)
def test_stochastic_solvers_reproduce_gaussian_data(sde, solver):
    if solver == "ancestral" and isinstance(sde, sgm.SubVPSDE):
        with pytest.raises(ValueError, match="not defined"):
            sgm.sample(gaussian_score(sde), sde, (8, 4), solver, 10)
        return
    x, nfe = sgm.sample(gaussian_score(sde), sde, (4000, 4), solver, 1000, generator=torch.Generator().manual_seed(0))
    assert nfe == (2000 if solver == "pc" else 1000)
    assert (x.mean(0) - MU).abs().max() < 0.04, x.mean(0)
    # ald ends on the mean of a Langevin step, which removes a noise of variance ~4 snr^2 var: about 5% of the std.
    low = 0.90 if solver == "ald" else 0.96
    assert low < float(x.std(0).mean()) / S < 1.04, x.std(0)


def linear_ode_map(sde, x_T, eps):
    """For Gaussian data the probability-flow ODE is linear: x_eps = a mu + sqrt(v_eps / v_T) (x_T - a_T mu)."""
    T, e = torch.ones(1), torch.full((1,), eps)
    return sde.mean_scale(e) * MU + (marginal_var(sde, e, S ** 2) / marginal_var(sde, T, S ** 2)).sqrt() * (x_T - sde.mean_scale(T) * MU)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_ode_solvers_follow_the_exact_flow(sde):
    x_T = sde.prior_sampling((500, 4), generator=torch.Generator().manual_seed(0))
    exact = linear_ode_map(sde, x_T, 1e-3)
    x, nfe = sgm.sample(gaussian_score(sde), sde, x_T.shape, "ode", x_T=x_T.clone())
    assert (x - exact).abs().max() < 1e-3 and 20 < nfe < 400
    loose, nfe_loose = sgm.sample(gaussian_score(sde), sde, x_T.shape, "ode", x_T=x_T.clone(), rtol=1e-3, atol=1e-3)
    assert nfe_loose < nfe and (loose - exact).abs().max() < 0.05
    # Heun ends with a Tweedie step to sigma = 0: its exact target is E[x0 | x_eps], a negligible shrink of x_eps.
    x, nfe = sgm.sample(gaussian_score(sde), sde, x_T.shape, "heun", 50, x_T=x_T.clone())
    assert nfe == 99 and (x - exact).abs().max() < 0.04
    x, nfe = sgm.sample(gaussian_score(sde), sde, x_T.shape, "heun", 18, x_T=x_T.clone())
    assert nfe == 35 and (x - exact).abs().mean() < 0.05


# The few-step solvers on EDM's grid: edm (churn), dpmpp_2m, dpmpp_2m_sde.
FEW_STEP = [("edm", dict(s_churn=10.0, s_tmin=0.0, s_tmax=1e6)), ("edm", dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0)), ("dpmpp_2m", {}),
            ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", dict(eta=0.5))]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("solver, options", FEW_STEP, ids=["edm-churn10", "edm-churn40-range", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde-eta.5"])
def test_few_step_solvers_reproduce_gaussian_data(sde, solver, options):
    x, nfe = sgm.sample(gaussian_score(sde), sde, (4000, 4), solver, 100, generator=torch.Generator().manual_seed(0), **options)
    assert nfe == (199 if solver == "edm" else 100)
    assert (x.mean(0) - MU).abs().max() < 0.04, x.mean(0)
    assert 0.97 < float(x.std(0).mean()) / S < 1.03, x.std(0)


def exact_sample(sde, x_T, eps=1e-3):
    """Where the few-step solvers should land for Gaussian data: the exact flow to eps, then E[x(0) | x(eps)]."""
    e = torch.full((len(x_T),), eps)
    x_eps = linear_ode_map(sde, x_T, eps)
    return sgm.denoised(sde, x_eps, e, gaussian_score(sde)(x_eps, e))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_edm_without_churn_is_heun_and_churn_changes_it(sde):
    x_T = sde.prior_sampling((200, 4), generator=torch.Generator().manual_seed(0))
    heun, nfe = sgm.sample(gaussian_score(sde), sde, x_T.shape, "heun", 10, x_T=x_T.clone())
    edm, nfe_edm = sgm.sample(gaussian_score(sde), sde, x_T.shape, "edm", 10, x_T=x_T.clone(), s_churn=0.0,
                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(edm, heun) and nfe == nfe_edm == 19
    outside = sgm.sample(gaussian_score(sde), sde, x_T.shape, "edm", 10, x_T=x_T.clone(), s_churn=5.0, s_tmin=1e5,
                         s_tmax=1e6, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(outside, heun)  # no noise level in [s_tmin, s_tmax]: no churn
    churned = sgm.sample(gaussian_score(sde), sde, x_T.shape, "edm", 10, x_T=x_T.clone(),
                         generator=torch.Generator().manual_seed(1))[0]  # the defaults churn
    assert (churned - heun).abs().mean() > 0.01


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dpmpp_2m_converges_at_second_order(sde):
    x_T = sde.prior_sampling((500, 4), generator=torch.Generator().manual_seed(0))
    exact = exact_sample(sde, x_T)
    errors = []
    for steps in (20, 40, 80):
        x, nfe = sgm.sample(gaussian_score(sde), sde, x_T.shape, "dpmpp_2m", steps, x_T=x_T.clone())
        assert nfe == steps
        errors.append(float((x - exact).abs().max()))
    assert errors[-1] < 0.01 and all(0.15 < b / a < 0.3 for a, b in zip(errors, errors[1:])), errors  # 1/4: second order
    no_noise = sgm.sample(gaussian_score(sde), sde, x_T.shape, "dpmpp_2m_sde", 80, x_T=x_T.clone(), eta=0.0)[0]
    assert torch.equal(no_noise, x)


PAIRS = [(p, c) for p in sgm.PREDICTORS for c in sgm.CORRECTORS if (p, c) != ("none", "none")]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("predictor, corrector", PAIRS, ids=[f"{p}+{c}" for p, c in PAIRS])
def test_every_predictor_with_every_corrector(sde, predictor, corrector):
    """Algorithm 1 with any pair; the sub-VP Langevin corrector works (it crashes in the official code)."""
    if predictor == "ancestral" and isinstance(sde, sgm.SubVPSDE):
        with pytest.raises(sgm.SGMError, match="not defined"):
            sgm.sample(gaussian_score(sde), sde, (8, 4), "pc", 10, predictor=predictor, corrector=corrector)
        return
    # The corrector alone needs several steps per noise level; ald's step follows std(t), not the score.
    alone = dict(corrector_steps=5, snr=0.316 if corrector == "ald" else 0.16) if predictor == "none" else {}
    x, nfe = sgm.sample(gaussian_score(sde), sde, (1000, 4), "pc", 200, generator=torch.Generator().manual_seed(0),
                        predictor=predictor, corrector=corrector, **alone)
    per_step = (predictor != "none") + (corrector != "none") * alone.get("corrector_steps", 1)
    assert nfe == 200 * per_step
    if (predictor, corrector, sde.name) == ("none", "ald", "subvp"):
        return  # sub-VP's std(t) is far below its marginal std near t = 0, so ald's steps are too short to follow
    assert (x.mean(0) - MU).abs().max() < 0.05, x.mean(0)
    # A corrector alone ends on a Langevin mean, which drops a noise of variance ~ its step: a few % of the std.
    low = 0.92 if predictor == "none" else 0.96
    assert low < float(x.std(0).mean()) / S < 1.05, x.std(0)


def test_solver_options_are_checked_at_the_edge():
    """cli.check_solver_options (the scripts' edge) refuses bad values with one line, before any work."""
    for options, message in [(dict(s_churn=float("nan")), "s_churn"), (dict(eta=1.5), "eta"), (dict(s_noise=-1.0), "s_noise"),
                             (dict(predictor="heun"), "unknown predictor"), (dict(corrector="x"), "unknown corrector"),
                             (dict(predictor="none", corrector="none"), "nothing to sample with"), (dict(snr=0.0), "snr"),
                             (dict(corrector_steps=2.5), "whole number"), (dict(s_tmin=10.0, s_tmax=1.0), "s_tmin is above s_tmax"),
                             (dict(rtol=1e-30), "rtol"), (dict(atol=float("nan")), "atol"), (dict(rtol=-1.0), "rtol")]:
        solver = next(s for s in sgm.SOLVERS if set(options) <= set(cli.solver_options(s)))
        with pytest.raises(sgm.SGMError, match=message):
            cli.check_solver_options({**cli.solver_options(solver), **options})
    with pytest.raises(sgm.SGMError, match="--s-churn must be"):
        cli.check_solver_options(dict(s_churn=-1.0), flags=True)
    with pytest.raises(sgm.SGMError, match="nothing to sample with"):  # ald is pc without a predictor
        cli.check_solver_options({**cli.solver_options("ald"), "corrector_steps": 0})
    sde = sgm.VPSDE()
    assert sgm.sample(gaussian_score(sde), sde, (4, 4), "pc", 3, corrector_steps=0)[1] == 3  # the predictor alone


def test_a_solver_refuses_options_it_does_not_take():
    """A sampler's keyword arguments are its options: any other is a TypeError that names it."""
    sde = sgm.VPSDE()
    with pytest.raises(TypeError, match="bogus_option"):
        sgm.sample(gaussian_score(sde), sde, (4, 4), solver="heun", steps=2, bogus_option=1)
    for solver, foreign in [("em", "snr"), ("heun", "s_churn"), ("dpmpp_2m", "eta"), ("ode", "s_noise"), ("edm", "rtol")]:
        with pytest.raises(TypeError, match=foreign):
            sgm.sample(gaussian_score(sde), sde, (4, 4), solver, 2, **{foreign: 0.5})
    with pytest.raises(TypeError, match="project"):  # a deterministic solver cannot inpaint
        sgm.inpaint(gaussian_score(sde), sde, torch.zeros(2, 4), torch.ones(4), "heun", 2)
    source = open(os.path.join(HERE, "sgm.py")).read()
    assert "import inspect" not in source and "solver_options" not in source


def test_every_solver_has_the_one_signature():
    import inspect

    for name, solver in sgm.SOLVERS.items():
        params = list(inspect.signature(solver.sample).parameters.values())
        assert [p.name for p in params[:4]] == ["score_fn", "sde", "x", "ts"], name
        assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:4]), name
        keyword_only = {p.name: p.default for p in params[4:] if p.kind == p.KEYWORD_ONLY}
        assert len(keyword_only) == len(params) - 4, name  # every option is keyword-only
        assert keyword_only["generator"] is None and keyword_only["callback"] is None, name
        assert ("project" in keyword_only) == solver.inpaints, name  # only those that re-noise inpaint
        assert solver.steps >= 1 and solver.grid in (sgm.time_grid, sgm.edm_time_grid), name
        assert set(cli.solver_options(name)) <= set(cli.OPTION_RANGES) | set(cli.OPTION_CHOICES), name
    assert cli.solver_options("pc") == {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "corrector_steps": 1}
    assert cli.solver_options("ode") == {"rtol": 1e-5, "atol": 1e-5} and cli.solver_options("em") == {}
    assert cli.solver_options("edm") == {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.0}
    assert cli.solver_options("dpmpp_2m_sde") == {"eta": 1.0, "s_noise": 1.0} and cli.solver_options("dpmpp_2m") == {}
    assert set(sgm.INPAINTING_SOLVERS) == {"em", "reverse_diffusion", "ancestral", "pc", "ald"}


def test_every_solver_matches_its_recorded_samples_on_the_shipped_model():
    """testdata/solvers.pt (tools/solver_fixture.py) holds each solver's samples and NFE on the
    shipped model for one seed: sgm.py may be rewritten, but not its numbers."""
    sys.path.insert(0, os.path.join(HERE, "tools"))
    import solver_fixture

    recorded = torch.load(os.path.join(HERE, "testdata", "solvers.pt"), weights_only=True)
    ckpt, threads = checkpoint.load(cli.SHIPPED), torch.get_num_threads()
    torch.set_num_threads(1)  # as when they were recorded
    try:
        for name in solver_fixture.CASES:
            x, nfe = solver_fixture.run_case(ckpt, name)
            assert nfe == recorded[name]["nfe"], name
            assert (x - recorded[name]["x"]).abs().max() < 1e-4, name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_time_grids(sde):
    ts = sgm.time_grid(sde, 4, 1e-3)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 1e-3]))
    ts = sgm.edm_time_grid(sde, 18, 1e-3)  # one contract: steps + 1 times, ending at the final time
    assert len(ts) == 19 and (ts[1:] < ts[:-1]).all() and ts[-1] == 0  # zero noise: the data
    assert sgm.noise_levels(sde, ts)[-1] == 0 and sgm.noise_levels(sde, ts)[-2] > 0
    ts = ts[:-1]
    assert ts[0] == pytest.approx(1.0, abs=1e-5) and ts[-1] == pytest.approx(1e-3, rel=1e-4)
    sigmas = sde.noise_level(ts.double())  # uniform in sigma^(1/7)
    steps = sigmas ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(17), rtol=1e-3)


def test_unknown_solver_and_steps():
    with pytest.raises(KeyError, match="rk4"):  # the scripts offer only known solvers
        sgm.sample(gaussian_score(SDES[0]), SDES[0], (2, 4), "rk4")
    with pytest.raises(AssertionError, match="step"):
        sgm.sample(gaussian_score(SDES[0]), SDES[0], (2, 4), "em", 0)


def test_callback_reports_every_step():
    seen = []
    sde = sgm.VPSDE()
    sgm.sample(gaussian_score(sde), sde, (16, 4), "pc", 20, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(20))
    assert seen[0]["t"] == 1.0 and seen[-1]["denoised"].shape == (16, 4)
    assert (seen[-1]["denoised"].mean(0) - MU).abs().max() < 0.5
    for solver in ("ald", "heun", "edm", "dpmpp_2m_sde"):
        seen = []
        churn = dict(s_churn=5.0) if solver == "edm" else {}
        sgm.sample(gaussian_score(sde), sde, (16, 4), solver, 20, callback=seen.append, **churn)
        assert [d["i"] for d in seen] == list(range(20)), solver
        assert seen[0]["t"] > 0.9 and seen[-1]["t"] == pytest.approx(1e-3, rel=1e-3), solver  # ald: the corrector at eps
        if solver != "ald":  # 20 Langevin steps alone do not reach the data
            assert (seen[-1]["denoised"].mean(0) - MU).abs().max() < 0.5, solver


@pytest.mark.parametrize("solver", list(sgm.SOLVERS))
def test_unet_score_runs_through_every_solver(solver):
    sde = sgm.VPSDE()
    net = randomize(sgm.UNet(tiny_config(image_size=8))).eval()
    tolerances = dict(rtol=1e-2, atol=1e-2) if solver == "ode" else {}
    x, nfe = sgm.sample(sgm.score_model(net, sde), sde, (2, 1, 8, 8), solver, 5, **tolerances,
                        generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and nfe > 0


# ---------------------------------------------------------------- likelihood and latents

@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_log_likelihood_exact_trace_matches_closed_form(sde):
    mu = 0.2 * MU  # keep VE's prior N(0, sigma_max^2) close to p_T, whose mean is mu
    x = mu + S * torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    logp, nfe = sgm.log_likelihood(gaussian_score(sde, mu), sde, x, exact_trace=True)
    assert (logp - gaussian_logp(sde, x, 1e-5, mu)).abs().max() < 0.05 and nfe > 10
    # Against the density the method itself defines (exact flow + prior), the integrator is exact.
    x_T = sde.mean_scale(torch.ones(1)) * mu + (marginal_var(sde, torch.ones(1), S ** 2) / marginal_var(sde, torch.full((1,), 1e-5), S ** 2)).sqrt() * (x - sde.mean_scale(torch.full((1,), 1e-5)) * mu)
    log_det = 2 * torch.log(marginal_var(sde, torch.ones(1), S ** 2) / marginal_var(sde, torch.full((1,), 1e-5), S ** 2))
    assert (logp - (sde.prior_logp(x_T) + log_det)).abs().max() < 1e-3


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_hutchinson_likelihood_is_unbiased(sde):
    # Correlated data: with a diagonal Jacobian the Rademacher estimate would be exact and prove nothing.
    mu, cov = 0.2 * MU, COV
    x = torch.distributions.MultivariateNormal(mu, cov).sample((400,))
    exact, _ = sgm.log_likelihood(correlated_score(sde, mu, cov), sde, x, exact_trace=True)
    estimate, _ = sgm.log_likelihood(correlated_score(sde, mu, cov), sde, x, generator=torch.Generator().manual_seed(1))
    closed = torch.distributions.MultivariateNormal(mu, cov + sde.std(torch.full((1,), 1e-5)) ** 2 * torch.eye(4)).log_prob(x)
    assert (exact - closed).abs().max() < 0.05
    diff = estimate - exact
    assert diff.std() > 1e-3  # it is an estimate
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(len(diff)) + 1e-4


def test_bits_per_dim_offset_follows_the_data_scaling():
    """A model whose density on u = (y + U) / 256 is N(m, v): its bits/dim must not depend on the data range."""
    sde = sgm.VPSDE()
    images = torch.randint(60, 200, (64, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    m, s = 0.5, 0.2
    results = []
    for lo, hi in [(0.0, 1.0), (-1.0, 1.0)]:
        c = hi - lo
        mu, sd = torch.full((4,), lo + c * m), c * s
        bpd, _ = sgm.bits_per_dim(gaussian_score(sde, mu, sd), sde, images, (lo, hi), generator=torch.Generator().manual_seed(3), exact_trace=True)
        results.append(bpd)
    u = (images.float() + torch.rand(images.shape, generator=torch.Generator().manual_seed(3))) / 256
    direct = -torch.distributions.Normal(m, s).log_prob(u).sum(1) / (4 * math.log(2)) + 8
    for bpd in results:
        assert (bpd - direct).abs().max() < 0.02, (bpd, direct)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_encode_decode_round_trip(sde):
    x = MU + S * torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    z, _ = sgm.encode(gaussian_score(sde), sde, x)
    assert (z.std() / sde.prior_std - 1).abs() < 0.3  # the latent looks like the prior
    back, _ = sgm.decode(gaussian_score(sde), sde, z)
    assert (back - x).abs().max() < 1e-3


# ---------------------------------------------------------------- train.py

HANG = 600  # seconds: a wait for a subprocess that lasts this long is a hang, on any machine


def run_cli(*args, timeout=HANG, env=None):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


TRAIN_TINY = ["--preset", "quick", "--channels", "8", "--batch-size", "16", "--limit-data", "256", "--device", "cpu"]


def read_log(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]


@pytest.fixture
def cheap_grids():
    """train.py's sample grids (written at the end of every run) with 2 Heun steps, 3 NFE, instead of 35."""
    import train
    with pytest.MonkeyPatch.context() as patch:  # not undone by a test's monkeypatch.undo()
        patch.setattr(train, "GRID_STEPS", 2)
        yield


def test_train_cli_writes_checkpoint_grid_and_log_and_sample_uses_it(tmp_path):
    """End to end, train.py as a script, then sample.py on its checkpoint."""
    import numpy as np
    out = tmp_path / "run"
    r = run_cli("train.py", *TRAIN_TINY, "--steps", "6", "--log-every", "2", "--sample-every", "6", "--ckpt-every", "2",
                "--out", str(out))  # the quick preset is conditional
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stderr and "done" in r.stderr
    lines = r.stderr.splitlines()  # redirected: plain lines, the first after one step, each with the time left
    assert lines[1] == "step 1/6 starting, time left after a few steps" and all(" left" in line for line in lines[1:] if line.startswith("step "))
    assert f"Sample it: python sample.py --ckpt {out} --no-ema" in r.stderr  # 6 steps: the EMA is still young
    ck = checkpoint.load(str(out / "ckpt.pt"))
    assert ck.step == 6 and ck.model_config.num_classes == 10 and ck.train_config.sde == "subvp"  # the shipped model's SDE
    assert ck.train_config.preset == "quick" and ck.train_config.channels == 8 and ck.train_config.conditional
    assert len(ck.extra["class_counts"]) == 10 and sum(ck.extra["class_counts"]) == 256  # --limit-data 256
    assert (out / "samples_0000006.png").exists()
    log = read_log(out)
    assert [row["step"] for row in log] == [2, 4, 6] and all(math.isfinite(row["loss"]) for row in log)
    r = run_sample("--ckpt", out / "ckpt.pt", "--solver", "heun", "--steps", 2, "--n", 4, "--label", "bag", "--out", tmp_path / "s.npz")
    assert r.exit_code == 0 and "heun: 4 images" in r.output, r.output
    samples = np.load(tmp_path / "s.npz")
    assert samples["images"].shape == (4, 28, 28) and samples["images"].dtype == np.uint8 and (samples["labels"] == 8).all()


def test_train_resume_restores_the_config_and_refuses_contradictions(tmp_path, cheap_grids):
    import train
    out = tmp_path / "run"
    args = [*TRAIN_TINY, "--steps", "2", "--log-every", "1", "--sample-every", "1000", "--out", str(out), "--sde", "subvp",
            "--lr", "1e-3", "--conditional", "--label-dropout", "0.3", "--grad-clip", "0.5", "--seed", "4"]
    assert invoke(train.main, args).exit_code == 0
    stored = checkpoint.load(str(out / "ckpt.pt")).train_config
    assert (stored.sde, stored.lr, stored.conditional, stored.label_dropout, stored.grad_clip, stored.seed,
            stored.limit_data, stored.channels, stored.batch_size) == ("subvp", 1e-3, True, 0.3, 0.5, 4, 256, 8, 16)
    resume = ["--device", "cpu", "--out", str(out), "--resume"]
    for flag, value in [("--lr", "0.002"), ("--sde", "vp"), ("--channels", "16"), ("--seed", "0"), ("--limit-data", "512"),
                        ("--label-dropout", "0.1"), ("--grad-clip", "1.0"), ("--preset", "default"), ("--batch-size", "8")]:
        r = invoke(train.main, [*resume, flag, value])
        assert r.exit_code == 1 and f"{flag} {value}" in r.output and "contradicts" in r.output, (flag, r.output)
    for flag in ("--amp", "--no-conditional"):  # a CPU run is in fp32 unless --amp
        r = invoke(train.main, [*resume, flag])
        assert r.exit_code == 1 and f"{flag} contradicts" in r.output, r.output
    # The same values, and the options that may change, are accepted; the rest comes from the file.
    r = invoke(train.main, [*resume, "--steps", "4", "--lr", "1e-3", "--log-every", "2", "--sde", "subvp"])
    assert r.exit_code == 0, r.output
    resumed = checkpoint.load(str(out / "ckpt.pt"))
    assert resumed.step == 4 and resumed.train_config == dataclasses.replace(stored, steps=4, log_every=2)


def fake_clock(monkeypatch, seconds_per_step):
    """train.py's clock advanced by the steps alone: seconds_per_step(step) for each (step from 0), whatever the
    machine's speed. Returns the list of the clock's readings at each step's end."""
    import types

    import train
    clock, real_step = [time.time()], train.train_step

    def timed_step(run, step):
        loss = real_step(run, step)
        clock[0] += seconds_per_step(step)
        return loss

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(train, "train_step", timed_step)


def test_train_time_limit_and_snapshots_feed_the_runs_table(tmp_path, few_test_images, cheap_grids, monkeypatch):
    import train
    fake_clock(monkeypatch, lambda step: 0.25)  # 3.6 s of --time-limit: 15 steps, on any machine
    out = tmp_path / "run"
    r = invoke(train.main, [*TRAIN_TINY, "--time-limit", "0.06", "--steps", "100000", "--snapshot-minutes", "0.04,0.02",
                            "--lr-schedule", "cosine", "--ema-ramp", "0.1", "--noise-sampling", "lognormal",
                            "--sample-every", "100000", "--ckpt-every", "7", "--log-every", "5", "--no-conditional",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "in fp32" in r.output and "left" in r.output  # fp32 on a CPU unless --amp; the time left
    assert f"python sample.py --ckpt {out}" in r.output  # how to sample the run
    ck = checkpoint.load(str(out / "ckpt.pt"), use_ema=False)
    cfg = ck.train_config
    # Stopped by the time limit (3.6 s of training) after the step that passed it; the config keeps the planned
    # steps, so --resume could continue the cosine.
    assert cfg.steps == 100000 and ck.step == 15 and ck.extra["train_seconds"] == 3.75
    assert [row["step"] for row in read_log(out)] == [5, 10, 15]
    assert (cfg.lr_schedule, cfg.ema_ramp, cfg.noise_sampling, cfg.conditional, cfg.amp) == ("cosine", 0.1, "lognormal", False, False)
    assert ck.model_config.num_classes == 0
    row = read_log(out)[-1]  # the cosine over the planned steps
    assert row["lr"] == pytest.approx(train.learning_rate(cfg, row["step"] - 1))
    for minutes, step in (("0.02", 5), ("0.04", 10)):  # the first steps past 1.2 s and 2.4 s
        snap = checkpoint.load(str(out / f"snapshot_{minutes}min.pt"))
        assert snap.is_ema and snap.resume is None and snap.step == step
    r = invoke(train.main, [*TRAIN_TINY, "--steps", "2", "--out", str(out)])  # the snapshots are part of the run
    assert r.exit_code == 1 and "--overwrite" in r.output and (out / "snapshot_0.02min.pt").exists()
    r = run_evaluate("runs", out, "--n", 4, "--seeds", "0,1", "--out", tmp_path / "table", "--device", "cpu")
    assert r.exit_code == 0, r.output
    table = (tmp_path / "table.md").read_text()
    import evaluate
    recipe = evaluate.recipe(cfg)  # the preset, then what differs from it
    assert recipe.startswith("quick ") and "noise_sampling=lognormal" in recipe and "conditional=False" in recipe and "steps" not in recipe
    assert table.count(f"| {out} | {recipe} |") == 3, table
    assert "| 0.02 |" in table and "| 0.04 |" in table and "floor" in table
    assert table.count(" / ") >= 3  # an FD per seed
    r = run_evaluate("runs", tmp_path, "--n", 4, "--device", "cpu")
    assert r.exit_code == 1 and "no ckpt.pt" in r.output


@pytest.mark.parametrize("args, message", [
    (["--epochs", "5", "--steps", "10"], "one of --steps and --epochs"),
    (["--time-limit", "nan"], "--time-limit must be"),
    (["--snapshot-minutes", "5,x"], "minutes separated by commas"),
    (["--snapshot-minutes", "0"], "--snapshot-minutes must be"),
    (["--time-limit", "1", "--snapshot-minutes", "0.5,2"], "--snapshot-minutes 2 is past the run's 1 minutes"),
    (["--sigma-max", "22"], "not with the subvp SDE"),
    (["--sde", "ve", "--sigma-max", "nan"], "--sigma-max must be"),
    (["--noise-sampling", "lognormal", "--likelihood-weighting"], "own weighting"),
    (["--ema-ramp", "2"], "--ema-ramp"),
    (["--lr-schedule", "linear"], "--lr-schedule"),
])
def test_train_recipe_options_refuse_bad_values(tmp_path, args, message):
    import train
    r = invoke(train.main, [*TRAIN_TINY, *args, "--out", str(tmp_path / "run")])
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert isinstance(r.exception, SystemExit) and not (tmp_path / "run").exists()


def test_train_resume_from_an_export_is_refused(tiny_ckpt, tmp_path):
    import shutil

    import train
    (tmp_path / "run").mkdir()
    shutil.copy(tiny_ckpt / "tiny.pt", tmp_path / "run" / "ckpt.pt")  # EMA weights only, no optimizer
    r = invoke(train.main, ["--device", "cpu", "--out", str(tmp_path / "run"), "--resume"])
    assert r.exit_code == 1 and "no optimizer state" in r.output and "Traceback" not in r.output


def stale_temp(folder, name_pid=None):
    """A temporary file as files.atomic_write leaves it when killed: a finished process's, an hour ago."""
    if name_pid is None:
        finished = subprocess.Popen(["true"])
        finished.wait()
        name_pid = finished.pid
    path = folder / f".sgm-tmp-{name_pid}-abc_12.tmp"
    path.write_bytes(b"half a save")
    os.utime(path, (time.time() - 3600,) * 2)
    return path


def test_train_refuses_to_replace_a_run(tmp_path, cheap_grids):
    import train
    out = tmp_path / "run"
    args = [*TRAIN_TINY, "--steps", "2", "--log-every", "1", "--sample-every", "1000", "--out", str(out)]
    r = invoke(train.main, args)
    assert r.exit_code == 0 and "step 1/2 loss" in r.output  # a plain line per interval when not a TTY
    before = (out / "ckpt.pt").read_bytes()
    stale = stale_temp(out)  # left by a kill during a save
    r = invoke(train.main, [*args[:-4], "--steps", "1", "--out", str(out)])
    assert r.exit_code == 1 and "holds a run at step 2: use --resume" in r.output and "--overwrite" in r.output
    assert (out / "ckpt.pt").read_bytes() == before and len(read_log(out)) == 2
    r = invoke(train.main, [*args, "--steps", "1", "--overwrite", "--limit-data", "8"])  # fails late
    assert r.exit_code == 1 and "fewer than one global batch" in r.output
    assert (out / "ckpt.pt").read_bytes() == before and len(read_log(out)) == 2  # the old run survives
    r = invoke(train.main, [*args, "--steps", "1", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(str(out / "ckpt.pt")).step == 1 and [row["step"] for row in read_log(out)] == [1]
    assert not stale.exists()  # cleaned up when a run starts
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a row cut short by a kill
    r = invoke(train.main, [*args, "--resume"])  # from step 1 to --steps 2
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in read_log(out)] == [1, 2]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    for change, words in [(dict(optimizer="x"), "damaged resume state"), (dict(step="40"), "damaged sgm checkpoint")]:
        torch.save({**state, **change}, out / "ckpt.pt")
        r = invoke(train.main, [*args, "--resume", "--steps", "3"])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    torch.save(state, out / "ckpt.pt")
    fresh = tmp_path / "fresh" / "run"
    r = invoke(train.main, [*args[:-2], "--out", str(fresh), "--limit-data", "8"])
    assert r.exit_code == 1 and not (tmp_path / "fresh").exists()  # a failed run creates no folder
    r = invoke(train.main, [*args, "--resume", "--steps", "1"])
    assert r.exit_code == 1 and "nothing to do" in r.output
    r = invoke(train.main, [*args, "--resume", "--overwrite"])
    assert r.exit_code == 1 and "--overwrite replaces it" in r.output
    r = invoke(train.main, [*args, "--out", "/proc/no/such/run"])
    assert r.exit_code == 1 and "/proc/no" in r.output and "Traceback" not in r.output


def test_train_resume_after_sigint_sigterm_and_sigkill_is_exact(tmp_path, monkeypatch):
    """Stopped at any point, --resume reproduces the uninterrupted run's losses, each step logged once; the
    sample grids fall on checkpoint steps (they must not touch the training RNG)."""
    import signal

    import train
    monkeypatch.setattr(train, "GRID_STEPS", 2)  # cheap grids (3 NFE), still written at every checkpoint
    common = [*TRAIN_TINY, "--steps", "9", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "3", "--sde", "subvp",
              "--conditional", "--lr-schedule", "constant"]  # the kill below runs to --steps 500: the same lr needs no decay
    assert invoke(train.main, [*common, "--out", str(tmp_path / "full")]).exit_code == 0
    full = [row["loss"] for row in read_log(tmp_path / "full")]
    real_step = train.train_step
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name

        def step_then_signal(run, step, sig=sig):
            loss = real_step(run, step)
            if step == 4:  # the signal arrives during step 5
                os.kill(os.getpid(), sig)
            return loss

        monkeypatch.setattr(train, "train_step", step_then_signal)
        r = invoke(train.main, [*common, "--out", str(out)], expect_interrupt=True)
        assert r.exit_code == 128 + sig and "Continue with: python train.py --resume --out" in r.output, r.output
        assert checkpoint.load(str(out / "ckpt.pt")).step == 5
        monkeypatch.setattr(train, "train_step", real_step)
        assert invoke(train.main, ["--device", "cpu", "--out", str(out), "--resume"]).exit_code == 0
        log = read_log(out)
        assert [row["step"] for row in log] == list(range(1, 10))
        assert [row["loss"] for row in log] == pytest.approx(full, rel=1e-5, abs=1e-7)
    # SIGKILL: nothing can be saved; the run continues from its last checkpoint and the log drops the rows after it.
    out = tmp_path / "killed"
    longer = [*TRAIN_TINY, "--steps", "500", *common[len(TRAIN_TINY) + 2:], "--sample-every", "1000"]  # no grids:
    # the process is killed long before its end, and its resumed losses must match a run that made grids
    process = subprocess.Popen([sys.executable, "train.py", *longer, "--out", str(out)],
                               cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + HANG
        while time.time() < deadline and not ((out / "log.jsonl").exists() and len(read_log(out)) >= 5):
            time.sleep(0.02)
    finally:  # a Ctrl-C in the wait leaves no training process behind
        process.kill()
        process.wait()
    assert len(read_log(out)) >= 5
    r = invoke(train.main, ["--device", "cpu", "--out", str(out), "--resume", "--steps", "9"])
    assert r.exit_code == 0, r.output
    log = read_log(out)
    assert [row["step"] for row in log] == list(range(1, 10))
    assert [row["loss"] for row in log] == pytest.approx(full, rel=1e-5, abs=1e-7)


def test_train_stops_on_nan_and_keeps_the_checkpoint(tmp_path, monkeypatch, cheap_grids):
    import train
    out = tmp_path / "run"
    args = [*TRAIN_TINY, "--steps", "4", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "1000", "--out", str(out)]
    assert invoke(train.main, args).exit_code == 0
    good = (out / "ckpt.pt").read_bytes()
    real_loss = sgm.dsm_loss
    monkeypatch.setattr(sgm, "dsm_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    result = invoke(train.main, [*args[:-2], "--steps", "8", "--out", str(out), "--resume"])
    assert result.exit_code == 1 and "loss became nan" in result.output and "kept" in result.output
    assert (out / "ckpt.pt").read_bytes() == good


def test_train_refuses_to_save_exploded_weights(tmp_path, cheap_grids):
    import train
    out = tmp_path / "run"
    args = [*TRAIN_TINY, "--lr", "1000", "--grad-clip", "1e6", "--warmup", "0", "--ckpt-every", "1", "--log-every", "1",
            "--sample-every", "1000", "--steps", "10", "--out", str(out)]
    r = invoke(train.main, args)
    assert r.exit_code == 1 and "weights diverged" in r.output and "Traceback" not in r.output, r.output
    if (out / "ckpt.pt").exists():  # an earlier, still sane checkpoint may stay; a broken one never
        net = checkpoint.load(str(out / "ckpt.pt"), use_ema=False).net
        assert max(float(p.abs().max()) for p in net.parameters()) < 1e3


def test_train_missing_data_message(tmp_path, monkeypatch):
    import torchvision

    import train
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", lambda self: (_ for _ in ()).throw(RuntimeError("offline")))
    result = invoke(train.main, ["--data-root", str(tmp_path / "empty"), "--steps", "1"])
    assert result.exit_code == 1 and "apt-get install -y dataset-fashion-mnist" in result.output
    assert "Traceback" not in result.output


def test_train_bad_option_is_a_click_error():
    import train
    r = invoke(train.main, ["--sde", "banana"])
    assert r.exit_code == 2 and "Invalid value" in r.output and "Traceback" not in r.output


@pytest.mark.slow  # three Python processes starting torch
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        "train.py", *TRAIN_TINY, "--steps", "4", "--log-every", "2", "--sample-every", "1000", "--out", str(out)],
                       cwd=HERE, capture_output=True, text=True, timeout=HANG, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x2" in r.stderr and checkpoint.load(str(out / "ckpt.pt")).step == 4
    assert len(read_log(out)) == 2  # only rank 0 writes


# ---------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Tiny, untrained conditional checkpoints: VP for 1x28x28 and 1x8x8 images, sub-VP for 1x28x28."""
    folder = tmp_path_factory.mktemp("ck")
    for name, size, sde in (("tiny.pt", 28, sgm.VPSDE()), ("small_images.pt", 8, sgm.VPSDE()), ("subvp.pt", 28, sgm.SubVPSDE())):
        config = tiny_config(num_classes=10, image_size=size)
        net = randomize(sgm.UNet(config))
        ckpt = checkpoint.Checkpoint(net, sde, sde.data_range, config, checkpoint.TrainConfig(sde=sde.name))
        checkpoint.save(folder / name, ckpt, ema=checkpoint.EMA(net))
    return folder


def run_sample(*args):
    import sample
    return invoke(sample.main, ["--device", "cpu", *args])


@pytest.mark.parametrize("solver", list(sgm.SOLVERS))
def test_sample_cli_every_solver_writes_a_grid(tiny_ckpt, tmp_path, solver):
    from PIL import Image
    out = tmp_path / f"{solver}.png"
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", solver, "--n", 10, "--steps", 3, "--rtol", 1e-2, "--atol", 1e-2,
                   "--batch-size", 6, "--out", out)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (8 * 30 + 2, 2 * 30 + 2)  # 8 per row, 28 px + 2 px padding
    assert f"{solver}: 10 images" in r.output and "NFE per sample" in r.output and "img/s" in r.output


def test_sample_cli_npz_gif_and_reproducibility(tiny_ckpt, tmp_path):
    import numpy as np
    from PIL import Image
    for name in ("a.npz", "b.npz"):
        assert run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "em", "--steps", 4, "--n", 5, "--seed", 3,
                          "--label", "sneaker", "--out", tmp_path / name).exit_code == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (5, 28, 28) and a["images"].dtype == np.uint8
    assert a["images"].max() <= 255 and (a["labels"] == 7).all()
    assert np.array_equal(a["images"], b["images"])
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "pc", "--steps", 6, "--n", 4, "--out", tmp_path / "t.gif")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "t.gif").n_frames > 5


@pytest.mark.parametrize("args, message", [
    (["--solver", "rk4"], "Invalid value for '--solver'"),
    (["--n", "0"], "Invalid value for '--n'"),
    (["--ckpt", "missing.pt"], "no such checkpoint"),
    (["--ckpt", "CORRUPT"], "not a readable checkpoint"),
    (["--ckpt", "SMALL", "--inpaint", "left"], "the checkpoint is for 1x8x8"),
    (["--out", "/proc/nope/x.png"], "cannot write there"),
    (["--out", "x.jpg"], "suffix must be"),
    (["--label", "banana"], "unknown --label"),
    (["--label", "²"], "unknown --label"),  # a digit to str.isdigit, not to int()
    (["--inpaint", "diagonal"], "Invalid value for '--inpaint'"),
    (["--inpaint", "left", "--solver", "ode"], "needs a solver that re-noises every step"),
    (["--inpaint", "left", "--solver", "dpmpp_2m_sde"], "needs a solver that re-noises every step"),
    (["--predictor", "heun"], "Invalid value for '--predictor'"),
    (["--solver", "pc", "--predictor", "none", "--corrector", "none"], "nothing to sample with"),
    (["--label", "none", "--guidance", "1"], "--guidance needs labels"),
    (["--ckpt", "SUBVP", "--solver", "ancestral", "--steps", "2"], "not defined for SubVPSDE"),
])
def test_sample_cli_bad_input(tiny_ckpt, tmp_path, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    named = {"CORRUPT": tmp_path / "corrupt.pt", "SMALL": tiny_ckpt / "small_images.pt", "SUBVP": tiny_ckpt / "subvp.pt"}
    args = [str(named.get(a, a)) for a in args]
    if "--ckpt" not in args:
        args += ["--ckpt", str(tiny_ckpt / "tiny.pt")]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o.png")]
    r = run_sample(*args)
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)


def test_sample_cli_inpaint_interpolate_and_label_all(tiny_ckpt, tmp_path):
    from PIL import Image
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "pc", "--steps", 3, "--inpaint", "center", "--from-test", 5,
                   "--n", 4, "--out", tmp_path / "inpaint.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "inpaint.png").size == (4 * 30 + 2, 3 * 30 + 2)  # original, masked, completion rows
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--steps", 2, "--inpaint", "left", "--n", 2, "--out", tmp_path / "default.png")
    assert r.exit_code == 0 and "pc: 2 images" in r.output, r.output  # the default solver cannot inpaint: pc instead
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--interpolate", 0, 1, "--n", 4, "--rtol", 1e-2, "--atol", 1e-2,
                   "--out", tmp_path / "interp.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "interp.png").size == (6 * 30 + 2, 32)  # A, 4 steps, B
    assert "ode: 4 images" in r.output, r.output  # interpolation is the ODE's, whatever the default solver
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "heun", "--steps", 2, "--label", "all", "--n", 20,
                   "--guidance", 2, "--out", tmp_path / "all.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "all.png").size == (2 * 30 + 2, 10 * 30 + 2)  # one row per class


def test_sample_ckpt_takes_a_run_folder(tiny_ckpt, tmp_path):
    """--ckpt RUN samples from RUN/ckpt.pt; a folder without one is a one-line error, before any work."""
    import shutil
    run = tmp_path / "run"
    run.mkdir()
    r = run_sample("--ckpt", run, "--out", tmp_path / "x.png")
    assert r.exit_code == 1 and f"{run}: a folder without ckpt.pt" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.png").exists()
    shutil.copy(tiny_ckpt / "tiny.pt", run / "ckpt.pt")
    r = run_sample("--ckpt", run, "--solver", "heun", "--steps", 2, "--n", 2, "--out", tmp_path / "x.png")
    assert r.exit_code == 0 and (tmp_path / "x.png").exists() and f"from {run / 'ckpt.pt'}" in r.output, r.output


def test_prior_labels_follow_the_training_classes(tiny_ckpt, tmp_path):
    """Unconditional sampling of a conditional model: labels in the stored class proportions, w = 0, by default."""
    ckpt = checkpoint.load(tiny_ckpt / "tiny.pt")
    assert torch.equal(torch.bincount(ckpt.prior_labels(1000), minlength=10), torch.full((10,), 100))  # no counts: equal
    ckpt.extra["class_counts"] = [0, 600, 0, 0, 300, 0, 0, 0, 0, 100]
    labels = ckpt.prior_labels(50, seed=3)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.tensor([0, 30, 0, 0, 15, 0, 0, 0, 0, 5]))
    assert not torch.equal(labels, labels.sort().values) and torch.equal(labels, ckpt.prior_labels(50, seed=3))
    import numpy as np
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "dpmpp_2m", "--steps", 2, "--n", 20, "--out", tmp_path / "p.npz")
    assert r.exit_code == 0 and "labels drawn from the training classes' frequencies" in r.output and "w = 0" in r.output, r.output
    assert np.array_equal(np.bincount(np.load(tmp_path / "p.npz")["labels"], minlength=10), np.full(10, 2))
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "dpmpp_2m", "--steps", 2, "--n", 20, "--label", "none",
                   "--out", tmp_path / "none.npz")
    assert r.exit_code == 0 and "the dropped label's score" in r.output, r.output
    assert "labels" not in np.load(tmp_path / "none.npz")
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "heun", "--steps", 2, "--n", 2, "--eta", 0.5, "--out", tmp_path / "h.png")
    assert r.exit_code == 0 and "heun does not use --eta; ignored" in r.output, r.output


def test_shipped_checkpoint_loads_and_samples_by_default(tmp_path):
    """checkpoints/fmnist.pt: EMA weights only, fp16, class-conditional, and what sample.py uses by default."""
    import numpy as np

    import sample
    assert cli.default_checkpoint() == cli.SHIPPED and os.path.getsize(cli.SHIPPED) <= 20e6
    state = torch.load(cli.SHIPPED, map_location="cpu", weights_only=True)
    assert state["model"] is None and state["optimizer"] is None and state["rng"] is None
    assert {v.dtype for v in state["ema"].values() if v.is_floating_point()} == {torch.float16}
    ckpt = checkpoint.load(cli.SHIPPED, "cpu")
    assert ckpt.model_config.num_classes == 10 and next(ckpt.net.parameters()).dtype == torch.float32
    assert ckpt.is_ema and ckpt.resume is None and ckpt.train_config.conditional
    r = invoke(sample.main, ["--solver", "heun", "--steps", 3, "--n", 3, "--label", "bag", "--device", "cpu",
                                         "--out", str(tmp_path / "s.npz")])
    assert r.exit_code == 0, r.output
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8 and images.std() > 10  # not a blank image


@pytest.mark.parametrize("name", ["fmnist_v1.pt", "fmnist_24ch.pt", "fmnist_likelihood.pt"])
def test_other_committed_models_load_and_sample(name, tmp_path):
    """The earlier model, the wider candidate and the likelihood-weighted twin: EMA-only fp16 files of at
    most 20 MB that sample.py runs."""
    import sample
    path = os.path.join(os.path.dirname(cli.SHIPPED), name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert os.path.getsize(path) <= 20e6 and state["model"] is None and state["optimizer"] is None
    assert {v.dtype for v in state["ema"].values() if v.is_floating_point()} == {torch.float16}
    if name == "fmnist_likelihood.pt":  # trained as its name says
        train = state["extra"]["train"]
        assert train["likelihood_weighting"] and train["noise_sampling"] == "importance"
        assert state["step"] == 13126 and train["channels"] == 16  # the shipped recipe's run, not a smoke test
    r = invoke(sample.main, ["--ckpt", path, "--solver", "heun", "--steps", 3, "--n", 2, "--label", "bag",
                             "--device", "cpu", "--out", str(tmp_path / "s.npz")])
    assert r.exit_code == 0, r.output
    import numpy as np
    assert np.load(tmp_path / "s.npz")["images"].std() > 10  # not a blank image


# ---------------------------------------------------------------- controllable generation

@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("solver", ["pc", "em"])
def test_inpainting_independent_gaussian(sde, solver):
    known = (MU + S * torch.randn(2000, 4, generator=torch.Generator().manual_seed(0)))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x, _ = sgm.inpaint(gaussian_score(sde), sde, known, mask, solver, 500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x[:, mask == 1], known[:, mask == 1])
    free = x[:, mask == 0]
    assert (free.mean(0) - MU[mask == 0]).abs().max() < 0.05 and abs(float(free.std(0).mean()) / S - 1) < 0.05


def test_inpainting_correlated_gaussian_beats_ignoring_the_known_pixels():
    """Replacement (appendix I.2) approximates the exact conditional mean mu_U + C_UK C_KK^-1 (y_K - mu_K)."""
    sde, mu = sgm.VPSDE(), torch.zeros(4)
    cov = torch.full((4, 4), 0.8) + 0.2 * torch.eye(4)  # strongly correlated coordinates
    reps = 40  # samples per known vector, so their average estimates the sampler's conditional mean
    known = torch.distributions.MultivariateNormal(mu, cov).sample((50,)).repeat_interleave(reps, 0)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    K, U = mask == 1, mask == 0
    x, _ = sgm.inpaint(correlated_score(sde, mu, cov), sde, known, mask, "pc", 500, generator=torch.Generator().manual_seed(1))
    exact = (mu[U] + (cov[U][:, K] @ torch.linalg.solve(cov[K][:, K], (known[:, K] - mu[K]).T)).T)[::reps]  # (50, 2)
    sampler_mean = x[:, U].reshape(50, reps, 2).mean(1)
    error = (sampler_mean - exact).pow(2).mean().sqrt()
    ignore = (mu[U] - exact).pow(2).mean().sqrt()
    conditional_std = torch.diag(cov[U][:, U] - cov[U][:, K] @ torch.linalg.solve(cov[K][:, K], cov[K][:, U])).sqrt().mean()
    # Shrinkage of the replacement method: slope of sampler mean on exact conditional mean (1 would be exact).
    slope = float((sampler_mean * exact).sum() / (exact * exact).sum())
    print(f"\ninpainting: rms error of the conditional mean {error:.3f} (sampling noise alone ~{conditional_std / reps ** 0.5:.3f}), "
          f"ignoring the known pixels {ignore:.3f}, slope {slope:.2f}")
    assert error < 0.3 * ignore


def two_class_scores(sde, means, s=0.3):
    """Exact class-conditional scores and the exact mixture (unconditional) score of two Gaussian classes."""
    def model(x, t, labels):
        a = sde.mean_scale(t)[:, None]
        var = marginal_var(sde, t, s ** 2)[:, None]
        per_class = torch.stack([-(x - a * m) / var for m in means])  # (2, B, D)
        log_w = torch.stack([-(x - a * m).pow(2).sum(1) / (2 * var[:, 0]) for m in means])  # (2, B)
        mixture = (torch.softmax(log_w, 0)[..., None] * per_class).sum(0)
        cond = per_class[labels.clamp(min=0), torch.arange(len(x))]
        return torch.where((labels < 0)[:, None], mixture, cond)
    return model


def test_guidance_on_two_gaussian_classes():
    sde = sgm.VPSDE()
    means = [torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])]
    model = two_class_scores(sde, means)
    labels = torch.zeros(2000, dtype=torch.long)
    x0, _ = sgm.sample(sgm.guided_score(model, labels, 0.0), sde, (2000, 2), "em", 500, generator=torch.Generator().manual_seed(0))
    assert (x0.mean(0) - means[0]).abs().max() < 0.03 and abs(float(x0.std(0).mean()) / 0.3 - 1) < 0.05
    x3, _ = sgm.sample(sgm.guided_score(model, labels, 3.0), sde, (2000, 2), "em", 500, generator=torch.Generator().manual_seed(0))
    assert float(x3[:, 0].mean()) < float(x0[:, 0].mean()) - 0.02  # pushed away from class 1 at x = +1
    both = torch.tensor([0, 1] * 1000)
    xb, _ = sgm.sample(sgm.guided_score(model, both, 0.0), sde, (2000, 2), "ode", generator=torch.Generator().manual_seed(0))
    assert float(xb[both == 1, 0].mean()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_interpolation_end_points_reconstruct_the_inputs(sde):
    x = MU + S * torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    from sample import interpolate
    path, nfe = interpolate(gaussian_score(sde), sde, x[:1], x[1:], n=5)
    assert path.shape == (5, 4) and nfe > 20
    assert (path[0] - x[0]).abs().max() < 1e-3 and (path[-1] - x[1]).abs().max() < 1e-3


# ---------------------------------------------------------------- evaluate.py

def run_evaluate(*args):
    import evaluate
    return invoke(evaluate.main, args)


@pytest.fixture
def few_test_images(monkeypatch):
    """Named datasets give their first 1000 images: evaluate.py's FDs are against 1000 test
    images instead of 10,000 (the tests check the tables, not the distances, and the features of
    the whole test set would take most of their time)."""
    import evaluate
    load = data.load_named

    def first_1000(*args, **kwargs):
        images, labels = load(*args, **kwargs)
        return images[:1000], labels[:1000]

    monkeypatch.setattr(data, "load_named", first_1000)
    evaluate.reference.cache_clear()  # computed once per process: not from these images
    yield
    evaluate.reference.cache_clear()


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise():
    import evaluate
    net, _ = evaluate.load_classifier()
    images = data.load("fashion-mnist", train=False).images
    reference, _ = evaluate.features_and_classes(net, images[:500])  # 500 images a side: FDs of ~40, ~300, ~1000 below
    assert abs(evaluate.frechet_distance(reference, reference)) < 1e-4  # eigh round-off; FDs here are > 10
    generator = torch.Generator().manual_seed(0)
    distances = []
    for noise in (0.0, 20.0, 60.0):
        noisy = (images[500:1000].float() + noise * torch.randn(images[500:1000].shape, generator=generator)).clamp(0, 255).to(torch.uint8)
        distances.append(evaluate.frechet_distance(evaluate.features_and_classes(net, noisy)[0], reference))
    assert distances[0] < distances[1] < distances[2], distances


def test_classifier_hash_check_fails_on_a_modified_file(tmp_path, monkeypatch):
    import click

    import evaluate
    assert evaluate.load_classifier()[1]["data"] == "fashion-mnist"  # the committed file passes
    modified = bytearray(open(evaluate.CLASSIFIER, "rb").read())
    modified[-100] ^= 0xFF
    (tmp_path / "classifier.pt").write_bytes(bytes(modified))
    monkeypatch.setattr(evaluate, "CLASSIFIER", str(tmp_path / "classifier.pt"))
    with pytest.raises(click.ClickException, match="does not match"):
        evaluate.load_classifier()


def test_bpd_per_image_file_and_paired_difference(tiny_ckpt, tmp_path, few_test_images):
    """bpd --out writes one value per image; bpd-diff pairs two files: the same model and noise
    differ by exactly zero, another model by its own mean difference; files measured otherwise,
    broken files and --out over a file bpd did not write are refused."""
    args = ["--n", 2, "--batch-size", 2, "--rtol", 0.1, "--atol", 0.1, "--device", "cpu"]
    for name, ckpt, more in (("a", "tiny.pt", []), ("a2", "tiny.pt", []), ("b", "subvp.pt", []),
                             ("seed", "tiny.pt", ["--seed", 1]), ("n1", "tiny.pt", ["--n", 1])):
        r = run_evaluate("bpd", "--ckpt", tiny_ckpt / ckpt, *args, *more, "--out", tmp_path / f"{name}.txt")
        assert r.exit_code == 0, r.output
    lines = (tmp_path / "a.txt").read_text().splitlines()
    assert lines[0].startswith("# bits/dim per image: 2 test images 1x28x28 (sha256 ") and len(lines) == 3
    r = run_evaluate("bpd-diff", tmp_path / "a.txt", tmp_path / "a2.txt")
    assert r.exit_code == 0 and "second - first: +0.0000 +- 0.0000 bits/dim" in r.output, r.output
    r = run_evaluate("bpd-diff", tmp_path / "a.txt", tmp_path / "b.txt")
    a, b = ([float(v) for v in (tmp_path / f).read_text().splitlines()[1:]] for f in ("a.txt", "b.txt"))
    difference = sum(y - x for x, y in zip(a, b)) / 2
    assert r.exit_code == 0 and f"second - first: {difference:+.4f} +- " in r.output, r.output
    assert f"{sum(a) / 2:.4f} +- " in r.output and str(tiny_ckpt / "subvp.pt") in r.output
    (tmp_path / "nan.txt").write_text("\n".join([lines[0], "nan", *lines[2:]]) + "\n")
    (tmp_path / "short.txt").write_text("\n".join(lines[:-1]) + "\n")
    (tmp_path / "bad.txt").write_text("# bits/dim\nnot a number\n")
    for other, message in (("seed.txt", "not measured alike"), ("n1.txt", "not measured alike"),
                           ("nan.txt", "not finite"), ("short.txt", "not a file from bpd --out"),
                           ("bad.txt", "not a file from bpd --out"), ("missing.txt", "cannot read it")):
        r = run_evaluate("bpd-diff", tmp_path / "a.txt", tmp_path / other)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (other, r.output)
    (tmp_path / "mine.txt").write_text("my notes\n")
    for out, message in ((tiny_ckpt / "tiny.pt", "an input itself"), (tmp_path / "mine.txt", "is not a file from bpd --out")):
        r = run_evaluate("bpd", "--ckpt", tiny_ckpt / "tiny.pt", *args, "--out", out)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert (tmp_path / "mine.txt").read_text() == "my notes\n"
    import numpy as np
    np.savez(tmp_path / "d.npz", images=np.zeros((20, 28, 28), np.uint8))
    (tmp_path / "folder" / "c").mkdir(parents=True)
    for spec, out in ((tmp_path / "d.npz", tmp_path / "d.npz"), (tmp_path / "folder", tmp_path / "folder" / "x.txt")):
        r = run_evaluate("bpd", "--ckpt", tiny_ckpt / "tiny.pt", *args, "--data", spec, "--out", out)
        assert r.exit_code == 1 and "nothing is written into your data" in r.output, r.output


def test_evaluate_bpd_sweep_guidance_and_speed(tiny_ckpt, tmp_path, few_test_images):
    r = run_evaluate("bpd", "--ckpt", tiny_ckpt / "tiny.pt", "--n", 4, "--batch-size", 2, "--rtol", 1e-2, "--atol", 1e-2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "bits/dim" in r.output and "standard error" in r.output and "NFE" in r.output
    r = run_evaluate("sweep", "--ckpt", tiny_ckpt / "tiny.pt", "--n", 16, "--solvers", "heun,em@5/20,edm:s_churn=5@2/3", "--max-steps", 10,
                     "--out", tmp_path / "sweep", "--device", "cpu")
    assert r.exit_code == 0, r.output
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("| heun |") == 2 and table.count("| em |") == 1 and "floor" in table
    assert "| edm:s_churn=5 | 2 | 3 |" in table and "| edm:s_churn=5 | 3 | 5 |" in table and "w = 0" in table
    from PIL import Image
    assert Image.open(tmp_path / "sweep.png").size == (960, 480)
    r = run_evaluate("fd", "--ckpt", tiny_ckpt / "tiny.pt", "--n", 4, "--solver", "dpmpp_2m_sde:eta=0.5", "--steps", 2,
                     "--labels", "none", "--device", "cpu")
    assert r.exit_code == 0 and "2 NFE" in r.output and "the dropped label" in r.output, r.output
    r = run_evaluate("guidance", "--ckpt", tiny_ckpt / "tiny.pt", "--n", 2, "--steps", 2, "--weights", "0,1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "class accuracy" in r.output and r.output.count("\n| ") >= 3
    r = run_evaluate("compare", tiny_ckpt / "tiny.pt", tiny_ckpt / "tiny.pt", "--solvers", "heun,em,pc,dpmpp_2m", "--nfe", 6, "--n", 8,
                     "--out", tmp_path / "compare.md", "--device", "cpu")
    assert r.exit_code == 0, r.output
    table = (tmp_path / "compare.md").read_text()
    assert table.count("| em | 6 |") == 2 and table.count("| pc | 6 |") == 2 and table.count("| heun | 35 |") == 2
    assert table.count("| dpmpp_2m | 20 |") == 2
    assert table.count("x |") == 2  # heun / best, one row per checkpoint
    assert run_evaluate("compare", tiny_ckpt / "tiny.pt", "--solvers", "rk4").exit_code == 1
    r = run_evaluate("compare", tiny_ckpt / "subvp.pt", "--solvers", "ancestral", "--nfe", 2, "--n", 2, "--device", "cpu")
    assert r.exit_code == 1 and "not defined for SubVPSDE" in r.output, r.output
    r = run_evaluate("export", tiny_ckpt / "tiny.pt", "--out", tmp_path / "ship.pt", "--n", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    shipped = torch.load(tmp_path / "ship.pt", weights_only=True)
    assert shipped["model"] is None and shipped["optimizer"] is None
    original = torch.load(tiny_ckpt / "tiny.pt", weights_only=True)["ema"]
    assert all(torch.equal(v.half(), shipped["ema"][k]) for k, v in original.items() if v.is_floating_point())
    r = run_evaluate("export", tiny_ckpt / "tiny.pt", "--out", tiny_ckpt / "tiny.pt")
    assert r.exit_code == 1 and "is the checkpoint itself" in r.output
    for model in ("quick", "tutorial"):
        r = run_evaluate("speed", "--model", model, "--batch-size", 4, "--iters", 2, "--device", "cpu")
        assert r.exit_code == 0, r.output
        assert "training" in r.output and "img/s" in r.output


# ---------------------------------------------------------------- faults: bad numbers, hangs, I/O, interrupts

def test_ode_solver_cannot_hang():
    sde = sgm.VPSDE()
    for tol in (1e-30, 0.0, float("nan"), -1.0):  # refused at the edge, before any work
        with pytest.raises(sgm.SGMError, match="rtol"):
            cli.check_solver_options(dict(rtol=tol, atol=1e-5))
    with pytest.raises(sgm.SGMError, match="non-finite"):  # exploded weights: NaN scores
        sgm.sample(lambda x, t: x * float("nan"), sde, (4, 4), "ode")
    with pytest.raises(sgm.SGMError, match="did not reach t = 1 in 20 steps"):  # a bounded number of steps
        sgm.solve_ode(lambda t, y: -1e4 * y, torch.ones(3), 0.0, 1.0, max_steps=20)


def test_non_finite_samples_are_refused():
    sde = sgm.VPSDE()
    with pytest.raises(sgm.SGMError, match="non-finite"):
        sgm.sample(lambda x, t: x * float("inf"), sde, (4, 4), "em", 5)


@pytest.mark.parametrize("script, args, message", [
    ("sample", ["--guidance", "nan", "--label", "bag"], "--guidance must be a finite number"),
    ("sample", ["--guidance", "inf"], "--guidance must be a finite number"),
    ("sample", ["--solver", "pc", "--snr", "nan"], "--snr must be"),
    ("sample", ["--solver", "ald", "--snr", "inf"], "--snr must be"),
    ("sample", ["--eps", "nan"], "--eps must be"),
    ("sample", ["--solver", "ode", "--rtol", "1e-30"], "--rtol must be"),
    ("sample", ["--interpolate", "0", "1", "--atol", "nan"], "--atol must be"),
    ("sample", ["--solver", "ode", "--rtol", "nan"], "--rtol must be"),
    ("sample", ["--solver", "edm", "--s-churn", "nan"], "--s-churn must be"),
    ("sample", ["--solver", "edm", "--churn", "-1"], "--s-churn must be"),
    ("sample", ["--solver", "edm", "--s-noise", "inf"], "--s-noise must be"),
    ("sample", ["--solver", "dpmpp_2m_sde", "--eta", "2"], "--eta must be"),
    ("evaluate", ["fd", "--solver", "edm:s_churn=nan"], "s_churn must be"),
    ("evaluate", ["fd", "--solver", "edm:eta=1"], "edm has no option 'eta'"),
    ("evaluate", ["fd", "--solver", "pc:snr=abc"], "snr takes a number"),
    ("evaluate", ["fd", "--solver", "pc:predictor=heun"], "unknown predictor"),
    ("evaluate", ["sweep", "--solvers", "heun@0"], "must be positive"),
    ("evaluate", ["sweep", "--solvers", "heun@"], "no step counts after @"),
    ("train", ["--ema-decay", "nan"], "--ema-decay must be"),
    ("train", ["--lr", "nan"], "lr must be"),
    ("train", ["--time-limit", "nan"], "--time-limit must be"),
    ("evaluate", ["fd", "--rtol", "-1"], "--rtol must be"),
    ("evaluate", ["fd", "--atol", "nan"], "--atol must be"),
    ("evaluate", ["bpd", "--rtol", "0", "--atol", "0"], "--rtol must be"),
    ("evaluate", ["guidance", "--weights", "abc"], "give numbers separated by commas"),
    ("evaluate", ["guidance", "--weights", "1,nan"], "guidance weight must be"),
])
def test_bad_numbers_get_one_line(tiny_ckpt, tmp_path, script, args, message):
    import importlib
    module = importlib.import_module(script)
    extra = {"sample": ["--ckpt", str(tiny_ckpt / "tiny.pt"), "--out", str(tmp_path / "o.png"), "--device", "cpu"],
             "train": ["--out", str(tmp_path / "run"), "--device", "cpu"],
             "evaluate": ["--ckpt", str(tiny_ckpt / "tiny.pt"), "--device", "cpu"]}[script]
    r = invoke(module.main, [*args, *extra])
    assert r.exit_code in (1, 2) and message in r.output and not isinstance(r.exception, (ValueError, TypeError)), r.output
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "run" / "ckpt.pt").exists()


def test_damaged_checkpoints_get_one_line(tiny_ckpt, tmp_path):
    good = torch.load(tiny_ckpt / "tiny.pt", weights_only=True)
    cases = {"ema_list.pt": dict(ema=[1, 2]), "range_text.pt": dict(data_range="abc"),
             "no_channels.pt": dict(config={**good["config"], "channels": 0}),
             "bad_sde.pt": dict(sde={"name": "ve", "sigma_min": 0.01, "sigma_max": -5.0})}
    for name, change in cases.items():
        torch.save({**good, **change}, tmp_path / name)
        with pytest.raises(checkpoint.CheckpointError, match="damaged sgm checkpoint") as e:
            checkpoint.load(str(tmp_path / name))
        assert name in str(e.value)
        r = run_sample("--ckpt", tmp_path / name, "--out", tmp_path / "x.png")
        assert r.exit_code == 1 and "damaged" in r.output and "Traceback" not in r.output
    with pytest.raises(checkpoint.CheckpointError, match="sigma_max must be"):
        checkpoint.load(str(tmp_path / "bad_sde.pt"))


def test_io_failures_keep_files_and_give_one_line(tiny_ckpt, tmp_path, monkeypatch, cheap_grids):
    from PIL import Image

    import train
    out = tmp_path / "run"
    args = [*TRAIN_TINY, "--steps", "2", "--log-every", "1", "--sample-every", "1000", "--out", str(out)]
    assert invoke(train.main, args).exit_code == 0
    before = (out / "ckpt.pt").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    r = invoke(train.main, [*args, "--steps", "4", "--resume"])
    assert r.exit_code == 1 and "No space left on device" in r.output, r.output
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))
    monkeypatch.setattr(Image.Image, "save", disk_full)
    (tmp_path / "old.png").write_bytes(b"an earlier grid")
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "heun", "--steps", 2, "--n", 2, "--out", tmp_path / "old.png")
    assert r.exit_code == 1 and "No space left" in r.output and (tmp_path / "old.png").read_bytes() == b"an earlier grid"
    monkeypatch.undo()
    r = run_evaluate("export", tiny_ckpt / "tiny.pt", "--out", tmp_path, "--n", 0)
    assert r.exit_code in (1, 2) and "Traceback" not in r.output
    r = run_evaluate("export", tiny_ckpt / "tiny.pt", "--out", tmp_path / "old.png", "--n", 0)
    assert r.exit_code == 1 and "exists; give --overwrite" in r.output
    assert run_evaluate("export", tiny_ckpt / "tiny.pt", "--out", tmp_path / "old.png", "--n", 0, "--overwrite").exit_code == 0
    # Output paths and checkpoints are checked before any sampling.
    for args in (["compare", tiny_ckpt / "tiny.pt", "--out", "/proc/no/x.md"], ["compare", tiny_ckpt / "tiny.pt", tmp_path / "missing.pt"],
                 ["sweep", "--ckpt", tiny_ckpt / "tiny.pt", "--out", "/proc/no/sweep"], ["fd", "--ckpt", tmp_path / "missing.pt"]):
        r = run_evaluate(*args, "--n", 4, "--device", "cpu")
        assert r.exit_code == 1 and "FD" not in r.output and "Traceback" not in r.output, (args, r.output)


def test_sample_cli_interrupt_and_output_folders(tiny_ckpt, tmp_path, monkeypatch):
    import sample
    target = tmp_path / "new" / "deeper" / "x.png"
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--label", "banana", "--out", target)
    assert r.exit_code == 1 and not (tmp_path / "new").exists()  # nothing created by a failed run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sgm, "sample", interrupted)
    r = invoke(sample.main, ["--device", "cpu", "--ckpt", tiny_ckpt / "tiny.pt", "--out", target], expect_interrupt=True)
    assert r.exit_code == 130 and "nothing written" in r.output and not (tmp_path / "new").exists()
    monkeypatch.undo()
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "heun", "--steps", 2, "--n", 3, "--batch-size", 2, "--out", target)
    assert r.exit_code == 0 and target.exists() and "2 of 3 images" in r.output  # a plain line per chunk when not a TTY
    data_default = next(p.default for p in sample.main.params if p.name == "data_root")
    assert data_default == data.DATA_DIR and os.path.isabs(data_default)  # not the current directory


def test_an_interrupted_command_stops_the_tests():
    """invoke() raises KeyboardInterrupt for a command that Ctrl-C or SIGTERM stopped: exit code 130 or 143 (the
    scripts' own handlers), or a KeyboardInterrupt that click turned into "Aborted!" and exit code 1."""
    import click

    @click.command()
    @click.argument("how")
    def command(how):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        sys.exit(int(how))

    for how, code in [("ctrl-c", 1), ("130", 130), ("143", 143)]:
        with pytest.raises(KeyboardInterrupt):
            invoke(command, [how])
        r = invoke(command, [how], expect_interrupt=True)
        assert r.exit_code == code and was_interrupted(r), how
    assert invoke(command, ["1"]).exit_code == 1 and invoke(command, ["0"]).exit_code == 0
    source = open(os.path.join(HERE, "test_sgm.py")).read()
    assert source.count("CliRunner" + "()") == 1, "run commands with invoke(), so that Ctrl-C stops the tests"


CTRL_C_TESTS = """
import os
import time

import data
import sample
import sgm
import train
from test_sgm import HANG, TRAIN_TINY, invoke, restore_signal_handlers  # noqa: F401 (the autouse fixture)

MARK = os.environ["SGM_CTRL_C_MARK"]


def inside(*args, **kwargs):  # the command runs: the signal may come now
    open(MARK, "a").close()


def test_train_loop(tmp_path, monkeypatch):
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda run, i: (inside(), step(run, i))[1])
    invoke(train.main, [*TRAIN_TINY, "--steps", 100000, "--sample-every", 100000, "--out", tmp_path / "run"])


def test_train_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: (inside(), time.sleep(HANG)))
    invoke(train.main, [*TRAIN_TINY, "--steps", 2, "--out", tmp_path / "run"])


def test_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(sgm, "sample", lambda *a, **k: (inside(), time.sleep(HANG)))
    invoke(sample.main, ["--device", "cpu", "--out", tmp_path / "x.png"])


def test_after():
    open(MARK + ".after", "w").close()
"""


@pytest.mark.slow  # a pytest process per case
@pytest.mark.parametrize("case, sig", [("train_loop", signal.SIGINT), ("train_loop", signal.SIGTERM), ("train_setup", signal.SIGINT),
                                       ("sample", signal.SIGINT)], ids=["train-loop-SIGINT", "train-loop-SIGTERM", "train-setup-SIGINT", "sample-SIGINT"])
def test_ctrl_c_inside_a_command_stops_pytest(tmp_path, case, sig):
    """The real thing: pytest, sent SIGINT (or SIGTERM) while a test runs a script's command in its process (in
    train.py's loop, whose handler saves and exits 130 or 143; before it, where click says "Aborted!"; in sample.py,
    which exits 130), ends with its KeyboardInterrupt report and exit code 2, not a failed test and the next one."""
    import re
    (tmp_path / "test_ctrl_c.py").write_text(CTRL_C_TESTS)
    mark = tmp_path / "inside"
    tests = [f"{tmp_path / 'test_ctrl_c.py'}::test_{case}", f"{tmp_path / 'test_ctrl_c.py'}::test_after"]
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.path.join(HERE, "pyproject.toml"),
                                *tests], cwd=HERE, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "SGM_CTRL_C_MARK": str(mark)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ignored here
    try:
        deadline = time.time() + HANG
        while not mark.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if mark.exists():  # written from inside the command, which then runs on for minutes
            process.send_signal(sig)
        output = process.communicate(timeout=HANG)[0]
    finally:
        process.kill()
        process.wait()
    assert mark.exists(), output
    assert process.returncode == pytest.ExitCode.INTERRUPTED and "!!! KeyboardInterrupt" in output, output
    assert not re.search(r"\d+ (failed|passed)", output) and not (tmp_path / "inside.after").exists(), output


def test_truncated_dataset_files_are_named(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.FILES:
        (raw / name).write_bytes(b"\x00\x00\x08")  # cut short
    with pytest.raises(data.DataError, match="cannot be read"):
        data.load(str(tmp_path), train=False)
    gz = tmp_path / "gz"
    gz.mkdir()
    for name in data.FILES:
        (gz / f"{name}.gz").write_bytes(open(os.path.join(data.DEBIAN_DIR, f"{name}.gz"), "rb").read()[:2000])  # cut short
    with pytest.raises(data.DataError, match="cannot be decompressed"):
        data.load(str(gz), train=False)


# ---------------------------------------------------------------- faults: others' files, full disks, diverged and crafted weights, logs

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny resumable train.py run, at step 4 of 4 (log rows at 2 and 4), for tests to copy and damage."""
    import train
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "GRID_STEPS", 2)  # a cheap grid at the end
        r = invoke(train.main, [*TRAIN_TINY, "--steps", "4", "--log-every", "2", "--sample-every", "1000", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def copy_run(tiny_run, tmp_path):
    import shutil
    return shutil.copytree(tiny_run, tmp_path / "run")


def test_a_new_run_removes_no_file_it_did_not_write(tiny_run, tmp_path, monkeypatch):
    import shutil

    import train
    monkeypatch.setattr(train, "GRID_STEPS", 2)
    out = tmp_path / "work"
    out.mkdir()
    mine = {"draft.tmp": b"a draft", "samples_final.png": b"my figure", "log.jsonl": b'{"my": "notes"}\n'}
    for name, content in mine.items():
        (out / name).write_bytes(content)
    args = [*TRAIN_TINY, "--steps", "1", "--sample-every", "1000", "--out", str(out)]
    for extra in ([], ["--overwrite"]):  # a file with a run's name, but no run to show it is one
        r = invoke(train.main, [*args, *extra])
        assert r.exit_code == 1 and "holds log.jsonl" in r.output and "nothing there is replaced" in r.output, r.output
    (out / "ckpt.pt").write_bytes(b"another program's checkpoint")
    r = invoke(train.main, [*args, "--overwrite"])
    assert r.exit_code == 1 and "ckpt.pt (not sgm checkpoints)" in r.output, r.output
    assert all((out / name).read_bytes() == content for name, content in mine.items())
    del mine["log.jsonl"]
    for name in ("ckpt.pt", "log.jsonl", "samples_0000004.png"):  # a run beside the user's files
        shutil.copy(tiny_run / name, out / name)
    assert invoke(train.main, [*args, "--overwrite"]).exit_code == 0  # the run's files replaced, only they
    assert all((out / name).read_bytes() == content for name, content in mine.items())
    assert sorted(os.listdir(out)) == ["ckpt.pt", "draft.tmp", "log.jsonl", "samples_0000001.png", "samples_final.png"]


def test_a_full_disk_in_torch_save_is_one_line(tiny_run, tmp_path, monkeypatch):
    """torch's writer reports a full disk as RuntimeError("... unexpected pos ..."), not as an OSError."""
    import train
    out = copy_run(tiny_run, tmp_path)
    before = (out / "ckpt.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as partial:
            partial.write(b"PK part of a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 986")

    monkeypatch.setattr(torch, "save", disk_full)
    r = invoke(train.main, ["--device", "cpu", "--out", str(out), "--resume", "--steps", "5"])
    assert r.exit_code == 1 and f"{out / 'ckpt.pt'}: cannot be written" in r.output and "unexpected pos" in r.output, r.output
    assert (out / "ckpt.pt").read_bytes() == before and not [name for name in os.listdir(out) if "tmp" in name]
    (tmp_path / "ship.pt").write_bytes(b"an earlier export")
    r = run_evaluate("export", out / "ckpt.pt", "--out", tmp_path / "ship.pt", "--overwrite", "--n", 0)
    assert r.exit_code == 1 and "ship.pt: cannot be written" in r.output and isinstance(r.exception, SystemExit), r.output
    assert (tmp_path / "ship.pt").read_bytes() == b"an earlier export" and sorted(os.listdir(tmp_path)) == ["run", "ship.pt"]


def test_no_file_keeps_diverged_weights(tiny_ckpt, tmp_path):
    """Snapshots and exports pass the check that ckpt.pt passes (checkpoint.save's), and load applies it too."""
    import train
    out = tmp_path / "run"
    args = [*TRAIN_TINY, "--lr", "1000", "--ema-decay", "0", "--warmup", "0", "--grad-clip", "1e6", "--snapshot-minutes",
            "0.001,0.05", "--steps", "40", "--log-every", "1000", "--ckpt-every", "1000", "--sample-every", "1000", "--out", str(out)]
    r = invoke(train.main, args)
    assert r.exit_code == 1 and "weights diverged" in r.output and "stopped without saving" in r.output, r.output
    assert not list(out.glob("*.pt"))
    ckpt = checkpoint.load(tiny_ckpt / "tiny.pt")
    with torch.no_grad():
        ckpt.net.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(checkpoint.DivergedError, match="nan"):
        checkpoint.save(tmp_path / "nan.pt", ckpt)
    assert not (tmp_path / "nan.pt").exists()
    state = torch.load(tiny_ckpt / "tiny.pt", weights_only=True)
    state["ema"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "nan.pt")  # as an older version could write it
    r = run_evaluate("export", tmp_path / "nan.pt", "--out", tmp_path / "ship.pt", "--n", 0)
    assert r.exit_code == 1 and "diverged" in r.output and not (tmp_path / "ship.pt").exists(), r.output


def test_output_names_are_checked_before_sampling(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sgm, "sample", lambda *a, **k: pytest.fail("sampled before --out was checked"))
    for target in (tmp_path / "new" / "sub" / ("a" * 300 + ".png"), tmp_path / ("a" * 300 + ".gif")):
        r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--out", target)
        assert r.exit_code == 1 and f"{target}: cannot write there (File name too long)" in r.output, r.output
    assert os.listdir(tmp_path) == []  # no folder made


def test_crafted_checkpoints_are_refused_in_one_line(tiny_run, tmp_path):
    import shutil

    import train
    good = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    extra, adam = good["extra"], good["optimizer"]
    first = min(adam["state"])
    cases = {
        "exp_avg": dict(optimizer={**adam, "state": {**adam["state"], first: {**adam["state"][first], "exp_avg": torch.zeros(3)}}}),
        "batch_size": dict(extra={**extra, "train": {**extra["train"], "batch_size": 0}}),
        "log_every": dict(extra={**extra, "train": {**extra["train"], "log_every": 0}}),
        "seed": dict(extra={**extra, "train": {**extra["train"], "seed": "a"}}),
        "counts_text": dict(extra={**extra, "class_counts": ["a"] * 10}),
        "counts_zero": dict(extra={**extra, "class_counts": [0] * 10}),
        "counts_three": dict(extra={**extra, "class_counts": [1, 1, 1]}),
        "ema_missing": dict(ema=dict(list(good["ema"].items())[1:])),
        "ema_scalars": dict(ema={k: torch.tensor(0.5) for k in good["ema"]}),
        "data_range": dict(data_range=(0.0, 1e300)),
    }
    for name, change in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({**good, **change}, path)
        with pytest.raises(checkpoint.CheckpointError, match="damaged") as e:
            checkpoint.load(str(path), use_ema=False)  # raw weights in the net, the EMA's checked beside them
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
    run = tmp_path / "run"
    run.mkdir()
    for name in ("exp_avg", "batch_size", "log_every", "seed"):
        shutil.copy(tmp_path / f"{name}.pt", run / "ckpt.pt")
        r = invoke(train.main, ["--device", "cpu", "--out", str(run), "--resume", "--steps", "6"])
        assert r.exit_code == 1 and "damaged" in r.output and isinstance(r.exception, SystemExit), (name, r.output)
    r = run_sample("--ckpt", tmp_path / "counts_text.pt", "--out", tmp_path / "x.png")
    assert r.exit_code == 1 and "class_counts" in r.output and isinstance(r.exception, SystemExit), r.output


def test_resume_to_epochs_already_reached_has_nothing_to_do(tiny_run, tmp_path):
    import train
    out = copy_run(tiny_run, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    r = invoke(train.main, ["--device", "cpu", "--out", str(out), "--resume", "--epochs", "0.1"])  # 2 steps
    assert r.exit_code == 1 and "nothing to do" in r.output and "at step 4" in r.output, r.output
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_resumed_log_has_the_rows_of_the_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped in mid-interval, the run saves the interval; --resume completes it, so no row is added or cut short."""
    import signal

    import train
    monkeypatch.setattr(train, "GRID_STEPS", 2)
    common = [*TRAIN_TINY, "--steps", "9", "--log-every", "4", "--ckpt-every", "3", "--sample-every", "1000"]
    assert invoke(train.main, [*common, "--out", str(tmp_path / "full")]).exit_code == 0
    real_step = train.train_step

    def step_then_signal(run, step):
        loss = real_step(run, step)
        if step == 4:  # the signal arrives during step 5
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train, "train_step", step_then_signal)
    assert invoke(train.main, [*common, "--out", str(tmp_path / "stopped")], expect_interrupt=True).exit_code == 130
    monkeypatch.setattr(train, "train_step", real_step)
    assert invoke(train.main, ["--device", "cpu", "--out", str(tmp_path / "stopped"), "--resume"]).exit_code == 0
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "stopped")
    assert [row["step"] for row in resumed] == [row["step"] for row in full] == [4, 8, 9]
    assert [row["lr"] for row in resumed] == [row["lr"] for row in full]
    assert [row["loss"] for row in resumed] == pytest.approx([row["loss"] for row in full], rel=1e-6)


def test_temporary_files_are_recognisably_the_projects(tmp_path):
    """Named .sgm-tmp-<pid>-*.tmp; a later write to the folder removes those a killed write left, and nothing else."""
    names = []

    def write(tmp):
        names.append(os.path.basename(tmp))
        open(tmp, "w").write("x")

    files.atomic_write(str(tmp_path / "a.md"), write)
    assert names[0].startswith(f".sgm-tmp-{os.getpid()}-") and names[0].endswith(".tmp")
    stale = stale_temp(tmp_path)  # a finished process's, an hour old
    fresh = stale_temp(tmp_path)
    os.utime(fresh)  # a finished process's, but just written: maybe a writer's on another machine
    live = stale_temp(tmp_path, os.getpid())  # a running writer's
    others = [tmp_path / name for name in ("draft.tmp", "tmpabc.gif.tmp", ".sgm-tmp-notes.txt")]
    for path in others:
        path.write_bytes(b"the user's")
        os.utime(path, (time.time() - 3600,) * 2)
    files.save_text("y", str(tmp_path / "b.md"))
    assert not stale.exists() and fresh.exists() and live.exists() and all(path.exists() for path in others)
    target = tmp_path / "new" / "sub" / "c.png"  # a failed write leaves no temporary file or folder, and names its path

    def disk_full(tmp):
        open(tmp, "w").write("part")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as e:
        files.atomic_write(str(target), disk_full)
    assert e.value.filename == str(target) and not (tmp_path / "new").exists()


def test_evaluate_refuses_bad_arms_and_files_before_any_work(tiny_ckpt, tiny_run, tmp_path, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "Scorer", lambda *a: pytest.fail("work started before the input was checked"))
    subvp, out = str(tiny_ckpt / "subvp.pt"), ["--out", str(tmp_path / "table")]
    for args, message in [(["sweep", "--solvers", "heun,ode@nan", *out], "rtol must be"),
                          (["sweep", "--solvers", "ode@1e-3/2", *out], "rtol must be"),
                          (["sweep", "--ckpt", subvp, "--solvers", "heun,pc:predictor=ancestral", *out], "not defined for SubVPSDE"),
                          (["fd", "--ckpt", subvp, "--solver", "ancestral"], "not defined for SubVPSDE"),
                          (["compare", subvp, "--solvers", "heun,ancestral"], "not defined for SubVPSDE"),
                          (["guidance", "--ckpt", subvp, "--solver", "ancestral"], "not defined for SubVPSDE")]:
        if "--ckpt" not in args and args[0] != "compare":
            args = [*args, "--ckpt", str(tiny_ckpt / "tiny.pt")]
        r = run_evaluate(*args, "--n", 4, "--device", "cpu")
        assert r.exit_code == 1 and message in r.output and isinstance(r.exception, SystemExit), (args, r.output)
    run = copy_run(tiny_run, tmp_path)
    (run / "snapshot_0.5min.pt").write_bytes(b"cut sho")
    r = run_evaluate("runs", run, "--n", 4, *out, "--device", "cpu")
    assert r.exit_code == 1 and "snapshot_0.5min.pt: not a readable checkpoint" in r.output, r.output


# ---------------------------------------------------------------- faults, fourth round

def test_no_command_writes_over_its_own_input(tiny_ckpt, tiny_run, tmp_path, monkeypatch):
    """An output that is an input, or a link to one, is refused before any work; the input is untouched."""
    import shutil

    import evaluate
    monkeypatch.setattr(evaluate, "Scorer", lambda *a: pytest.fail("work started before --out was checked"))
    model = shutil.copy(tiny_ckpt / "tiny.pt", tmp_path / "m.pt")
    run = copy_run(tiny_run, tmp_path)
    os.symlink(run / "ckpt.pt", tmp_path / "link.pt")
    os.symlink(model, tmp_path / "link.md")
    os.symlink(model, tmp_path / "link.png")
    os.symlink(run / "log.jsonl", tmp_path / "log.md")
    before = {path: open(path, "rb").read() for path in (model, run / "ckpt.pt", run / "log.jsonl")}
    for args in [("compare", model, "--out", model), ("guidance", "--ckpt", model, "--out", model),
                 ("compare", model, "--out", tmp_path / "link.md"), ("export", run / "ckpt.pt", "--out", tmp_path / "link.pt", "--overwrite"),
                 ("export", tmp_path / "link.pt", "--out", run / "ckpt.pt", "--overwrite"), ("sweep", "--ckpt", model, "--out", tmp_path / "link"),
                 ("runs", run, "--out", tmp_path / "log")]:
        r = run_evaluate(*args, "--n", 4, "--device", "cpu")
        assert r.exit_code == 1 and "itself" in r.output and isinstance(r.exception, SystemExit), (args, r.output)
    monkeypatch.setattr(sgm, "sample", lambda *a, **k: pytest.fail("sampled before --out was checked"))
    r = run_sample("--ckpt", model, "--out", tmp_path / "link.png")
    assert r.exit_code == 1 and "is the checkpoint itself" in r.output, r.output
    assert all(open(path, "rb").read() == content for path, content in before.items())


def test_a_run_file_name_that_is_no_plain_file_stops_the_run_before_anything_is_removed(tiny_run, tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(data, "training_data", lambda *a: pytest.fail("data loaded before the run folder was checked"))
    out = copy_run(tiny_run, tmp_path)
    (out / "samples_0000009.png").mkdir()
    before = sorted(os.listdir(out))
    for extra in (["--overwrite"], ["--resume", "--steps", "6"]):
        r = invoke(train.main, [*TRAIN_TINY, "--steps", "2", "--out", str(out), *extra] if "--overwrite" in extra
                   else ["--device", "cpu", "--out", str(out), *extra])
        assert r.exit_code == 1 and "samples_0000009.png, not a plain file" in r.output, r.output
        assert sorted(os.listdir(out)) == before


def test_crafted_optimizer_values_and_rng_states_are_refused_before_resuming(tiny_run, tmp_path, monkeypatch):
    """Optimizer moments and steps that are NaN or negative, and RNG states of the wrong kind, are damage: one line
    naming the resume state, before the data is loaded (not "loss became nan" after training on them)."""
    import shutil

    import train
    good = torch.load(tiny_run / "ckpt.pt", weights_only=True)
    adam, first = good["optimizer"], min(good["optimizer"]["state"])

    def moment(name, value):
        state = {**adam["state"][first], name: torch.full_like(adam["state"][first][name], value)}
        return dict(optimizer={**adam, "state": {**adam["state"], first: state}})

    cases = {"exp_avg_nan": moment("exp_avg", float("nan")), "exp_avg_sq_negative": moment("exp_avg_sq", -1.0),
             "step_nan": moment("step", float("nan")), "step_negative": moment("step", -3.0),
             "rng_size": dict(rng={"cpu": torch.zeros(7, dtype=torch.uint8)}), "rng_no_cpu": dict(rng={"cuda": None}),
             "rng_text": dict(rng={"cpu": "state"}), "rng_float": dict(rng={"cpu": torch.zeros(5056)}),
             "rng_cuda_size": dict(rng={**good["rng"], "cuda": torch.zeros(3, dtype=torch.uint8)})}
    monkeypatch.setattr(data, "training_data", lambda *a: pytest.fail("data loaded before the checkpoint was checked"))
    for name, change in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({**good, **change}, path)
        with pytest.raises(checkpoint.CheckpointError, match="damaged resume state") as e:
            checkpoint.load(str(path), use_ema=False)
        assert "\n" not in str(e.value), name
        run = tmp_path / name
        run.mkdir()
        shutil.copy(path, run / "ckpt.pt")
        r = invoke(train.main, ["--device", "cpu", "--out", str(run), "--resume", "--steps", "6"])
        assert r.exit_code == 1 and "damaged resume state" in r.output and isinstance(r.exception, SystemExit), (name, r.output)


def test_a_crafted_network_size_is_refused_before_the_network_is_built(tiny_ckpt, tmp_path, monkeypatch):
    """A small file whose config asks for a huge network costs no memory: the parameter count and the stored
    weights' shapes are checked on a plan of the network (the meta device) before it is built."""
    good = torch.load(tiny_ckpt / "tiny.pt", weights_only=True)
    real_unet = sgm.UNet

    def planned_only(config):
        assert torch.empty(()).device.type == "meta", "a network was built before its size was checked"
        return real_unet(config)

    monkeypatch.setattr(sgm, "UNet", planned_only)
    for config, message in [(dict(channels=256, num_res_blocks=8), "names differ"), (dict(channels=256), "has shape"), (dict(channels=1024, channel_mult=[8]), "M parameters")]:
        path = tmp_path / "crafted.pt"
        torch.save({**good, "config": {**good["config"], **config}}, path)
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load(str(path))
    monkeypatch.setattr(sgm, "UNet", real_unet)
    assert checkpoint.load(str(tiny_ckpt / "tiny.pt")).step == 0  # a fitting file loads as before


@pytest.mark.parametrize("env, message", [({"RANK": "1"}, "RANK=1 is set but not WORLD_SIZE"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 in the environment"),
                                          ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment: not a whole number"),
                                          ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"),
                                          ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 in the environment"),
                                          ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "SGM_DIST_TIMEOUT": "nan"}, "SGM_DIST_TIMEOUT")])
def test_a_bad_distributed_environment_is_one_line(tmp_path, monkeypatch, env, message):
    import train
    monkeypatch.setattr(data, "training_data", lambda *a: pytest.fail("data loaded before the environment was checked"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SGM_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    r = invoke(train.main, [*TRAIN_TINY, "--steps", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and message in r.output and isinstance(r.exception, SystemExit), r.output
    assert not (tmp_path / "run").exists()


def test_waiting_for_other_processes_says_so_and_times_out(tmp_path):
    """A peer that never comes: what is awaited is printed, and SGM_DIST_TIMEOUT ends the wait with one line."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SGM_DIST_TIMEOUT": "2"}
    r = run_cli("train.py", *TRAIN_TINY, "--steps", "2", "--out", str(tmp_path / "run"), env=env)
    assert f"process 0 of 2: waiting for the others at 127.0.0.1:{port} (up to 2 s" in r.stderr, r.stderr
    assert r.returncode == 1 and "could not join the others" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_sweep_with_nothing_to_do_or_tolerances_twice_is_refused_before_work(tiny_ckpt, tmp_path, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "Scorer", lambda *a: pytest.fail("work started before the arms were checked"))
    for solvers, message in [("heun@2000", "every step count in --solvers is above --max-steps 1000"),
                             ("em@5/2000", "above --max-steps 4"), ("ode:rtol=1e-3", "give them after @"),
                             ("heun,ode:atol=1e-3@1e-2", "give them after @")]:
        args = ["--max-steps", 4] if "em" in solvers else []
        r = run_evaluate("sweep", "--ckpt", tiny_ckpt / "tiny.pt", "--solvers", solvers, *args, "--n", 4, "--out", tmp_path / "sweep", "--device", "cpu")
        assert r.exit_code == 1 and message in r.output and "wrote" not in r.output, (solvers, r.output)
    assert os.listdir(tmp_path) == []


def test_a_log_with_bytes_that_are_not_utf8_is_read_past(tiny_run, tmp_path, cheap_grids):
    import evaluate
    import train
    out = copy_run(tiny_run, tmp_path)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 1.0, "img_per_s": 5\xff}\n\xfe\n')
    assert evaluate.run_points(str(out))[1] == pytest.approx(sorted(row["img_per_s"] for row in read_log(tiny_run))[1])
    r = invoke(train.main, ["--device", "cpu", "--out", str(out), "--resume", "--steps", "6"])
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in read_log(out)] == [2, 4, 6]


def test_a_fifo_named_log_jsonl_is_refused_not_waited_on(tiny_run, tmp_path):
    """Only regular files are opened: a FIFO would block the reader for ever. (A writer opens it after 30 s, should
    a reader wait on it, so that this test fails instead of hanging.)"""
    import threading

    import evaluate
    import train
    out = copy_run(tiny_run, tmp_path)
    os.remove(out / "log.jsonl")
    os.mkfifo(out / "log.jsonl")
    done = threading.Event()

    def unblock():
        done.wait(30)
        with contextlib.suppress(OSError):
            os.close(os.open(out / "log.jsonl", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        r = invoke(train.main, ["--device", "cpu", "--out", str(out), "--resume", "--steps", "6"])
        assert r.exit_code == 1 and "log.jsonl, not a plain file" in r.output, r.output
        with pytest.raises(click.ClickException, match="log.jsonl: not a plain file"):
            evaluate.run_points(str(out))
    finally:
        done.set()


def test_ctrl_c_in_evaluate_names_the_files_it_kept(tiny_ckpt, tiny_run, tmp_path, monkeypatch):
    import evaluate

    class Scorer:
        def __init__(self, *args):
            pass

        def fd(self, images, label=None):
            return 1.0, torch.zeros(10)

        def floor(self, *args, **kwargs):
            return 1.0

    calls = []

    def generate(ckpt, solver, steps, n, *args, **kwargs):  # the second batch of samples is interrupted
        calls.append(solver)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return torch.zeros(n, 1, 28, 28, dtype=torch.uint8), 2.0, 0.1

    monkeypatch.setattr(evaluate, "Scorer", Scorer)
    monkeypatch.setattr(evaluate, "generate", generate)
    for args, kept in [(["sweep", "--ckpt", tiny_ckpt / "tiny.pt", "--solvers", "heun@2/3", "--out", tmp_path / "sweep"], [tmp_path / "sweep.md", tmp_path / "sweep.png"]),
                       (["export", tiny_ckpt / "tiny.pt", "--out", tmp_path / "ship.pt"], [tmp_path / "ship.pt"]),
                       (["runs", tiny_run, "--seeds", "0,1", "--out", tmp_path / "runs2"], [])]:
        calls.clear()
        r = invoke(evaluate.main, [*map(str, args), "--n", "4", "--device", "cpu"], expect_interrupt=True)
        line = "interrupted; " + (f"kept {', '.join(map(str, kept))} as last written" if kept else "nothing written")
        assert r.exit_code == 130 and line in r.output and all(path.exists() for path in kept), (args, r.output)
    calls.clear()
    r = invoke(evaluate.main, ["runs", str(tiny_run), str(tiny_run), "--out", str(tmp_path / "runs3"), "--n", "4", "--device", "cpu"],
               expect_interrupt=True)  # the first run's row was written
    assert r.exit_code == 130 and f"kept {tmp_path / 'runs3.md'} as last written" in r.output, r.output


def test_numbers_beyond_the_machine_are_refused_by_their_options(tiny_ckpt, tiny_run, tmp_path, monkeypatch):
    """Seeds beyond torch's 64 bits, and counts of images, steps and batch sizes that no machine holds, get click's
    one-line range error (exit 2) before any work."""
    import evaluate
    import sample
    monkeypatch.setattr(sgm, "sample", lambda *a, **k: pytest.fail("sampled before the numbers were checked"))
    monkeypatch.setattr(evaluate, "Scorer", lambda *a: pytest.fail("work started before the numbers were checked"))
    big = str(10**23)
    ckpt = ["--ckpt", str(tiny_ckpt / "tiny.pt"), "--device", "cpu"]
    for command, args in [(sample.main, ["--seed", big]), (sample.main, ["--n", str(10**13)]), (sample.main, ["--steps", str(10**15)]),
                          (sample.main, ["--batch-size", str(10**11)]), (evaluate.main, ["fd", "--seed", big]),
                          (evaluate.main, ["fd", "--steps", str(10**15)]), (evaluate.main, ["fd", "--n", str(10**13)]),
                          (evaluate.main, ["guidance", "--seed", str(-(2**63) - 1)]), (evaluate.main, ["bpd", "--batch-size", str(10**11)])]:
        r = invoke(command, [*args, *ckpt, *(["--out", str(tmp_path / "o.png")] if command is sample.main else [])])
        assert r.exit_code == 2 and "is not in the range" in r.output, (args, r.output)
    for args in (["speed", "--batch-size", str(10**11)], ["speed", "--channels", str(10**6)], ["compare", str(tiny_ckpt / "tiny.pt"), "--nfe", str(10**15)],
                 ["export", str(tiny_ckpt / "tiny.pt"), "--out", str(tmp_path / "e.pt"), "--n", str(10**13)]):
        r = invoke(evaluate.main, args)
        assert r.exit_code == 2 and "is not in the range" in r.output, (args, r.output)
    r = invoke(evaluate.main, ["runs", str(tiny_run), "--seeds", f"0,{big}", "--out", str(tmp_path / "t")])
    assert r.exit_code == 1 and "--seeds value must be a whole number" in r.output, r.output
    assert os.listdir(tmp_path) == []


def test_a_closed_console_pipe_costs_no_result(tiny_ckpt, tmp_path):
    """`python sample.py ... 2>&1 | head -1`: the console's pipe closes after a line; the samples are written all
    the same and the exit code is 0."""
    out = tmp_path / "s.png"
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(tiny_ckpt / "tiny.pt"), "--device", "cpu", "--n", "4",
                             "--solver", "heun", "--steps", "2", "--out", str(out)], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stderr.close()  # as `head` does once it has its line
    assert proc.wait(timeout=HANG) == 0 and out.exists()


def test_time_left_follows_the_speed_shown(tmp_path, monkeypatch, cheap_grids):
    """The time left is the steps left at the pace of the last log interval, as its img/s: a slowdown shows in both."""
    import train
    fake_clock(monkeypatch, lambda step: 0.01 if step < 5 else 6.0)
    r = invoke(train.main, [*TRAIN_TINY, "--steps", "20", "--log-every", "5", "--sample-every", "1000", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "step 10/20 loss" in r.output and "3 img/s, 1.0 min left" in r.output, r.output  # 10 steps of 6 s; 80 images in 30 s


def test_the_default_preset_on_a_cpu_says_what_it_costs_before_it_starts():
    import io
    import types

    from rich.console import Console

    import train
    log = Console(file=io.StringIO(), width=300)
    for preset, device, noted in (("default", "cpu", True), ("quick", "cpu", False), ("default", "cuda", False)):
        cfg = checkpoint.TrainConfig(**{**checkpoint.PRESETS[preset], "preset": preset, "amp": False})
        ckpt = types.SimpleNamespace(net=torch.nn.Linear(1000, 6190 if preset == "default" else 170), sde=sgm.SubVPSDE(), step=0)
        run = types.SimpleNamespace(ckpt=ckpt, cfg=cfg, device=device, world=1, images=range(60000), out="runs/x")
        log.file.seek(0), log.file.truncate()
        train.announce(run, log)
        text = log.file.getvalue()
        assert ("meant for a GPU" in text and "days" in text and "--preset quick" in text) == noted, (preset, device, text)


def test_sample_notes_an_unused_steps_and_refuses_a_solver_the_sde_lacks_before_work(tiny_ckpt, tmp_path, monkeypatch):
    import sample
    r = run_sample("--ckpt", tiny_ckpt / "tiny.pt", "--solver", "ode", "--steps", 10, "--rtol", 1e-2, "--atol", 1e-2, "--n", 2,
                   "--out", tmp_path / "o.png")
    assert r.exit_code == 0 and "note: ode does not use --steps" in r.output, r.output
    monkeypatch.setattr(sample, "Progress", lambda *a, **k: pytest.fail("sampling started before the solver was checked"))
    r = run_sample("--ckpt", tiny_ckpt / "subvp.pt", "--solver", "ancestral", "--out", tmp_path / "a.png")
    assert r.exit_code == 1 and "not defined for SubVPSDE" in r.output and isinstance(r.exception, SystemExit), r.output


def test_a_stopped_run_gives_the_whole_commands_quoted(tmp_path, monkeypatch, cheap_grids):
    import shlex
    import signal

    import train
    real_step, out = train.train_step, str(tmp_path / "my run")

    def step_then_signal(run, step):
        os.kill(os.getpid(), signal.SIGINT)  # the first step ends, is saved, and the run stops
        return real_step(run, step)

    monkeypatch.setattr(train, "train_step", step_then_signal)
    r = invoke(train.main, [*TRAIN_TINY, "--steps", "3", "--sample-every", "1000", "--out", out], expect_interrupt=True)
    assert r.exit_code == 130, r.output
    assert f"Continue with: python train.py --resume --out {shlex.quote(out)}\n" in r.output, r.output
    assert f"Sample it: python sample.py --ckpt {shlex.quote(out)} --no-ema" in r.output and "'" in shlex.quote(out)


def readme_commands():
    """Every `python SCRIPT.py ...` (and torchrun) line in the README's bash blocks, as (script, args)."""
    import re
    import shlex
    text = open(os.path.join(HERE, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and w[:-3] in ("train", "sample", "evaluate")]
            if scripts:
                commands.append((words[scripts[0]][:-3], words[scripts[0] + 1:]))
    return commands


def test_every_readme_command_parses():
    """The README's commands parse as written: every option exists and every value has the right type."""
    import importlib
    commands = readme_commands()
    assert {script for script, _ in commands} == {"train", "sample", "evaluate"} and len(commands) > 20
    for script, args in commands:
        command = importlib.import_module(script).main
        if isinstance(command, click.Group):  # evaluate.py: the subcommand's options
            command, args = command.commands[args[0]], args[1:]
        command.make_context(script, list(args)).close()


# ---------------------------------------------------------------- your own images: folders, .npz, MNIST, CIFAR-10

TRAIN_DATA = ["--preset", "quick", "--channels", "4", "--batch-size", "4", "--log-every", "1", "--sample-every", "1000", "--device", "cpu"]


def write_images(folder, n, size, mode, seed=0):
    """n random PIL images of `size` (w, h) and `mode` in folder, as PNG."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A folder of RGB(A) PNGs of mixed sizes in two class subfolders, a flat gray folder, an .npz,
    and MNIST and CIFAR-10 files in torchvision's on-disk layout under one data root."""
    import pickle

    import numpy as np
    base = tmp_path_factory.mktemp("own")
    write_images(base / "pets" / "cat", 12, (20, 20), "RGB")
    write_images(base / "pets" / "dog", 10, (24, 16), "RGBA", seed=1)
    (base / "pets" / "notes.txt").write_text("not an image: ignored")
    write_images(base / "pets" / "dog" / ".hidden", 1, (5, 5), "RGB")  # skipped
    write_images(base / "gray", 12, (16, 16), "L")
    rng = np.random.default_rng(0)
    np.savez(base / "set.npz", images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), labels=np.arange(12) % 3, classes=np.array(["a", "b", "c"]))
    root = base / "root"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for prefix, n in (("train", 24), ("t10k", 8)):
        (root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
        (root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n)))
    (root / "cifar-10-batches-py").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 5, 3, 9]}
        (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch))
    return base


def snapshot(folder):
    return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_own_images_train_resume_sample_inpaint_and_bpd(own_data, tmp_path, cheap_grids):
    """A folder of RGB images in class subfolders: trained, resumed exactly, sampled with a class
    name, inpainted, scored for bits/dim; nothing is written into the folder."""
    import evaluate
    import sample
    import train
    pets, root, before = own_data / "pets", tmp_path / "root", snapshot(own_data / "pets")
    args = [*TRAIN_DATA, "--data", pets, "--data-root", root, "--image-size", 16]
    r = invoke(train.main, [*args, "--steps", 4, "--out", tmp_path / "a"])
    assert r.exit_code == 0 and "decoding 22 images" in r.output, r.output
    assert invoke(train.main, [*args, "--steps", 2, "--out", tmp_path / "b"]).exit_code == 0
    r = invoke(train.main, ["--resume", "--steps", 4, "--out", tmp_path / "b", "--data-root", root])
    assert r.exit_code == 0 and "decoding" not in r.output, r.output  # the cache
    a, b = (checkpoint.load(tmp_path / run / "ckpt.pt", use_ema=False) for run in "ab")
    assert all(torch.equal(a.net.state_dict()[k], v) for k, v in b.net.state_dict().items())
    assert a.shape == (3, 16, 16) and a.classes == ("cat", "dog") and a.train_config.data == str(pets)
    assert a.model_config.channel_mult == (1, 2)  # 16 -> 8: two levels
    r = invoke(sample.main, ["--ckpt", tmp_path / "a", "--label", "dog", "--n", 2, "--steps", 2, "--data-root", root, "--out", tmp_path / "dog.png"])
    assert r.exit_code == 0 and "label dog" in r.output, r.output
    r = invoke(sample.main, ["--ckpt", tmp_path / "a", "--inpaint", "left", "--n", 1, "--steps", 2, "--data-root", root, "--out", tmp_path / "in.png"])
    assert r.exit_code == 0, r.output
    from PIL import Image
    assert Image.open(tmp_path / "in.png").mode == "RGB" and (tmp_path / "in.png").exists()
    r = invoke(evaluate.main, ["bpd", "--ckpt", tmp_path / "a", "--n", 1, "--rtol", 1e-2, "--atol", 1e-2, "--data-root", root, "--device", "cpu"])
    assert r.exit_code == 0 and "over 1 test images" in r.output, r.output
    r = invoke(evaluate.main, ["bpd", "--ckpt", tmp_path / "a", "--n", 1, "--data", own_data / "gray", "--data-root", root, "--device", "cpu"])
    assert r.exit_code == 1 and "gives 1x16x16 images, but" in r.output, r.output  # never another shape
    r = invoke(train.main, [*args, "--data-root", pets / "cat", "--steps", 1, "--out", tmp_path / "c"])
    assert r.exit_code == 1 and "lies inside --data" in r.output, r.output
    assert snapshot(own_data / "pets") == before


def test_gray_folder_npz_mnist_and_cifar10(own_data, tmp_path, cheap_grids):
    """A flat gray folder trains an unconditional model (--conditional refused); an .npz and
    torchvision's MNIST and CIFAR-10 files train conditional ones, sampled by class name."""
    import sample
    import train
    root = own_data / "root"
    r = invoke(train.main, [*TRAIN_DATA, "--data", own_data / "gray", "--steps", 1, "--out", tmp_path / "gray", "--data-root", tmp_path / "r"])
    ckpt = checkpoint.load(tmp_path / "gray" / "ckpt.pt")
    assert r.exit_code == 0 and ckpt.shape == (1, 16, 16) and ckpt.model_config.num_classes == 0, r.output
    r = invoke(train.main, [*TRAIN_DATA, "--data", own_data / "gray", "--conditional", "--steps", 1, "--out", tmp_path / "g2", "--data-root", tmp_path / "r"])
    assert r.exit_code == 1 and "--conditional needs labels" in r.output
    for spec, shape, label in ((own_data / "set.npz", (3, 16, 16), "c"), ("mnist", (1, 28, 28), "7"), ("cifar10", (3, 32, 32), "dog")):
        out = tmp_path / str(spec).replace("/", "_")
        r = invoke(train.main, [*TRAIN_DATA, "--data", spec, "--data-root", root, "--steps", 1, "--flip", "--out", out])
        assert r.exit_code == 0, r.output
        assert checkpoint.load(out / "ckpt.pt").shape == shape and checkpoint.load(out / "ckpt.pt").train_config.flip
        r = invoke(sample.main, ["--ckpt", out, "--label", label, "--n", 2, "--steps", 2, "--out", out / "s.npz"])
        assert r.exit_code == 0 and f"label {label}" in r.output, r.output
        import numpy as np
        images = np.load(out / "s.npz")["images"]
        assert images.shape == ((2, *shape[1:], 3) if shape[0] == 3 else (2, *shape[1:]))
    r = invoke(sample.main, ["--ckpt", out, "--solver", "pc", "--steps", 2, "--n", 2, "--out", tmp_path / "rgb.gif"])
    from PIL import Image
    assert r.exit_code == 0 and Image.open(tmp_path / "rgb.gif").convert("RGB").size[0] > 64, r.output


def test_bad_data_gets_one_line_before_training(own_data, tmp_path, monkeypatch):
    import numpy as np

    import train
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "one", 1, (8, 8), "RGB")
    write_images(tmp_path / "broken", 3, (8, 8), "RGB")
    (tmp_path / "broken" / "001.png").write_bytes(open(tmp_path / "broken" / "000.png", "rb").read()[:60])  # truncated
    (tmp_path / "broken" / "002.png").write_bytes(b"not a png")
    write_images(tmp_path / "mixed", 2, (8, 8), "RGB")
    write_images(tmp_path / "mixed" / "more", 2, (16, 16), "RGB")
    write_images(tmp_path / "wide", 3, (16, 8), "RGB")
    np.savez(tmp_path / "noimages.npz", pictures=np.zeros((3, 8, 8), np.uint8))
    np.savez(tmp_path / "shortlabels.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    np.savez(tmp_path / "floatlabels.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3))
    np.savez(tmp_path / "outside.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 5]), classes=np.array(["a", "b"]))
    np.savez(tmp_path / "floatimages.npz", images=np.zeros((3, 8, 8)))
    (tmp_path / "notzip.npz").write_bytes(b"garbage")
    idx = tmp_path / "idx"
    idx.mkdir()
    for name in data.FILES:
        kind = 3 if "images" in name else 1
        body = bytes([0, 0, 8, kind]) + (2).to_bytes(4, "big") + (b"".join(v.to_bytes(4, "big") for v in (4, 4)) + bytes(32) if kind == 3 else bytes([3, 12]))
        (idx / name).write_bytes(body)
    cases = [(tmp_path / "empty", "no image files"), (tmp_path / "nowhere", "no such folder or file"),
             (tmp_path / "one", "1 image; at least 2"), (tmp_path / "broken", "not a readable image"),
             (tmp_path / "mixed", "one size: train.py --image-size S"), (tmp_path / "wide", "16x8 images; they need one size"),
             (tmp_path / "noimages.npz", "no 'images' array (it holds pictures)"),
             (tmp_path / "shortlabels.npz", "one per image (3)"), (tmp_path / "floatlabels.npz", "must be integers"),
             (tmp_path / "outside.npz", "outside the classes 0-1"), (tmp_path / "floatimages.npz", "must be uint8"),
             (tmp_path / "notzip.npz", "not a readable .npz"), (idx, "labels outside 0-9")]
    for spec, message in cases:
        r = invoke(train.main, [*TRAIN_DATA, "--data", spec, "--data-root", tmp_path / "root", "--out", tmp_path / "run"])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (spec, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "run").exists()
    write_images(tmp_path / "broken2", 2, (8, 8), "RGB")
    (tmp_path / "broken2" / "001.png").write_bytes(open(tmp_path / "broken2" / "000.png", "rb").read()[:60])
    r = invoke(train.main, [*TRAIN_DATA, "--data", tmp_path / "broken2", "--data-root", tmp_path / "root", "--out", tmp_path / "run"])
    assert r.exit_code == 1 and "001.png" in r.output and "truncated" in r.output, r.output
    for size, message in ((0, "0 is not in the range 1<=x<=4096"), (36, "--image-size 36: the U-Net")):
        r = invoke(train.main, [*TRAIN_DATA, "--data", own_data / "gray", "--image-size", size, "--out", tmp_path / "run"])
        assert r.exit_code in (1, 2) and message in r.output, r.output
    monkeypatch.setattr(data, "available_memory", lambda: 4000)  # 12 images of 16x16 take 3072 bytes
    r = invoke(train.main, [*TRAIN_DATA, "--data", own_data / "gray", "--data-root", tmp_path / "root", "--steps", 1, "--out", tmp_path / "run"])
    assert r.exit_code == 1 and "GB of memory available" in r.output, r.output


def test_dataset_shapes_levels_and_cache(own_data, tmp_path, monkeypatch):
    assert [data.unet_levels(s) for s in (4, 8, 14, 16, 28, 32, 64, 48, 36, 0)] == [1, 1, 2, 2, 3, 3, 4, 4, None, None]
    assert data.channel_mult(28, (1, 2, 4)) == (1, 2, 4) and data.channel_mult(64, (1, 2, 2)) == (1, 2, 2, 2) and data.channel_mult(16, (1, 2, 4)) == (1, 2)
    wide = torch.zeros(1, 3, 8, 16, dtype=torch.uint8)
    wide[..., 4:12] = 200  # the centre square survives the crop
    assert data.fit(wide, 8, False).shape == (1, 3, 8, 8) and bool((data.fit(wide, 8, False) == 200).all())
    assert data.fit(wide, None, True).shape == (1, 1, 8, 16)
    rgba = torch.tensor([[10, 20, 30, 0], [10, 20, 30, 255]], dtype=torch.uint8).T.reshape(1, 4, 1, 2)
    assert data.on_white(rgba).flatten().tolist() == [255, 10, 255, 20, 255, 30]  # transparent -> white
    pets = own_data / "pets"
    train_set = data.load(str(pets), tmp_path, image_size=8)
    test_set = data.load(str(pets), tmp_path, train=False, image_size=8)
    assert len(train_set.images) + len(test_set.images) == 22 and len(test_set.images) == 2 and train_set.classes == ("cat", "dog")
    assert data.load(str(own_data / "gray"), tmp_path).labels is None
    monkeypatch.setattr(data, "decode_folder", lambda *a: pytest.fail("decoded again"))
    assert torch.equal(data.load(str(pets), tmp_path, image_size=8).images, train_set.images)  # from the cache


def test_fd_feature_network_for_own_data(own_data, tmp_path, few_test_images):
    """train-classifier on a labelled folder; fd with it; a checkpoint of other data or shape is refused before sampling."""
    import evaluate
    import train
    pets, root = own_data / "pets", tmp_path / "root"
    r = invoke(evaluate.main, ["train-classifier", "--data", pets, "--image-size", 16, "--data-root", root, "--device", "cpu", "--epochs", 1])
    assert r.exit_code == 1 and "give --out" in r.output
    r = invoke(evaluate.main, ["train-classifier", "--data", pets, "--image-size", 16, "--data-root", root, "--device", "cpu", "--epochs", 1, "--out", tmp_path / "f.pt"])
    assert r.exit_code == 0 and "of 2 classes" in r.output, r.output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "GRID_STEPS", 2)
        r = invoke(train.main, [*TRAIN_DATA, "--data", pets, "--data-root", root, "--image-size", 16, "--steps", 1, "--out", tmp_path / "run"])
    assert r.exit_code == 0, r.output
    r = invoke(evaluate.main, ["fd", "--ckpt", tmp_path / "run", "--classifier", tmp_path / "f.pt", "--n", 4, "--steps", 2, "--data-root", root, "--device", "cpu"])
    assert r.exit_code == 0 and "floor" in r.output and "cat" in r.output, r.output
    for args, message in [(["--ckpt", tmp_path / "run"], "give one of its data"),
                          (["--classifier", tmp_path / "f.pt"], "scores 3x16x16 images of")]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
            r = invoke(evaluate.main, ["fd", *args, "--n", 4, "--data-root", root, "--device", "cpu"])
        assert r.exit_code == 1 and message in r.output, r.output


def test_old_checkpoints_are_fashion_mnist():
    ckpt = checkpoint.load(cli.SHIPPED)
    assert ckpt.train_config.data == "fashion-mnist" and ckpt.classes == data.FASHION and ckpt.shape == (1, 28, 28)


# ---------------------------------------------------------------- noise-conditional classifier (eq. 14) and colorization

def two_gaussians(sde, means, s, prior):
    """For data from sum_y prior[y] N(means[y], s^2 I): the exact logits of p_t(y | x(t)) (up to a constant), the
    exact class-conditional score s(x, t, y) and the exact mixture score s(x, t), x of shape (B, ...)."""
    def per_class(x, t):  # log p_t(x, y) - const (B, 2) and the scores (2, B, ...)
        a = sgm.append_dims(sde.mean_scale(t), x.ndim)
        var = sgm.append_dims(marginal_var(sde, t, s ** 2), x.ndim)
        diffs = torch.stack([x - a * m for m in means])
        log_joint = torch.stack([math.log(p) - (d ** 2 / (2 * var)).flatten(1).sum(1) for p, d in zip(prior, diffs)], 1)
        return log_joint, -diffs / var
    def logits(x, t):
        return per_class(x, t)[0]
    def conditional(x, t, labels):
        return per_class(x, t)[1][labels, torch.arange(len(x))]
    def mixture(x, t):
        log_joint, scores = per_class(x, t)
        weights = torch.softmax(log_joint, 1).T  # p_t(y | x), (2, B)
        return (sgm.append_dims(weights, scores.ndim) * scores).sum(0)
    return logits, conditional, mixture


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional_score(sde):
    """Eq. 14: s(x, t) + grad log p_t(y | x) = grad log p_t(x | y) exactly, at w = 1, for any t; other w differ."""
    means, prior = [torch.tensor([-1.0, 0.5, 0.0]), torch.tensor([1.0, 0.0, 2.0])], (0.3, 0.7)
    logits, conditional, mixture = two_gaussians(sde, means, 0.4, prior)
    g = torch.Generator().manual_seed(0)
    x, t = 3 * torch.randn(64, 3, generator=g), 1e-3 + torch.rand(64, generator=g)
    labels = torch.randint(0, 2, (64,), generator=g)
    with torch.no_grad():  # as the samplers call it
        guided = sgm.classifier_guided_score(mixture, logits, labels)(x, t)
        doubled = sgm.classifier_guided_score(mixture, logits, labels, 2.0)(x, t)
    exact = conditional(x, t, labels)
    assert (guided - exact).abs().max() < 1e-4 * (1 + exact.abs().max())
    assert (doubled - exact).abs().max() > 0.1
    x0, _ = sgm.sample(sgm.classifier_guided_score(mixture, logits, torch.zeros(500, dtype=torch.long)), sde, (500, 3), "heun", 30,
                       generator=torch.Generator().manual_seed(1))  # the sampler gets class 0 alone
    assert (x0.mean(0) - means[0]).abs().max() < 0.15


def test_classifier_trained_by_the_loss_approaches_the_exact_posterior():
    """A tiny NoiseClassifier trained with classifier_loss on two Gaussian classes of 1x8x8 images: its p_t(y | x(t))
    comes close to the exact posterior at every noise level, far closer than knowing nothing (p = prior)."""
    sde, s, prior = sgm.VPSDE(), 0.5, (0.5, 0.5)
    means = [torch.full((1, 8, 8), -0.15), torch.full((1, 8, 8), 0.15)]
    logits, _, _ = two_gaussians(sde, means, s, prior)
    torch.manual_seed(0)
    net = sgm.NoiseClassifier(tiny_config(num_classes=2, image_size=8, channel_mult=(1,)))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(500):
        labels = torch.randint(0, 2, (128,))
        x = torch.stack(means)[labels] + s * torch.randn(128, 1, 8, 8)
        loss = sgm.classifier_loss(net, sde, x, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (2000,), generator=g)
    x0 = torch.stack(means)[labels] + s * torch.randn(2000, 1, 8, 8, generator=g)
    t = 0.02 + 0.9 * torch.rand(2000, generator=g)
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + std[:, None, None, None] * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        learned = torch.softmax(sgm.classifier_logits(net.eval(), sde, xt, t), 1)[:, 1]
    exact = torch.softmax(logits(xt, t), 1)[:, 1]
    error, baseline = (learned - exact).abs().mean(), (prior[1] - exact).abs().mean()
    print(f"\nclassifier: mean |p - p_exact| {error:.3f}, knowing nothing {baseline:.3f}")
    assert error < 0.3 * baseline


def gray_level(x):
    """(R + G + B) / sqrt 3 of images (B, 3, H, W): channel 0 of the decoupled colour space."""
    return x.sum(1) / 3 ** 0.5


def colorization_keeps_gray(sde, matrix=sgm.COLOR_MATRIX, pixel_space=False):
    """Colorize RGB images with an exact Gaussian score (pc, a few steps); whether the outputs keep each input's gray
    level exactly. pixel_space: impute channel 0 in pixel space instead (the mask in the wrong space)."""
    g = torch.Generator().manual_seed(0)
    gray = (0.5 * torch.randn(4, 1, 4, 4, generator=g)).expand(4, 3, 4, 4)  # R = G = B
    score = lambda x, t: -x / sgm.append_dims(marginal_var(sde, t, 0.25), x.ndim)
    if pixel_space:
        mask = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        x, _ = sgm.inpaint(score, sde, gray, mask, "pc", 5, generator=g)
    else:
        x, _ = sgm.colorize(score, sde, gray, "pc", 5, matrix=matrix, generator=g)
    assert x.shape == gray.shape and not torch.allclose(x[:, 0], x[:, 1])  # coloured: the channels differ
    return bool((gray_level(x) - gray_level(gray)).abs().max() < 1e-5)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_colorization_keeps_each_gray_level_exactly(sde):
    """Appendix I: imputation of channel 0 of x M, M orthonormal with first column (1, 1, 1) / sqrt 3. The check fails
    with a matrix that is not orthonormal, or with the mask in pixel space."""
    M = sgm.COLOR_MATRIX
    assert torch.allclose(M.T @ M, torch.eye(3), atol=1e-6) and torch.allclose(M[:, 0], torch.full((3,), 3 ** -0.5))
    assert colorization_keeps_gray(sde)
    skewed = M.clone()
    skewed[:, 1] += M[:, 0]  # the same gray column, no longer orthonormal
    assert not colorization_keeps_gray(sde, matrix=skewed)
    assert not colorization_keeps_gray(sde, pixel_space=True)


@pytest.fixture(scope="module")
def guidance_ckpts(tmp_path_factory, own_data):
    """Untrained noise-conditional classifiers beside tiny.pt's kind of score model (VP, 1x28x28, FashionMNIST's
    classes): a matching one, ones of another SDE, shape and classes; an unconditional VP score model; an RGB one of
    own_data's .npz (3x16x16)."""
    folder = tmp_path_factory.mktemp("guide")
    def save(name, net, sde, extra=None, **train):
        ckpt = checkpoint.Checkpoint(net, sde, sde.data_range, net.config, checkpoint.TrainConfig(sde=sde.name, **train))
        ckpt.extra.update(extra or {})
        checkpoint.save(folder / name, ckpt, ema=checkpoint.EMA(net))
    torch.manual_seed(0)
    save("clf.pt", randomize(sgm.NoiseClassifier(tiny_config(num_classes=10))), sgm.VPSDE(), classifier=True)
    save("clf_subvp.pt", sgm.NoiseClassifier(tiny_config(num_classes=10)), sgm.SubVPSDE(), classifier=True)
    save("clf_8px.pt", sgm.NoiseClassifier(tiny_config(num_classes=10, image_size=8)), sgm.VPSDE(), classifier=True)
    save("clf_digits.pt", sgm.NoiseClassifier(tiny_config(num_classes=10)), sgm.VPSDE(), {"classes": list("0123456789")},
         classifier=True)
    save("uncond.pt", randomize(sgm.UNet(tiny_config())), sgm.VPSDE())
    save("rgb.pt", randomize(sgm.UNet(tiny_config(image_channels=3, image_size=16))), sgm.VPSDE(),
         data=str(own_data / "set.npz"))
    return folder


@pytest.mark.parametrize("solver", list(sgm.SOLVERS))
def test_sample_cli_classifier_guidance_with_every_solver(tiny_ckpt, guidance_ckpts, tmp_path, solver):
    """--classifier --label --classifier-scale steers the dropped label's score of a conditional model, and the score
    of an unconditional one, with every solver."""
    import numpy as np
    for model, score in ((tiny_ckpt / "tiny.pt", "dropped label's"), (guidance_ckpts / "uncond.pt", "unconditional")):
        r = run_sample("--ckpt", model, "--classifier", guidance_ckpts / "clf.pt", "--label", "sneaker", "--classifier-scale", 3,
                       "--solver", solver, "--steps", 2, "--rtol", 1e-2, "--atol", 1e-2, "--n", 3, "--out", tmp_path / "g.npz")
        assert r.exit_code == 0, r.output
        assert f"label sneaker by the classifier, w = 3, on the {score} score" in r.output, r.output
        assert (np.load(tmp_path / "g.npz")["labels"] == 7).all()


def test_classifier_guidance_changes_the_samples_and_defaults_to_w_1(tiny_ckpt, guidance_ckpts, tmp_path):
    import numpy as np
    common = ["--ckpt", tiny_ckpt / "tiny.pt", "--solver", "em", "--steps", 3, "--n", 2, "--label", "bag"]
    assert run_sample(*common, "--label", "none", "--out", tmp_path / "plain.npz").exit_code == 0
    r = run_sample(*common, "--classifier", guidance_ckpts / "clf.pt", "--out", tmp_path / "guided.npz")
    assert r.exit_code == 0 and "w = 1," in r.output, r.output
    r = run_sample(*common, "--classifier", guidance_ckpts / "clf.pt", "--classifier-scale", 0, "--out", tmp_path / "w0.npz")
    assert r.exit_code == 0, r.output
    plain, guided, w0 = (np.load(tmp_path / f"{name}.npz")["images"] for name in ("plain", "guided", "w0"))
    assert np.array_equal(plain, w0) and not np.array_equal(plain, guided)


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "CLF"], "is a noise-conditional classifier, not a score model (sample.py takes it as --classifier)"),
    (["--classifier", "TINY", "--label", "bag"], "is a score model, not a noise-conditional classifier"),
    (["--classifier", "CLF_SUBVP", "--label", "bag"], "cannot guide"),
    (["--classifier", "CLF_8PX", "--label", "bag"], "its images (1x8x8) are not the score model's (1x28x28)"),
    (["--classifier", "CLF_DIGITS", "--label", "3"], "its classes (0, 1, 2"),
    (["--classifier", "CLF"], "--classifier needs --label"),
    (["--classifier", "CLF", "--label", "none"], "--classifier needs --label"),
    (["--classifier", "CLF", "--label", "bag", "--guidance", "2"], "--guidance is classifier-free guidance"),
    (["--classifier-scale", "2"], "--classifier-scale weighs --classifier"),
    (["--classifier", "CLF", "--label", "bag", "--classifier-scale", "-1"], "Invalid value for '--classifier-scale'"),
    (["--classifier", "CLF", "--label", "banana"], "unknown --label"),
    (["--classifier", "CLF", "--label", "bag", "--interpolate", "0", "1"], "drop --classifier"),
    (["--colorize"], "--colorize needs an RGB model; "),
    (["--ckpt", "RGB", "--colorize", "--solver", "heun"], "--colorize needs a solver that re-noises every step"),
    (["--ckpt", "RGB", "--colorize", "--inpaint", "left"], "give one of --inpaint, --colorize and --interpolate"),
    (["--ckpt", "RGB", "--colorize", "--out", "c.npz"], "--colorize writes a .png grid"),
])
def test_sample_cli_classifier_and_colorize_refusals(tiny_ckpt, guidance_ckpts, tmp_path, args, message):
    named = {"CLF": guidance_ckpts / "clf.pt", "TINY": tiny_ckpt / "tiny.pt", "CLF_SUBVP": guidance_ckpts / "clf_subvp.pt",
             "CLF_8PX": guidance_ckpts / "clf_8px.pt", "CLF_DIGITS": guidance_ckpts / "clf_digits.pt", "RGB": guidance_ckpts / "rgb.pt"}
    args = [str(named.get(a, a)) for a in args]
    args = args if "--ckpt" in args else [*args, "--ckpt", str(tiny_ckpt / "tiny.pt")]
    args = args if "--out" in args else [*args, "--out", str(tmp_path / "o.png")]
    r = run_sample(*args)
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 or r.exit_code == 2, r.output  # one line (usage errors: click's)
    assert not (tmp_path / "o.png").exists()


def test_sample_cli_colorize_writes_originals_gray_inputs_and_colourings(guidance_ckpts, own_data, tmp_path):
    import numpy as np
    from PIL import Image
    r = run_sample("--ckpt", guidance_ckpts / "rgb.pt", "--colorize", "--n", 1, "--steps", 3, "--data-root", tmp_path / "root",
                   "--out", tmp_path / "c.png")  # the .npz holds out one test image
    assert r.exit_code == 0 and "pc: 1 images" in r.output, r.output  # pc by default, as --inpaint
    grid = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    assert grid.shape == (3 * 18 + 2, 18 + 2, 3)  # rows: originals, gray inputs, colourings
    gray_row = grid[20:36, 2:18]
    assert (gray_row.max(2) - gray_row.min(2)).max() <= 1  # R = G = B
    assert (grid[2:18, 2:18].max(2) - grid[2:18, 2:18].min(2)).max() > 10  # the originals are in colour


def test_train_classifier_logs_held_out_accuracy_resumes_exactly_and_guides(tmp_path, own_data, cheap_grids):
    """train.py --classifier: a checkpoint of kind classifier, log rows of the loss and of held-out accuracy at four
    noise levels, an exact --resume, its flag fixed on --resume, unlabelled data refused; sample.py is guided by it."""
    import train
    args = [*TRAIN_TINY, "--classifier", "--log-every", 2, "--sample-every", 2]
    r = invoke(train.main, [*args, "--steps", 4, "--out", tmp_path / "a"])
    assert r.exit_code == 0 and "held-out accuracy at t = 0.1 / 0.3 / 0.5 / 0.7" in r.output, r.output
    assert f"python sample.py --classifier {tmp_path / 'a'} --label t-shirt" in r.output
    rows = read_log(tmp_path / "a")
    assert [row["step"] for row in rows if "loss" in row] == [2, 4]
    held_out = [row for row in rows if "held_out_accuracy" in row]
    assert [row["step"] for row in held_out] == [2, 4] and all(set(row["held_out_accuracy"]) == {"0.1", "0.3", "0.5", "0.7"} for row in held_out)
    assert all(0 <= v <= 1 for row in held_out for v in row["held_out_accuracy"].values())
    assert not list((tmp_path / "a").glob("samples_*.png"))  # no grids of a classifier
    a = checkpoint.load(tmp_path / "a" / "ckpt.pt", use_ema=False, kind="classifier")
    assert a.kind == "classifier" and isinstance(a.net, sgm.NoiseClassifier) and a.classes == data.FASHION
    assert a.train_config.classifier and not a.train_config.conditional
    assert invoke(train.main, [*args, "--steps", 2, "--out", tmp_path / "b"]).exit_code == 0
    r = invoke(train.main, ["--resume", "--steps", 4, "--out", tmp_path / "b", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    b = checkpoint.load(tmp_path / "b" / "ckpt.pt", use_ema=False, kind="classifier")
    assert all(torch.equal(a.net.state_dict()[k], v) for k, v in b.net.state_dict().items())
    assert [row["step"] for row in read_log(tmp_path / "b")] == [row["step"] for row in rows]
    assert invoke(train.main, [*TRAIN_TINY, "--steps", 1, "--out", tmp_path / "score"]).exit_code == 0
    r = invoke(train.main, ["--resume", "--steps", 2, "--out", tmp_path / "score", "--device", "cpu", "--classifier"])
    assert r.exit_code == 1 and "--classifier contradicts the run's classifier = False" in r.output, r.output
    r = invoke(train.main, [*TRAIN_DATA, "--classifier", "--data", own_data / "gray", "--data-root", tmp_path / "root",
                            "--steps", 1, "--out", tmp_path / "gray"])
    assert r.exit_code == 1 and "--classifier needs labels" in r.output, r.output
    r = run_sample("--ckpt", tmp_path / "a", "--out", tmp_path / "x.png")
    assert r.exit_code == 1 and "is a noise-conditional classifier, not a score model" in r.output, r.output
    r = run_sample("--ckpt", tmp_path / "score", "--classifier", tmp_path / "a", "--label", "sneaker", "--solver", "heun",
                   "--steps", 2, "--n", 2, "--out", tmp_path / "g.png")
    assert r.exit_code == 0 and "by the classifier, w = 1" in r.output, r.output
    r = run_evaluate("export", tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "a.pt")
    assert r.exit_code == 0 and checkpoint.load(tmp_path / "a.pt", kind="classifier").is_ema, r.output  # no FD for a classifier
    with pytest.MonkeyPatch.context() as patch:  # few test images: the FDs' features are the slow part
        load = data.load_named
        patch.setattr(data, "load_named", lambda *a, **k: tuple(v[:200] for v in load(*a, **k)))
        import evaluate
        evaluate.reference.cache_clear()
        r = run_evaluate("guidance", "--ckpt", tmp_path / "score", "--noise-classifier", tmp_path / "a.pt", "--weights", "0,2",
                         "--n", 2, "--steps", 2, "--device", "cpu")
        evaluate.reference.cache_clear()
    assert r.exit_code == 0 and "classifier guidance by" in r.output and "| 2 | " in r.output, r.output


def test_resumed_snapshots_count_the_runs_minutes(tiny_run, tmp_path, monkeypatch):
    """--snapshot-minutes are the run's minutes in all; --time-limit this process's: a resumed run
    takes snapshots past its own limit when the run's minutes so far make up the difference."""
    import train
    run, pace = copy_run(tiny_run, tmp_path), [60.0]
    fake_clock(monkeypatch, lambda step: pace[0])  # seconds per step, on any machine
    r = invoke(train.main, ["--resume", "--out", run, "--steps", 6, "--sample-every", 1000])  # 2 minutes more
    assert r.exit_code == 0, r.output
    done = checkpoint.load(run / "ckpt.pt", use_ema=False).extra["train_seconds"] / 60
    assert done > 2
    r = invoke(train.main, ["--resume", "--out", run, "--steps", 10, "--time-limit", 1, "--snapshot-minutes", f"{done + 1.5:g}"])
    assert r.exit_code == 1 and f"past the run's {done + 1:g} minutes" in r.output, r.output
    pace[0], minutes = 12.0, f"{done + 0.5:g}"  # steps 7-10 end 12, 24, 36, 48 s in: taken after step 9,
    # where this process's own minutes would never reach it
    r = invoke(train.main, ["--resume", "--out", run, "--steps", 10, "--time-limit", 1, "--snapshot-minutes", minutes, "--sample-every", 1000])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(run / f"snapshot_{minutes}min.pt").step == 9 and checkpoint.load(run / "ckpt.pt").step == 10


def test_nothing_is_written_into_the_data_and_odd_folders_are_read(own_data, tmp_path, cheap_grids):
    """Outputs inside a --data folder or over its file are refused (train.py --out, sample.py --out,
    train-classifier --out); FIFOs are skipped, linked folders followed; a changed dataset stops
    --resume; sizes the U-Net cannot halve, empty arrays and twice-named classes are one line."""
    import numpy as np

    import evaluate
    import sample
    import train
    pets, root = tmp_path / "pets", tmp_path / "root"
    write_images(pets / "cat", 6, (16, 16), "RGB")
    write_images(tmp_path / "elsewhere" / "dog", 6, (16, 16), "RGB", seed=1)
    os.symlink(tmp_path / "elsewhere" / "dog", pets / "dog")  # a linked class folder
    os.mkfifo(pets / "cat" / "pipe.png")  # would block a read forever
    np.savez(tmp_path / "set.npz", images=np.zeros((8, 16, 16), np.uint8))
    args = [*TRAIN_DATA, "--data-root", root, "--steps", 1]
    r = invoke(train.main, [*args, "--data", pets, "--out", pets / "run"])
    assert r.exit_code == 1 and "inside the dataset" in r.output and not (pets / "run").exists(), r.output
    r = invoke(train.main, [*args, "--data", pets, "--out", tmp_path / "run"])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(tmp_path / "run" / "ckpt.pt").classes == ("cat", "dog")
    for out in (pets / "cat" / "000.png", pets / "new.png"):
        r = invoke(sample.main, ["--ckpt", tmp_path / "run", "--n", 1, "--steps", 2, "--out", out])
        assert r.exit_code == 1 and "inside the dataset" in r.output, r.output
    r = invoke(evaluate.main, ["train-classifier", "--data", tmp_path / "set.npz", "--out", tmp_path / "set.npz", "--overwrite"])
    assert r.exit_code == 1 and "nothing is written into your data" in r.output, r.output
    write_images(pets / "cat", 7, (16, 16), "RGB", seed=2)  # one more image, one changed
    r = invoke(train.main, ["--resume", "--out", tmp_path / "run", "--steps", 2, "--data-root", root])
    assert r.exit_code == 1 and "has changed since the run began" in r.output, r.output
    for name, images, extra, message in (("odd.npz", np.zeros((8, 17, 17), np.uint8), {}, "halves 17x17 images"),
                                         ("empty.npz", np.zeros((0, 16, 16), np.uint8), {}, "0 image; at least 2"),
                                         ("twice.npz", np.zeros((4, 16, 16), np.uint8), dict(labels=np.array([0, 1, 0, 1]), classes=np.array(["a", "a"])), "names a class twice")):
        np.savez(tmp_path / name, images=images, **extra)
        r = invoke(train.main, [*args, "--data", tmp_path / name, "--out", tmp_path / "x"])
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_label_keywords_come_before_class_names():
    import sample
    ckpt = checkpoint.load(cli.SHIPPED)
    ckpt.extra = {**ckpt.extra, "classes": ["all", "none", "2", "Ünïcode", *map(str, range(4, 10))]}
    assert sample.make_labels("all", ckpt, 10, "sample", 0)[1] == "one row per class"
    assert sample.make_labels("none", ckpt, 4, "sample", 0)[0] is None
    assert sample.make_labels("2", ckpt, 1, "sample", 0)[0].tolist() == [2]  # the name "2" is index 2
    nfd = "U\u0308n\u0131\u0308code".replace("\u0131\u0308", "\u00ef")  # decomposed Ü, as macOS writes it
    assert sample.make_labels(nfd, ckpt, 1, "sample", 0)[0].tolist() == [3]


def test_the_shipped_noise_classifier_guides_the_shipped_model(tmp_path):
    clf = checkpoint.load(os.path.join(HERE, "checkpoints", "noise_classifier.pt"), kind="classifier")
    assert clf.classes == data.FASHION and clf.sde.name == checkpoint.load(cli.SHIPPED).sde.name
    r = run_sample("--classifier", os.path.join(HERE, "checkpoints", "noise_classifier.pt"), "--label", "sneaker", "--classifier-scale", 10,
                   "--n", 2, "--steps", 2, "--out", tmp_path / "s.png")
    assert r.exit_code == 0 and "by the classifier, w = 10" in r.output, r.output
