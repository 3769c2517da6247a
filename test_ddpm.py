"""Tests for ddpm.py, in the order of the file: Part I (the math) against float64 references and
closed forms, Part II (the networks), Part III (the script, driven through main()).

CPU only, offline, fixed seeds; the data is generated here. Run: python -m pytest -q
"""

import math
import os
import re
import shlex
import signal
import socket
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import ddpm

torch.set_num_threads(min(2, torch.get_num_threads()))

# a tiny network configuration: seconds on a CPU, every code path of the paper's network
TINY = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.1, image_size=8)
TINY_FLAGS = ["--image-size", "8", "--base-channels", "32", "--channel-mult", "1,2",
              "--num-res-blocks", "1", "--attn-resolutions", "4", "--timesteps", "20"]


def linear_diffusion(T=1000):
    return ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", T))


def float64_schedule(T=1000):
    """The paper's quantities recomputed independently in float64 with numpy."""
    betas = np.linspace(1e-4, 0.02, T)
    alphas_cumprod = np.cumprod(1 - betas)
    return betas, alphas_cumprod, np.append(1.0, alphas_cumprod[:-1])


# -----------------------------------------------------------------------------
# Part I: schedules and buffers
# -----------------------------------------------------------------------------


def test_linear_schedule_matches_float64_reference():
    """alpha_bar = cumprod(1 - beta) in float64; endpoints, monotone in (0, 1), alpha_bar_T = 4.04e-5 [Sec. 4]."""
    betas = ddpm.make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    ref_betas, ref_ac, ref_acp = float64_schedule()
    np.testing.assert_allclose(betas.numpy(), ref_betas, rtol=1e-12)
    d = linear_diffusion()
    assert all(buf.dtype == torch.float32 for buf in d.buffers())
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref_ac, rtol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), ref_acp, rtol=1e-6)
    ac = d.alphas_cumprod
    assert ((ac > 0) & (ac < 1)).all() and (ac[1:] < ac[:-1]).all()
    assert abs(ac[-1].item() - 4.04e-5) < 0.01e-5


def test_cosine_schedule_matches_closed_form():
    """Cosine schedule: alpha_bar_t = f(t)/f(0), f = cos^2(((t/T + s)/(1 + s)) pi/2) [Nichol & Dhariwal, Eq. 17]."""
    T, s = 1000, 0.008
    betas = ddpm.make_beta_schedule("cosine", T)
    assert betas.dtype == torch.float64 and (betas > 0).all() and (betas <= 0.999).all()
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.cumprod(1 - betas, 0)
    unclipped = (betas < 0.999).nonzero().max().item()  # before the clip changes anything
    for t in [1, 10, 500, 900, unclipped]:
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


def test_schedule_rejects_bad_arguments():
    """Unknown kinds, T < 2 and beta ranges outside (0, 1) raise ValueError."""
    for args in [("quadratic", 10), ("linear", 1), ("linear", 10.5), ("linear", 10, 0.0, 0.02),
                 ("linear", 10, 0.03, 0.02), ("linear", 10, 1e-4, 1.0)]:
        with pytest.raises(ValueError):
            ddpm.make_beta_schedule(*args)


def test_posterior_buffers_match_float64_formulas():
    """beta_tilde and the posterior coefficients [Eq. 7] against float64; beta_tilde_1 = 0."""
    d = linear_diffusion()
    betas, ac, acp = float64_schedule()
    assert d.posterior_variance[0].item() == 0.0
    np.testing.assert_allclose(d.posterior_variance.numpy(), betas * (1 - acp) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(d.posterior_mean_coef1.numpy(), betas * np.sqrt(acp) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(d.posterior_mean_coef2.numpy(), (1 - acp) * np.sqrt(1 - betas) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:].numpy(), np.log((betas * (1 - acp) / (1 - ac))[1:]), rtol=1e-5)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod.numpy(), np.sqrt(1 / ac - 1), rtol=1e-5)


def test_extract_gathers_per_sample_and_broadcasts():
    """extract(a, t, shape) == a[t] shaped (B, 1, 1, 1), on a's device."""
    a = torch.arange(10.0) * 3
    t = torch.tensor([0, 9, 4])
    out = ddpm.extract(a, t, (3, 2, 5, 5))
    assert out.shape == (3, 1, 1, 1) and out.device == a.device
    assert out.flatten().tolist() == [0.0, 27.0, 12.0]


# -----------------------------------------------------------------------------
# Part I: the forward process and the loss
# -----------------------------------------------------------------------------


def test_q_sample_without_noise_scales_x0():
    """q_sample with eps = 0 returns sqrt(alpha_bar_t) x_0 [Eq. 4]."""
    d = linear_diffusion()
    x_0 = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    out = d.q_sample(x_0, t, torch.zeros_like(x_0))
    _, ac, _ = float64_schedule()
    expected = torch.from_numpy(np.sqrt(ac[t.numpy()])).float()[:, None, None, None] * x_0
    torch.testing.assert_close(out, expected)


def test_q_sample_monte_carlo_matches_eq4():
    """Samples of q(x_t | x_0) have mean sqrt(alpha_bar) x_0 and variance 1 - alpha_bar [Eq. 4], within 5 standard errors."""
    torch.manual_seed(0)
    d = linear_diffusion()
    n = 200_000
    for t_val, x0_val in [(0, 0.7), (300, -0.5), (999, 1.0)]:
        x_0 = torch.full((n, 1, 1, 1), x0_val)
        x_t = d.q_sample(x_0, torch.full((n,), t_val)).flatten().double()
        ab = d.alphas_cumprod[t_val].item()
        var = 1 - ab
        assert abs(x_t.mean().item() - math.sqrt(ab) * x0_val) < 5 * math.sqrt(var / n)
        # the sample variance of a Gaussian has standard error var * sqrt(2 / (n - 1))
        assert abs(x_t.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))


def test_p_losses_is_l_simple_and_draws_every_t():
    """L_simple [Eq. 14] is 0 for a perfect eps-predictor and E[eps^2] for a zero one; t covers {0..T-1} uniformly [Alg. 1, line 3]."""
    torch.manual_seed(0)
    T = 10
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", T, 1e-4, 0.2))
    x_0 = torch.rand(64, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x_0)
    t = torch.randint(0, T, (64,))
    assert d.p_losses(lambda x_t, t: noise, x_0, t, noise).item() == 0.0
    loss = d.p_losses(lambda x_t, t: torch.zeros_like(x_t), x_0, t, noise)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    seen = []
    d.p_losses(lambda x_t, t: seen.append(t) or torch.zeros_like(x_t), torch.zeros(20_000, 1, 1, 1))
    counts = torch.bincount(seen[0], minlength=T).double()
    assert seen[0].min() == 0 and seen[0].max() == T - 1  # the last step is trained too
    expected = 20_000 / T
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom: p = 0.001


# -----------------------------------------------------------------------------
# Part I: the reverse process
# -----------------------------------------------------------------------------


def test_perfect_eps_predictor_recovers_x0():
    """predict_x0_from_eps inverts q_sample exactly when eps is known [Eq. 4, 15], at every t."""
    d = linear_diffusion()
    x_0 = torch.rand(1000, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x_0)
    t = torch.arange(1000)
    x_t = d.q_sample(x_0, t, noise)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x_0, atol=1e-4, rtol=0)


def test_q_posterior_is_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) [Eq. 6-7] equals the conditional of the jointly Gaussian (x_{t-1}, x_t) given x_0, in float64."""
    d = linear_diffusion()
    betas, ac, acp = float64_schedule()
    x_0, x_t = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    mean, var = d.q_posterior(x_0, x_t, t)
    for k, tk in enumerate(t.tolist()):
        # x_{t-1} ~ N(sqrt(acp) x_0, 1 - acp); x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e
        cov = math.sqrt(1 - betas[tk]) * (1 - acp[tk])  # Cov(x_{t-1}, x_t | x_0)
        ref_mean = math.sqrt(acp[tk]) * x_0[k].double() + cov / (1 - ac[tk]) * (x_t[k].double() - math.sqrt(ac[tk]) * x_0[k].double())
        ref_var = (1 - acp[tk]) - cov**2 / (1 - ac[tk])
        torch.testing.assert_close(mean[k].double(), ref_mean, atol=1e-5, rtol=1e-5)
        assert var[k].item() == pytest.approx(ref_var, rel=1e-5)


def toy_model(x_t, t):
    """A fixed, nonlinear stand-in for eps_theta that depends on x_t and t."""
    return torch.tanh(0.8 * x_t) + 0.01 * t.float()[:, None, None, None].sin()


def test_eps_form_mean_equals_posterior_mean():
    """mu_tilde(x_t, x_0(eps)) [Eq. 7] equals (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) [Eq. 11]."""
    d = linear_diffusion()
    betas, ac, _ = float64_schedule()
    x_t = torch.randn(5, 3, 4, 4)
    t = torch.tensor([1, 5, 100, 600, 999])
    eps = toy_model(x_t, t)
    mean, _ = d.q_posterior(d.predict_x0_from_eps(x_t, t, eps), x_t, t)
    b, a = torch.from_numpy(betas[t]), torch.from_numpy(ac[t])
    ref = (x_t.double() - (b / (1 - a).sqrt())[:, None, None, None] * eps.double()) / (1 - b).sqrt()[:, None, None, None]
    torch.testing.assert_close(mean.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_p_sample_without_clipping_is_algorithm_2(variance):
    """p_sample(clip_denoised=False) equals Alg. 2, line 4 in float64, with sigma^2 = beta_t or beta_tilde_t."""
    d = linear_diffusion()
    betas, ac, acp = float64_schedule()
    x_t, z = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    for t in [1, 37, 999]:
        out = d.p_sample(toy_model, x_t, t, noise=z, clip_denoised=False, variance=variance)
        eps = toy_model(x_t, torch.full((3,), t)).double()
        sigma2 = betas[t] if variance == "fixedlarge" else betas[t] * (1 - acp[t]) / (1 - ac[t])
        ref = (x_t.double() - betas[t] / math.sqrt(1 - ac[t]) * eps) / math.sqrt(1 - betas[t]) + math.sqrt(sigma2) * z.double()
        torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-5)


def test_last_step_adds_no_noise_and_clipping_bounds_x0():
    """At t = 0 (paper t = 1) z = 0 [Alg. 2, line 3]; with clipping the mean uses x_0 clipped to [-1, 1]."""
    d = linear_diffusion()
    x_t = torch.randn(4, 3, 4, 4) * 3
    a = d.p_sample(toy_model, x_t, 0, noise=torch.randn_like(x_t))
    b = d.p_sample(toy_model, x_t, 0, noise=torch.randn_like(x_t))
    assert torch.equal(a, b)
    t = torch.full((4,), 0)
    x_0 = d.predict_x0_from_eps(x_t, t, toy_model(x_t, t))
    assert x_0.abs().max() > 1  # the clip has work to do
    torch.testing.assert_close(a, d.q_posterior(x_0.clamp(-1, 1), x_t, t)[0])


def gaussian_data_denoiser(d, mu, s):
    """The exact E[eps | x_t] for data x_0 ~ N(mu, s^2) per pixel: with a = sqrt(alpha_bar_t),
    b = sqrt(1 - alpha_bar_t), x_t ~ N(a mu, a^2 s^2 + b^2) and Cov(eps, x_t) = b."""
    ac = torch.cumprod(1 - d.betas.double(), 0)

    def model(x_t, t):
        a = ac[t].sqrt()[:, None, None, None]
        b = (1 - ac[t]).sqrt()[:, None, None, None]
        return (b / (a**2 * s**2 + b**2) * (x_t.double() - a * mu)).float()
    return model


def gaussian_chain_mean_std(d, mu, s, variance=None, steps=None):
    """A second way to get the samplers' output law for Gaussian data: with the exact denoiser
    every step is affine in x_t plus independent noise, so mean and variance propagate in closed
    form (float64). variance: Alg. 2 with that sigma^2; steps: DDIM (eta = 0) with that many."""
    betas = d.betas.double()
    ac = torch.cumprod(1 - betas, 0)
    acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    ts = list(reversed(range(len(betas)))) if steps is None else ddpm.ddim_timesteps(len(betas), steps)
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for i, t in enumerate(ts):
        a = ac[t]
        c = a.sqrt() * s**2 / (a * s**2 + 1 - a)  # E[x_0 | x_t] = (1 - c sqrt(a)) mu + c x_t
        if steps is None:  # mu_tilde = coef1 x_0_pred + coef2 x_t  [Eq. 7]
            coef1, coef2 = betas[t] * acp[t].sqrt() / (1 - a), (1 - acp[t]) * (1 - betas[t]).sqrt() / (1 - a)
            sigma2 = 0.0 if t == 0 else betas[t] if variance == "fixedlarge" else betas[t] * (1 - acp[t]) / (1 - a)
        else:  # sqrt(a') x_0_pred + sqrt(1 - a') (x_t - sqrt(a) x_0_pred) / sqrt(1 - a)
            ap = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            coef2 = (1 - ap).sqrt() / (1 - a).sqrt()
            coef1, sigma2 = ap.sqrt() - coef2 * a.sqrt(), 0.0
        k = coef1 * c + coef2
        m, v = coef1 * (1 - c * a.sqrt()) * mu + k * m, k**2 * v + sigma2
    return float(m), float(v) ** 0.5


@pytest.mark.parametrize("sampler,tol", [("fixedlarge", 0.005), ("fixedsmall", 0.005), ("ddim-50", 0.03)])
def test_samplers_with_exact_denoiser_reproduce_the_data(sampler, tol):
    """With the exact eps for data x_0 ~ N(mu, s^2), Alg. 2 (both variances) and DDIM (eta = 0, 50 steps) match the closed-form chain, and (mu, s) within tol."""
    d = linear_diffusion()
    mu, s, n = 0.1, 0.2, 16_384
    model = gaussian_data_denoiser(d, mu, s)
    g = torch.Generator().manual_seed(0)
    if sampler.startswith("ddim"):
        x = d.ddim_sample_loop(model, (n // 4, 1, 2, 2), steps=50, eta=0.0, generator=g)
        m, sd = gaussian_chain_mean_std(d, mu, s, steps=50)
    else:
        x = d.p_sample_loop(model, (n // 4, 1, 2, 2), variance=sampler, generator=g)
        m, sd = gaussian_chain_mean_std(d, mu, s, variance=sampler)
    # against the exact law of this chain: 5 standard errors (sd / sqrt(n), sd / sqrt(2n))
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n)
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)
    # against the data: the chain's own discretisation error is under tol (DDIM's ODE with 50
    # steps narrows data this narrow by 0.024; Alg. 2 with T = 1000 is within 0.002)
    assert abs(m - mu) < tol and abs(sd - s) < tol


def test_ddim_timesteps_run_from_T_minus_1_to_0():
    """The DDIM sub-sequence starts at T-1, ends at 0 and strictly decreases, for any 2 <= steps <= T."""
    for T, steps in [(1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (20, 7), (7, 7)]:
        ts = ddpm.ddim_timesteps(T, steps)
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    for steps in [0, 1, 1001]:
        with pytest.raises(ValueError):
            ddpm.ddim_timesteps(1000, steps)


def test_ddim_eta1_all_steps_equals_ddpm_with_beta_tilde():
    """DDIM with eta = 1 and steps = T is Alg. 2 with sigma^2 = beta_tilde, given the same noise [Song et al., Sec. 4.1]."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 50, 1e-4, 0.2))
    shape = (8, 3, 4, 4)
    ddpm_x = d.p_sample_loop(toy_model, shape, variance="fixedsmall", generator=torch.Generator().manual_seed(1))
    ddim_x = d.ddim_sample_loop(toy_model, shape, steps=50, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ddim_x, ddpm_x, atol=1e-4, rtol=1e-4)
    other = d.ddim_sample_loop(toy_model, shape, steps=50, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert (other - ddpm_x).abs().max() > 0.1  # and eta matters


def test_sample_loops_keep_trajectory_and_refuse_train_mode():
    """keep returns x_t at the requested steps (x_T first); a model left in train() mode is refused."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 20))
    x_T = torch.randn(2, 1, 4, 4)
    x_0, xs = d.p_sample_loop(toy_model, x_T.shape, x_T=x_T, keep=[19, 10, 0])
    assert xs.shape == (3, 2, 1, 4, 4) and torch.equal(xs[0], x_T) and x_0.shape == x_T.shape
    _, xs = d.ddim_sample_loop(toy_model, x_T.shape, 5, x_T=x_T, keep=[19, 0])
    assert xs.shape == (2, 2, 1, 4, 4) and torch.equal(xs[0], x_T)
    net = ddpm.ConvUNet(in_channels=1, **TINY)
    for loop in (lambda: d.p_sample_loop(net, x_T.shape), lambda: d.ddim_sample_loop(net, x_T.shape, 5)):
        with pytest.raises(ValueError, match="eval"):
            loop()


# -----------------------------------------------------------------------------
# Part II: the networks
# -----------------------------------------------------------------------------


def test_timestep_embedding_is_sinusoidal():
    """The embedding is [sin(t w_i), cos(t w_i)] with w_i = 10000^(-i / (half - 1)) [Sec. 4]."""
    t = torch.tensor([0, 1, 999])
    emb = ddpm.timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    w = 10000 ** (-torch.arange(4) / 3)
    torch.testing.assert_close(emb[2], torch.cat([(999 * w).sin(), (999 * w).cos()]))
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def randomized(model):
    """Perturb every parameter, including the zero-initialised ones that hide a path at init."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", list(ddpm.MODELS))
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 8), (3, 16)])
def test_models_keep_shape_and_depend_on_t(name, channels, size):
    """eps_theta(x_t, t) has x_t's shape for 1 and 3 channels and two sizes, and changes with t."""
    torch.manual_seed(0)
    model = randomized(ddpm.MODELS[name](in_channels=channels, **{**TINY, "image_size": size})).eval()
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([3, 3]))
    assert out.shape == x.shape
    assert (out - model(x, torch.tensor([700, 700]))).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(ddpm.MODELS))
def test_every_parameter_gets_a_finite_nonzero_gradient(name):
    """After two optimiser steps every parameter has a finite, non-zero gradient (no dead layer).
    Two, because zero-initialised layers block the gradient until they move: conv_out moves in
    step 1, the residual blocks' last convs in step 2; then every path is open."""
    torch.manual_seed(0)
    model = ddpm.MODELS[name](in_channels=3, **TINY)
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 20))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    for _ in range(3):
        opt.zero_grad()
        d.p_losses(model, x_0).backward()
        opt.step()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_paper_network_has_35746307_parameters_and_docstrings_agree():
    """ResAttUNet() is the paper's CIFAR-10 network: 35,746,307 parameters; each class's docstring states its own count."""
    counts = {name: ddpm.count_parameters(cls()) for name, cls in ddpm.MODELS.items()}
    assert counts["res_att"] == 35_746_307
    for name, cls in ddpm.MODELS.items():
        stated = re.search(r"([\d,]+) parameters at the defaults", cls.__doc__).group(1)
        assert int(stated.replace(",", "")) == counts[name], name


def test_paper_network_structure():
    """22 residual blocks, 6 attention blocks (5 at 16x16 + the middle), 3 down/up samplers; zero-initialised outputs [App. B]."""
    model = ddpm.ResAttUNet()
    mods = list(model.modules())
    count = lambda cls: sum(type(m) is cls for m in mods)  # noqa: E731
    assert (count(ddpm.ResBlock), count(ddpm.AttnBlock), count(ddpm.Downsample), count(ddpm.Upsample)) == (22, 6, 3, 3)
    assert all(m.num_groups == 32 for m in mods if isinstance(m, nn.GroupNorm))
    assert all(m.p == 0.1 for m in mods if isinstance(m, nn.Dropout))
    zero = [m.conv2.weight for m in mods if isinstance(m, ddpm.ResBlock)]
    zero += [m.proj_out.weight for m in mods if isinstance(m, ddpm.AttnBlock)] + [model.conv_out.weight]
    assert all(w.abs().max() == 0 for w in zero)
    assert ddpm.count_parameters(model.temb) == 128 * 512 + 512 + 512 * 512 + 512
    x = torch.randn(1, 3, 32, 32)
    hits = []
    for m in mods:
        if isinstance(m, ddpm.AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: hits.append(inp[0].shape[-1]))
    model.eval()(x, torch.tensor([5]))
    assert hits == [16, 16, 4, 16, 16, 16]  # down 2, middle (4x4), up 3


def test_attention_softmax_is_over_the_keys():
    """AttnBlock equals float64 softmax(q k^T / sqrt(C)) v with weights summing to 1 over the keys (not the queries)."""
    torch.manual_seed(0)
    block = randomized(ddpm.AttnBlock(32)).double()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    B, C, H, W = x.shape
    qkv = block.qkv(block.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3)  # (B, 3, N, C)
    q, k, v = qkv.unbind(1)
    scores = q @ k.transpose(1, 2) / math.sqrt(C)  # (B, N queries, N keys)
    weights = scores.softmax(dim=-1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H * W, dtype=torch.float64))
    attend = lambda w: x + block.proj_out((w @ v).transpose(1, 2).reshape(B, C, H, W))  # noqa: E731
    out = block(x)
    torch.testing.assert_close(out, attend(weights))
    assert (out - attend(scores.softmax(dim=-2))).abs().max() > 1e-3  # the original project's bug


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_compiled_groupnorm_is_groupnorm_and_keeps_the_layout(layout):
    """The GroupNorm that torch.compile traces equals float64 F.group_norm (values and gradients),
    returns float32 for bf16 input (as autocast runs GroupNorm), and keeps the input's layout."""
    torch.manual_seed(0)
    gn = randomized(ddpm.GroupNorm(32, 64, eps=1e-6)).double()
    x = (torch.randn(3, 64, 5, 6, dtype=torch.float64) * 3 + 1).contiguous(memory_format=layout).requires_grad_()
    out, ref = gn.forward_keep_layout(x), nn.functional.group_norm(x, 32, gn.weight, gn.bias, 1e-6)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    dy = torch.randn_like(ref)
    grads = [torch.autograd.grad(y, [x, gn.weight, gn.bias], dy) for y in (out, ref)]
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    assert out.is_contiguous(memory_format=layout)
    gn = gn.float()
    y = gn.forward_keep_layout(x.detach().bfloat16())
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y, gn(x.detach().bfloat16().float()), atol=1e-5, rtol=1e-5)


def test_torch_compile_traces_the_layout_keeping_groupnorm(monkeypatch):
    """Under torch.compile a channels_last input takes forward_keep_layout; an NCHW input, and
    eager, take nn.GroupNorm's forward."""
    gn, x = ddpm.GroupNorm(32, 64), torch.randn(2, 64, 4, 4)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    expected = gn(x)
    calls = []
    nn_forward = nn.GroupNorm.forward

    def counted(self, x):
        calls.append(x.is_contiguous())
        return nn_forward(self, x)

    monkeypatch.setattr(nn.GroupNorm, "forward", counted)
    torch._dynamo.reset()
    compiled = torch.compile(gn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x_cl), expected)
    assert calls == []  # traced through forward_keep_layout
    torch.testing.assert_close(compiled(x), expected)
    assert calls == [True]  # an NCHW input: nn.GroupNorm, traced
    gn(x_cl)
    assert calls == [True, False]  # eager: nn.GroupNorm whatever the layout


def test_bad_network_sizes_raise_with_the_constraint():
    """An image size the levels cannot halve and widths GroupNorm(32) cannot split raise ValueError naming the rule."""
    with pytest.raises(ValueError, match="divisible"):
        ddpm.ResAttUNet(image_size=30)
    with pytest.raises(ValueError, match="multiples of 32"):
        ddpm.ConvUNet(base_channels=48)


@pytest.mark.parametrize("name", list(ddpm.MODELS))
def test_tiny_model_overfits_a_fixed_batch(name):
    """On one fixed (x_0, t, eps) a tiny model drives L_simple down at least 100-fold in 100 Adam steps."""
    torch.manual_seed(0)
    model = ddpm.MODELS[name](in_channels=3, **{**TINY, "dropout": 0.0})
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 20))
    x_0 = torch.rand(8, 3, 8, 8) * 2 - 1
    t, noise = torch.randint(0, 20, (8,)), torch.randn(8, 3, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = d.p_losses(model, x_0, t, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])


def test_speed_paths_compute_the_same_function():
    """torch.compile (inductor) and bf16 autocast change the speed, not the math: the compiled network equals eager to 1e-4, bf16 L_simple is within 2%."""
    torch.manual_seed(0)
    small = dict(base_channels=32, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), image_size=8)
    model = randomized(ddpm.ResAttUNet(in_channels=3, **small)).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x, t), model(x, t), atol=1e-4, rtol=1e-4)
    d = linear_diffusion()
    x_0, noise, t = torch.rand(16, 3, 8, 8) * 2 - 1, torch.randn(16, 3, 8, 8), torch.randint(0, 1000, (16,))
    with torch.no_grad():
        loss32 = d.p_losses(model, x_0, t, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16 = d.p_losses(model, x_0, t, noise)
    assert loss16.dtype == torch.float32 and abs(loss16.item() / loss32.item() - 1) < 0.02


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_compiled_training_step_has_eager_gradients(layout):
    """--compile trains through inductor's backward too (GroupNorm, attention, the skips): the
    gradient of L_simple through the compiled network equals eager's to float32 rounding, and the
    compiled network runs the whole training step. channels_last is the GPU's layout, where the
    compiled GroupNorm is forward_keep_layout."""
    torch.manual_seed(0)
    args = ddpm.parse_args(["--device", "cpu", *TINY_FLAGS, "--channel-mult", "1", "--attn-resolutions", "8",
                            "--dropout", "0", "--compile", "default"])  # one level: a shorter compile
    net, model, ema, diffusion, opt, sched, scaler = ddpm.build_training(args, 3, torch.device("cpu"))
    assert model is not net  # the step calls the compiled module; net holds the same parameters
    randomized(net).to(memory_format=layout)
    x_0, t, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randint(0, 20, (4,)), torch.randn(4, 3, 8, 8)
    x_0, noise = x_0.contiguous(memory_format=layout), noise.contiguous(memory_format=layout)
    losses, grads = [], []
    for module in (net, model):
        net.zero_grad(set_to_none=True)
        losses.append(diffusion.p_losses(module, x_0, t, noise))
        losses[-1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    eager, compiled = grads
    assert (compiled - eager).norm() < 1e-4 * eager.norm()  # measured: 1.2e-6 (torch 2.3 and 2.14)
    loss, grad_norm = ddpm.train_step(model, net, ema, diffusion, opt, sched, scaler, x_0, 0, args, None)
    assert torch.isfinite(loss) and grad_norm > 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_bf16_sampling_keeps_float32_state_and_the_same_images(sampler):
    """Under bf16 autocast (the CUDA default) only the network runs in bf16: x_t stays float32, and
    the images from the same x_T and z differ by under half an 8-bit level on average (one level
    is 2/255) and 4 levels at most, while the network's output itself is off by about 1%."""
    torch.manual_seed(0)
    model = randomized(ddpm.ResAttUNet(in_channels=3, **TINY)).eval()
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100))
    x_T, t = torch.randn(8, 3, 8, 8), torch.full((8,), 50)
    args = SimpleNamespace(sampler=sampler, sample_steps=20, eta=0.0)
    with torch.inference_mode():
        eps32 = model(x_T, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps16 = model(x_T, t)
        x32, x16 = (ddpm.run_sampler(d, model, x_T, args, dtype, torch.Generator().manual_seed(1))
                    for dtype in (None, torch.bfloat16))
    assert 1e-3 < (eps16 - eps32).norm() / eps32.norm() < 0.05  # bf16 really was used
    assert x16.dtype == torch.float32
    level = 2 / 255
    assert 0 < (x16 - x32).abs().max() < 4 * level  # run_sampler did run the network in bf16
    assert (x16 - x32).abs().mean() < 0.5 * level


# -----------------------------------------------------------------------------
# Part III: the script, through main()
# -----------------------------------------------------------------------------


def test_train_step_applies_lr_warmup_and_ema():
    """train_step: Adam at lr * n / warmup (official code), then ema = d ema + (1 - d) net with d = min(0.9999, (1 + n) / (10 + n))."""
    torch.manual_seed(0)
    args = ddpm.parse_args(["--device", "cpu", *TINY_FLAGS, "--warmup", "10"])
    net, model, ema, diffusion, opt, sched, scaler = ddpm.build_training(args, 3, torch.device("cpu"))
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    for n in range(4):
        ema_before, net_before = [p.clone() for p in ema.parameters()], [p.clone() for p in net.parameters()]
        assert sched.get_last_lr()[0] == pytest.approx(2e-4 * n / 10)
        loss, grad_norm = ddpm.train_step(model, net, ema, diffusion, opt, sched, scaler, x_0, n, args, None)
        assert torch.isfinite(loss) and grad_norm > 0
        moved = any(not torch.equal(a, b) for a, b in zip(net_before, net.parameters()))
        assert moved == (n > 0)  # the first update has lr = 0, as in the official code
        d = min(0.9999, (1 + n) / (10 + n))
        for e0, e, p in zip(ema_before, ema.parameters(), net.parameters()):
            torch.testing.assert_close(e, d * e0 + (1 - d) * p)


def write_image_folder(root, n=40, channels=3, size=(10, 12)):
    """n small PNG images (smooth random blobs) in two class folders, as a user would have."""
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        (root / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        low = torch.rand(channels, 3, 3, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0]
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(2).numpy()  # (H, W[, C])
        Image.fromarray(arr).save(root / f"class{k % 2}" / f"{k:03d}.png")
    return root


def read_png(path):
    """(C, H, W) uint8 tensor of a PNG file."""
    arr = np.array(Image.open(path))
    return torch.from_numpy(arr.reshape(*arr.shape[:2], -1)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def train_flags(image_dir, out_dir, *extra):
    return ["--dataset", "folder", "--data-dir", str(image_dir), *TINY_FLAGS, "--batch-size", "8",
            "--out-dir", str(out_dir), "--warmup", "10", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained_run(image_dir, tmp_path_factory):
    """One tiny training run (2 epochs of 5 steps), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    assert ddpm.main(train_flags(image_dir, out, "--epochs", "2", "--sample-every", "1", "--log-every", "2")) == 0
    return out


def test_train_writes_checkpoint_log_and_pictures(trained_run):
    """A tiny run writes ckpt.pt (step 10 = 2 epochs of 40 // 8), a log.csv with finite losses, grids and both pictures."""
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["epoch"] == 2 and ckpt["config"]["model"] == "res_att"
    rows = (trained_run / "log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,grad_norm,images_per_s,elapsed_s"
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == sorted(steps) and steps[-1] == 10
    assert all(math.isfinite(float(r.split(",")[2])) for r in rows[1:])
    assert sorted(p.name for p in (trained_run / "grids").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    grid = read_png(trained_run / "samples.png")
    assert grid.shape == (3, 2 + 8 * 10, 2 + 8 * 10)  # 8 x 8 images of 8 px with 2 px padding
    trajectory = read_png(trained_run / "reverse_process.png")
    assert trajectory.shape == (3, 2 + 8 * 10, 2 + 10 * 10)  # 8 rows, 10 columns (x_T ... x_0)
    assert not list(trained_run.glob("*.tmp"))


def test_checkpoint_holds_only_tensors_and_plain_values(trained_run, tmp_path):
    """ckpt.pt loads with weights_only=True; a file that would run code on load is refused."""
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "step", "epoch", "config", "rng"} <= set(ckpt)
    evil = tmp_path / "evil.pt"
    torch.save({"format": ddpm.CKPT_FORMAT, "payload": ddpm.UserError("x")}, evil)  # a pickled object
    with pytest.raises(ddpm.UserError, match="cannot load"):
        ddpm.load_checkpoint(evil)


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_sample_from_checkpoint(trained_run, tmp_path, fmt):
    """sample writes N images (PNG files or one uint8 (N, H, W, C) npz) and a grid, from the checkpoint alone."""
    out = tmp_path / "s"
    assert ddpm.main(["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--num-samples", "5", "--batch-size", "2",
                      "--format", fmt, "--out-dir", str(out), "--sampler", "ddim", "--sample-steps", "5", "--device", "cpu"]) == 0
    assert (out / "grid.png").exists()
    if fmt == "png":
        files = sorted((out / "images").iterdir())
        assert len(files) == 5
        img = read_png(files[0])
        assert img.shape == (3, 8, 8) and img.dtype == torch.uint8
        # a smaller run into the same folder would leave 3 of these beside its own (an FID would read both): refused
        assert ddpm.main(["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--num-samples", "2", "--out-dir", str(out),
                          "--device", "cpu"]) == 2
        assert sorted((out / "images").iterdir()) == files and torch.equal(read_png(files[0]), img)
        # one as large or larger replaces them all: allowed
        assert ddpm.main(["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--num-samples", "6", "--batch-size", "3",
                          "--out-dir", str(out), "--sampler", "ddim", "--sample-steps", "5", "--device", "cpu"]) == 0
        assert len(list((out / "images").iterdir())) == 6
    else:
        arr = np.load(out / "samples.npz")["arr_0"]
        assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8 and arr.std() > 0


def test_sample_is_reproducible_and_ddpm_uses_eval_mode(trained_run, tmp_path):
    """The same --seed gives the same images; the DDPM sampler runs on the model in eval() mode (no dropout)."""
    arrays = []
    for k in range(2):
        out = tmp_path / f"s{k}"
        assert ddpm.main(["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--num-samples", "3", "--format", "npz",
                          "--out-dir", str(out), "--device", "cpu", "--seed", "7"]) == 0
        arrays.append(np.load(out / "samples.npz")["arr_0"])
    assert np.array_equal(*arrays)


def test_forward_picture(image_dir, tmp_path):
    """forward writes a row per image, with x_0 and 10 noised columns."""
    assert ddpm.main(["forward", "--dataset", "folder", "--data-dir", str(image_dir), "--image-size", "8",
                      "--num-images", "3", "--out-dir", str(tmp_path)]) == 0
    img = read_png(tmp_path / "forward_process.png")
    assert img.shape == (3, 2 + 3 * 10, 2 + 11 * 10)


def test_grey_folder_gives_one_channel(tmp_path):
    """Channels follow the data: a folder of grey images trains a 1-channel model."""
    images = write_image_folder(tmp_path / "grey", n=16, channels=1)
    x = ddpm.load_dataset("folder", images, 8)
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.uint8


def state_of(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)


def test_resume_is_bit_identical(image_dir, tmp_path):
    """7 steps, stop, resume for 6 more equals 13 steps in one go, bit for bit (weights, EMA, Adam, step)."""
    common = ["--epochs", "10", "--sample-every", "0", "--dropout", "0.1"]
    assert ddpm.main(train_flags(image_dir, tmp_path / "once", *common, "--max-steps", "13")) == 0
    assert ddpm.main(train_flags(image_dir, tmp_path / "twice", *common, "--max-steps", "7")) == 0
    assert state_of(tmp_path / "twice")["step"] == 7  # stopped in the middle of epoch 2
    assert ddpm.main(train_flags(image_dir, tmp_path / "twice", "--resume", "--max-steps", "13")) == 0
    a, b = state_of(tmp_path / "once"), state_of(tmp_path / "twice")
    assert a["step"] == b["step"] == 13
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    rows = (tmp_path / "twice" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step") and int(rows[-1].split(",")[0]) == 13  # one log, appended


def test_resume_keeps_the_runs_flags_and_takes_typed_ones(image_dir, tmp_path):
    """--resume with only --out-dir takes the network, data and recipe from the checkpoint; a typed --max-steps applies."""
    out = tmp_path / "run"
    assert ddpm.main(train_flags(image_dir, out, "--max-steps", "3", "--lr", "1e-3", "--sample-every", "0")) == 0
    assert ddpm.main(["--resume", "--out-dir", str(out), "--max-steps", "6", "--device", "cpu"]) == 0
    ckpt = state_of(out)
    assert ckpt["step"] == 6 and ckpt["config"]["lr"] == 1e-3 and ckpt["config"]["base_channels"] == 32
    assert ckpt["config"]["data_dir"] == str(image_dir) and ckpt["config"]["max_steps"] == 6


def test_ctrl_c_and_sigterm_save_a_loadable_checkpoint(image_dir, tmp_path, monkeypatch):
    """SIGTERM and SIGINT stop after the current step with a checkpoint; so does a KeyboardInterrupt raised inside a step."""
    real_step, calls = ddpm.train_step, []

    def step_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt  # cut short before it changes anything
        out = real_step(*args, **kwargs)
        if len(calls) in (3, 6):  # as if the machine (SIGTERM) or the user (Ctrl-C) stopped us
            signal.raise_signal(signal.SIGTERM if len(calls) == 3 else signal.SIGINT)
        return out

    monkeypatch.setattr(ddpm, "train_step", step_then_stop)
    flags = train_flags(image_dir, tmp_path, "--epochs", "5", "--sample-every", "0")
    assert ddpm.main(flags) == 130 and state_of(tmp_path)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert ddpm.main(flags + ["--resume"]) == 130 and state_of(tmp_path)["step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert ddpm.main(flags + ["--resume"]) == 130
    assert state_of(tmp_path)["step"] == 8  # steps 7 and 8 completed, the 9th was cut short


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 4 stops the run, names the step, and leaves the step-2 checkpoint untouched."""
    real_losses, calls = ddpm.GaussianDiffusion.p_losses, []

    def nan_at_step_4(self, *args, **kwargs):
        calls.append(1)
        loss = real_losses(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(ddpm.GaussianDiffusion, "p_losses", nan_at_step_4)
    code = ddpm.main(train_flags(image_dir, tmp_path, "--epochs", "5", "--ckpt-every", "2", "--log-every", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "at step 4" in err and "holds step 2" in err and len(err.strip().splitlines()) == 1
    assert state_of(tmp_path)["step"] == 2


def test_full_disk_keeps_the_last_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint that cannot be written ends the run with one line; the one before it stays whole."""
    real_save, calls = torch.save, []

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    code = ddpm.main(train_flags(image_dir, tmp_path, "--epochs", "5", "--ckpt-every", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert state_of(tmp_path)["step"] == 2 and not (tmp_path / "ckpt.pt.tmp").exists()


def expect_error(argv, *words, capsys):
    code = ddpm.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("ddpm.py: error:"), err
    for word in words:
        assert word in err, (word, err)


def test_bad_input_gives_one_line_errors(image_dir, trained_run, tmp_path, capsys):
    """Each mistake ends with one line naming the flag or file, exit status 2, no traceback."""
    run = lambda *extra: train_flags(image_dir, tmp_path / "new", *extra)  # noqa: E731
    expect_error(run("--model", "unet"), "--model", "invalid choice", capsys=capsys)
    expect_error(["--dataset", "imagenet"], "--dataset", capsys=capsys)
    expect_error(run("--image-size", "7"), "divisible", "--image-size", capsys=capsys)
    expect_error(run("--base-channels", "48"), "multiples of 32", "--base-channels", capsys=capsys)
    expect_error(run("--channel-mult", "1,x"), "--channel-mult", capsys=capsys)
    expect_error(run("--batch-size", "0"), "--batch-size", capsys=capsys)
    # numbers out of range, each caught before any work with the flag's name and what it must be
    for flag, value, must in [("--channel-mult", "1,0", "positive"), ("--attn-resolutions", "-16", "positive"),
                              ("--timesteps", "1", "at least 2"), ("--lr", "-1", "more than 0"),
                              ("--lr", "nan", "more than 0"), ("--grad-clip", "0", "more than 0"),
                              ("--ema-decay", "1", "below 1"), ("--dropout", "1.5", "below 1"),
                              ("--warmup", "-5", "0 or more"), ("--max-steps", "-3", "0 or more"),
                              ("--ckpt-every", "-1", "0 or more"), ("--sample-every", "-1", "0 or more"),
                              ("--eta", "-1", "0 or more")]:
        expect_error(run(flag, value), flag, must, capsys=capsys)
    expect_error(["bench", "--sample-batch-size", "0"], "--sample-batch-size", capsys=capsys)
    expect_error(["forward", "--timesteps", "1"], "--timesteps", capsys=capsys)
    expect_error(run("--data-dir", str(tmp_path / "missing")), "--data-dir", "not a folder", capsys=capsys)
    (tmp_path / "empty").mkdir()
    expect_error(run("--data-dir", str(tmp_path / "empty")), "no .png/.jpg/.jpeg images", capsys=capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    expect_error(run("--out-dir", str(blocker / "out")), "--out-dir", "not writable", capsys=capsys)
    expect_error(["sample", "--ckpt", str(tmp_path / "none.pt")], "does not exist", capsys=capsys)
    data = (trained_run / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    expect_error(["sample", "--ckpt", str(tmp_path / "cut.pt")], "cannot load", "truncated", capsys=capsys)
    torch.save({"state_dict": torch.zeros(2)}, tmp_path / "other.pt")
    expect_error(["sample", "--ckpt", str(tmp_path / "other.pt")], "not a ddpm.py checkpoint", capsys=capsys)
    (tmp_path / "text.pt").write_text("hello")
    expect_error(["sample", "--ckpt", str(tmp_path / "text.pt")], "cannot load", capsys=capsys)
    expect_error(["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--sampler", "ddim", "--sample-steps", "50"],
                 "--sample-steps", capsys=capsys)
    # an existing run is never overwritten, and a resume may not change the network
    expect_error(train_flags(image_dir, trained_run), "exists", "--resume", capsys=capsys)
    before = (trained_run / "ckpt.pt").read_bytes()
    expect_error(train_flags(image_dir, trained_run, "--resume", "--base-channels", "64"),
                 "--base-channels 64 contradicts the checkpoint's 32", capsys=capsys)
    assert (trained_run / "ckpt.pt").read_bytes() == before


def test_wandb_without_the_package_is_a_clear_error(image_dir, tmp_path, monkeypatch, capsys):
    """--wandb without wandb installed ends with one line saying how to install it, before any work."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes "import wandb" fail, installed or not
    expect_error(train_flags(image_dir, tmp_path / "w", "--wandb"), "pip install wandb", capsys=capsys)
    assert not (tmp_path / "w").exists()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch, capsys):
    """Without internet, --dataset cifar10 ends with one line pointing to the files or to --dataset folder."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    expect_error(["--data-dir", str(tmp_path), "--device", "cpu", "--out-dir", str(tmp_path / "o")],
                 "could not get cifar10", "--dataset folder", capsys=capsys)


def test_out_of_gpu_memory_names_the_batch_flag(trained_run, tmp_path, monkeypatch, capsys):
    """A batch too big for the GPU ends with one line saying which flag to lower, not a traceback."""
    def too_big(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(ddpm, "run_sampler", too_big)
    expect_error(["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--device", "cpu", "--out-dir", str(tmp_path)],
                 "out of GPU memory", "--batch-size", capsys=capsys)


def test_failed_compile_names_the_flag(image_dir, tmp_path, monkeypatch, capsys):
    """--compile on a machine where inductor cannot build its kernels (no C compiler, say) ends with
    one line naming --compile and the way out, not a traceback."""
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", no_compiler)  # imports the module
    torch._dynamo.reset()
    expect_error(train_flags(image_dir, tmp_path / "run", "--compile", "default", "--max-steps", "2"),
                 "--compile failed", "C compiler", "run without --compile", capsys=capsys)
    torch._dynamo.reset()


def test_help_documents_every_flag():
    """Every flag of every command has a help text, and each one with a value names its default."""
    _, commands = ddpm.build_parser()
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if action.nargs != 0 and action.dest not in ("ckpt",):
                assert "default" in action.help, (name, action.dest)


def test_bench_runs_on_cpu(capsys):
    """bench prints training and sampling images/s for a small model on the CPU, and with
    --profile the operators of the profiled steps (convolutions among them) and a line that splits
    a step's time by family, adding up to the profiler's own total."""
    flags = ["bench", *TINY_FLAGS, "--model", "res", "--batch-size", "4", "--sample-batch-size", "4",
             "--steps", "2", "--warmup-steps", "1", "--device", "cpu"]
    assert ddpm.main([*flags, "--profile", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("train", "sample"):
        line = next(l for l in out.splitlines() if l.startswith(row))
        assert float(line.split()[2].replace(",", "")) > 0
    assert "aten::convolution_backward" in out
    # the verdict line: the time per step by family, which add up to the total it states (five
    # numbers rounded to 0.01 ms: within 0.025)
    line = next(l for l in out.splitlines() if l.startswith("profiled 2 training steps"))
    total = float(line.split("CPU time: ")[1].split(" ms")[0])
    families = {part.rsplit(" ", 1)[0]: float(part.rsplit(" ", 1)[1]) for part in line.split(" ms = ")[1].split(", ")}
    assert set(families) == {"convolution/matmul", "attention", "fused by inductor", "other"}
    assert families["convolution/matmul"] > 0 and abs(sum(families.values()) - total) < 0.03
    # and the total is the profiler's own (its table's footer), per step
    value, unit = re.search(r"Self CPU time total: ([\d.]+)(ms|s)\b", out).groups()
    assert total == pytest.approx(float(value) * (1e3 if unit == "s" else 1) / 2, rel=0.01)
    expect_error([*flags, "--profile", "-1"], "--profile", "0 or more", capsys=capsys)


def test_kernel_family_sorts_real_kernel_names():
    """The GPU kernel names of a compiled bf16 step (cuDNN, cuBLAS/CUTLASS, flash and
    memory-efficient attention, inductor's Triton, eager ATen, cuDNN's layout transposes) land in
    the right family."""
    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_cudnn": "convolution/matmul",
        "sm80_xmma_wgrad_implicit_gemm_indexed_wo_smem_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution/matmul",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>": "convolution/matmul",
        "aten::mkldnn_convolution": "convolution/matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<256>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bf16>)": "attention",
        "triton_red_fused_native_group_norm_silu_0": "fused by inductor",
        "triton_poi_fused_convolution_backward_12": "fused by inductor",
        "## Call CompiledFxGraph ftys5sliipnoksvahbzd65a6v3yyto27": "fused by inductor",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>": "other",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "other",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other",
        "Memcpy DtoD (Device -> Device)": "other",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>": "other",
        "void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>": "other",
    }
    for name, family in names.items():
        assert ddpm.kernel_family(name) == family, name


def ddp_worker(rank, world, port, image_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    saves = []
    real_save = ddpm.save_checkpoint
    ddpm.save_checkpoint = lambda *a: saves.append(1) or real_save(*a)
    args = ddpm.parse_args(train_flags(image_dir, out_dir, "--max-steps", "3", "--sample-every", "0", "--dropout", "0.0"))
    net = ddpm.train(args)
    torch.save({"params": net.state_dict(), "saves": len(saves)}, out_dir.parent / f"rank{rank}.pt")


def test_ddp_two_gloo_processes_stay_in_sync(image_dir, tmp_path):
    """torchrun-style DDP with 2 Gloo processes: identical weights after training, one checkpoint, written by rank 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(2, port, image_dir, tmp_path / "run"), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert (r0["saves"], r1["saves"]) == (1, 0)
    assert state_of(tmp_path / "run")["step"] == 3


def test_compare_tabulates_loss_curves(tmp_path, capsys):
    """compare prints each run's mean loss over 8 stretches of steps, from the rows of log.csv."""
    for name, scale in [("a", 1.0), ("b", 2.0)]:
        (tmp_path / name).mkdir()
        rows = ["step,epoch,loss,lr,grad_norm,images_per_s,elapsed_s"]
        rows += [f"{s},0,{scale * s},1e-4,1.0,10.0,1.0" for s in range(10, 161, 10)]
        (tmp_path / name / "log.csv").write_text("\n".join(rows) + "\n")
    assert ddpm.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["steps", "a", "b"] and len(lines) == 9
    assert lines[1].split() == ["0-20", "15.0000", "30.0000"]  # rows 10 and 20
    assert lines[-1].split() == ["140-160", "155.0000", "310.0000"]
    expect_error(["compare", str(tmp_path / "missing")], "log.csv", capsys=capsys)


README = Path(ddpm.__file__).with_name("README.md")


def readme_commands(text):
    """The arguments of every ddpm.py command in the README: in bash blocks and inline code."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split(" #")[0].split("&&"):
                tokens = shlex.split(part)
                if "ddpm.py" in tokens:
                    commands.append(tokens[tokens.index("ddpm.py") + 1:])
    for inline in re.findall(r"`python ddpm\.py([^`]*)`", text.replace("\n", " ")):
        commands.append(shlex.split(inline))
    return commands


def test_readme_commands_parse_and_pictures_exist():
    """Every ddpm.py command line in the README is accepted by the parser; every picture it shows is in assets/ and small."""
    text = README.read_text()
    commands = readme_commands(text)
    assert len(commands) >= 15
    for argv in commands:
        if "--help" in argv:
            with pytest.raises(SystemExit) as done:
                ddpm.parse_args(argv)
            assert done.value.code == 0
        else:
            ddpm.parse_args(argv)  # raises UserError (one line) for any flag or value it does not take
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(pictures) >= 3
    for path in pictures:
        assert path.startswith("assets/") and (README.parent / path).is_file(), path
        assert (README.parent / path).stat().st_size < 400_000, path


def test_readme_setup_commands_and_ci_agree():
    """The README gives the two set-up commands (train, test), and .ci/run runs the test one."""
    text = README.read_text()
    test_command = "pip install -r requirements.txt pytest && python -m pytest -q"
    assert "pip install -r requirements.txt && python ddpm.py --model res_att --epochs 100" in text
    assert test_command in text and test_command in (README.parent / ".ci" / "run").read_text()
