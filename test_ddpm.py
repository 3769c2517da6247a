"""Tests for ddpm.py, in the order of the file: Part I (the math) against float64 references and
closed forms, Part II (the networks), Part III (training and sampling), the extras (DDIM and
guidance), then the engineering (the commands, driven through main()).

CPU only, offline, fixed seeds; the data is generated here. Run: python -m pytest -q
"""

import ast
import contextlib
import copy
import csv
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import warnings
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
TINY = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
TINY["image_size"] = 8
TINY_FLAGS = "--image-size 8 --base-channels 32 --channel-mult 1,2 --num-res-blocks 1".split()
TINY_FLAGS += "--attn-resolutions 4 --timesteps 20".split()
SOURCE = Path(ddpm.__file__).read_text()
BANNER = "#   The end of the method."


TORCH_HOME = str(Path(torch.hub.get_dir()).parent)  # where pytorch-fid's weights are, if anywhere


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    """Each test caches FID references in a fresh folder, never in the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("TORCH_HOME", TORCH_HOME)  # torch.hub's folder stays where it was


def linear_diffusion(T=1000, beta_end=0.02):
    return ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(T, 1e-4, beta_end))


def float64_schedule(T=1000):
    """The paper's quantities recomputed independently in float64 with numpy."""
    betas = np.linspace(1e-4, 0.02, T)
    alphas_cumprod = np.cumprod(1 - betas)
    return betas, alphas_cumprod, np.append(1.0, alphas_cumprod[:-1])


def plain_form_violations(source):
    """(line, form) for each form that STYLE.md's "cut, do not compress" rules out in source."""
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    returns_tuple = set()  # the module's functions that return a tuple: records by position
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            returned = [n.value for n in ast.walk(node) if isinstance(n, ast.Return)]
            if any(isinstance(value, ast.Tuple) for value in returned):
                returns_tuple.add(node.name)
    tables = set()  # module-level ALL_CAPS names: tables whose rows are reached by name
    for node in tree.body:
        if isinstance(node, ast.Assign):
            tables |= {t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()}
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.NamedExpr):
            found.append((line, "walrus"))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            found.append((line, "lambda bound to a name"))
        if isinstance(node, ast.IfExp):
            inner = [n for n in ast.walk(node) if n is not node]
            if any(isinstance(n, ast.IfExp) for n in inner):
                found.append((line, "nested ternary"))
        if isinstance(node, ast.Assign) and len(node.targets) > 1:
            found.append((line, "chained assignment"))
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
            value = node.value  # allowed: a call's results, a shape, a simultaneous update
            if isinstance(value, ast.Tuple) and not all(isinstance(v, ast.Name) for v in value.elts):
                found.append((line, "several names in one assignment"))
            if isinstance(value, ast.Name):
                found.append((line, "a record unpacked by position"))
        if isinstance(node, ast.Call):
            if len(node.args) > 4:
                found.append((line, "more than four positional arguments"))
            function = getattr(node.func, "id", getattr(node.func, "attr", ""))
            for arg in node.args:  # but getattr's, get's and pop's default: they take no keywords
                bare = isinstance(arg, ast.Constant) and any(arg.value is v for v in (True, False, None))
                if bare and function not in ("getattr", "get", "pop"):
                    found.append((line, "a bare True/False/None"))
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            by_position = isinstance(node.slice, ast.Slice) or (
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)
            )
            if node.value.id in tables and by_position:
                found.append((line, "a table row reached by its index"))
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):
            function = getattr(node.value.func, "id", "")
            by_position = isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)
            if function in returns_tuple and by_position:
                found.append((line, "a result reached by its index"))
        if isinstance(node, ast.Starred) and isinstance(node.value, ast.Subscript):
            if isinstance(node.value.slice, ast.Constant) and isinstance(node.value.slice.value, str):
                found.append((line, "a record's field splatted into a call"))
        names = []  # an order of rank and world: in a signature, a call or an assignment
        if isinstance(node, ast.FunctionDef):
            names = [a.arg for a in node.args.args + node.args.kwonlyargs]
        if isinstance(node, ast.Call):
            names = [a.id for a in node.args if isinstance(a, ast.Name)]
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
            names = [t.id for t in node.targets[0].elts if isinstance(t, ast.Name)]
        if "rank" in names and "world" in names and names.index("world") < names.index("rank"):
            found.append((line, "world before rank"))
        if not isinstance(node, ast.FunctionDef):
            continue
        built = set()  # the function's names bound to a tuple or list literal
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Assign, ast.AugAssign)):
                targets = getattr(inner, "targets", [getattr(inner, "target", None)])
                for target in targets:
                    if isinstance(target, ast.Name) and target.id in defined:
                        found.append((inner.lineno, f"a local that shadows {target.id}()"))
                    if isinstance(target, ast.Name) and isinstance(inner.value, (ast.Tuple, ast.List)):
                        built.add(target.id)
        for call in ast.walk(node):
            for arg in getattr(call, "args", []) if isinstance(call, ast.Call) else []:
                splatted = arg.value if isinstance(arg, ast.Starred) else None
                if isinstance(splatted, ast.Subscript):
                    splatted = splatted.value
                if isinstance(splatted, ast.Name) and splatted.id in built:
                    found.append((call.lineno, "a tuple built to be splatted into a call"))
    return sorted(set(found))


PLANTED = {  # an example of each form that plain_form_violations must catch
    "walrus": "if (n := 3):\n    pass",
    "lambda bound to a name": "f = lambda x: x",
    "nested ternary": "a = 1 if b else 2 if c else 3",
    "chained assignment": "a = b = 0",
    "several names in one assignment": "log_row, save = step % 10 == 0, step == last",
    "a record unpacked by position": "def f(row):\n    step, loss = row",
    "more than four positional arguments": "f(a, b, c, d, e)",
    "a bare True/False/None": "p_sample_loop(diffusion, model, shape, True)",
    "a table row reached by its index": "FLAGS = [1]\nx = [*FLAGS[7:10]]\ny = FLAGS[8]",
    "world before rank": "def restore(training, world, rank):\n    pass",
    "a local that shadows parts()": "def parts():\n    pass\ndef f():\n    parts = 1",
    "a tuple built to be splatted into a call": "def f():\n    how = (1, 2, 3)\n    g(*how[1:])",
    "a result reached by its index": "def load():\n    return x, y\nimages = load()[0]",
    "a record's field splatted into a call": "fid = distance(a, b, *scoring['reference'])",
}


@pytest.mark.parametrize("form", list(PLANTED))
def test_the_style_check_catches_each_compressed_form(form):
    """plain_form_violations finds a planted example of each form STYLE.md rules out."""
    assert form in {found for _, found in plain_form_violations(PLANTED[form])}


def test_file_budget_and_plain_forms():
    """ddpm.py: the method (Parts I-III, up to the banner) at most 650 non-blank lines, the file at
    most 1,900 (a ceiling against accretion, not a target); no definition after the banner longer
    than 120 lines; no line over 100 characters up to the banner or 110 after it; none of the forms
    of plain_form_violations anywhere (STYLE.md: cut, do not compress)."""
    lines = SOURCE.splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith(BANNER))

    def nonblank(part):
        return sum(1 for line in part if line.strip())

    assert nonblank(lines[:banner]) <= 650 and nonblank(lines) <= 1900
    assert max(len(line) for line in lines[:banner]) <= 100
    assert max(len(line) for line in lines[banner:]) <= 110
    for node in ast.parse(SOURCE).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno > banner:
            assert nonblank(lines[node.lineno - 1 : node.end_lineno]) <= 120, node.name
    assert plain_form_violations(SOURCE) == []


# -----------------------------------------------------------------------------
# Part I: the schedule and the buffers
# -----------------------------------------------------------------------------


def test_linear_schedule_matches_float64_reference():
    """alpha_bar = cumprod(1 - beta) in float64; endpoints, monotone in (0, 1), alpha_bar_T =
    4.04e-5 [Sec. 4]."""
    betas = ddpm.linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    ref_betas, ref_ac, _ = float64_schedule()
    np.testing.assert_allclose(betas.numpy(), ref_betas, rtol=1e-12)
    d = linear_diffusion()
    assert all(buf.dtype == torch.float32 for buf in d.buffers())
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref_ac, rtol=1e-6)
    ac = d.alphas_cumprod
    assert ((ac > 0) & (ac < 1)).all() and (ac[1:] < ac[:-1]).all()
    assert abs(ac[-1].item() - 4.04e-5) < 0.01e-5


def test_schedule_rejects_bad_arguments():
    """T < 2, a non-integer T and beta ranges outside (0, 1) raise ValueError, and so do bad
    betas."""
    for args in [(1,), (10.5,), (10, 0.0, 0.02), (10, 0.03, 0.02), (10, 1e-4, 1.0)]:
        with pytest.raises(ValueError):
            ddpm.linear_beta_schedule(*args)
    for betas in [[0.1], [0.1, 1.0], [[0.1, 0.2]]]:
        with pytest.raises(ValueError):
            ddpm.GaussianDiffusion(torch.tensor(betas))


def test_buffers_match_float64_formulas():
    """beta_tilde and the posterior coefficients [Eq. 7], 1/sqrt(alpha) [Eq. 11] and the x_0 ones
    [Eq. 15] against float64; beta_tilde_1 = 0."""
    d = linear_diffusion()
    betas, ac, acp = float64_schedule()
    assert d.posterior_variance[0].item() == 0.0
    np.testing.assert_allclose(d.posterior_variance.numpy(), betas * (1 - acp) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(d.posterior_mean_coef1.numpy(), betas * np.sqrt(acp) / (1 - ac), rtol=1e-5)
    np.testing.assert_allclose(
        d.posterior_mean_coef2.numpy(), (1 - acp) * np.sqrt(1 - betas) / (1 - ac), rtol=1e-5
    )
    np.testing.assert_allclose(d.sqrt_recip_alphas.numpy(), 1 / np.sqrt(1 - betas), rtol=1e-6)
    np.testing.assert_allclose(d.sqrt_recip_alphas_cumprod.numpy(), 1 / np.sqrt(ac), rtol=1e-5)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod.numpy(), np.sqrt(1 / ac - 1), rtol=1e-5)


def test_every_buffer_is_used():
    """Each buffer of GaussianDiffusion is read as an attribute somewhere in ddpm.py's code (no
    dead buffers): a mention in a comment or a string does not count."""
    reads = {
        node.attr
        for node in ast.walk(ast.parse(SOURCE))  # the parse drops comments; strings are Constants
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
    }
    for name, _ in linear_diffusion(10).named_buffers():
        assert name in reads, name


def test_extract_gathers_per_sample_and_broadcasts_on_the_buffers_device():
    """extract(a, t, shape) == a[t] shaped (B, 1, 1, 1), on a's device, whatever t's device."""
    a = torch.arange(10.0) * 3
    t = torch.tensor([0, 9, 4])
    out = ddpm.extract(a, t, (3, 2, 5, 5))
    assert out.shape == (3, 1, 1, 1) and out.device == a.device
    assert out.flatten().tolist() == [0.0, 27.0, 12.0]
    on_meta = ddpm.extract(a.to("meta"), t, (3, 2, 5, 5))  # t stays on the CPU: moved to a's device
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 1, 1, 1)


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
    """Samples of q(x_t | x_0) have mean sqrt(alpha_bar) x_0 and variance 1 - alpha_bar [Eq. 4],
    within 5 standard errors."""
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
    """L_simple [Eq. 14] is 0 for a perfect eps-predictor and E[eps^2] for a zero one; t covers
    {0..T-1} uniformly [Alg. 1, line 3]."""
    torch.manual_seed(0)
    T = 10
    d = linear_diffusion(T, 0.2)
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
# Part I: one reverse step
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
    """q(x_{t-1} | x_t, x_0) [Eq. 6-7] equals the conditional of the jointly Gaussian (x_{t-1}, x_t)
    given x_0, in float64."""
    d = linear_diffusion()
    betas, ac, acp = float64_schedule()
    x_0, x_t = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    mean, var = d.q_posterior(x_0, x_t, t)
    for k, tk in enumerate(t.tolist()):
        # x_{t-1} ~ N(sqrt(acp) x_0, 1 - acp); x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e
        cov = math.sqrt(1 - betas[tk]) * (1 - acp[tk])  # Cov(x_{t-1}, x_t | x_0)
        ref_mean = math.sqrt(acp[tk]) * x_0[k].double() + cov / (1 - ac[tk]) * (
            x_t[k].double() - math.sqrt(ac[tk]) * x_0[k].double()
        )
        ref_var = (1 - acp[tk]) - cov**2 / (1 - ac[tk])
        torch.testing.assert_close(mean[k].double(), ref_mean, atol=1e-5, rtol=1e-5)
        assert var[k].item() == pytest.approx(ref_var, rel=1e-5)


def toy_model(x_t, t):
    """A fixed, nonlinear stand-in for eps_theta that depends on x_t and t."""
    return torch.tanh(0.8 * x_t) + 0.01 * t.float()[:, None, None, None].sin()


def test_eps_form_mean_equals_posterior_mean():
    """mu_tilde(x_t, x_0(eps)) [Eq. 7] equals (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) /
    sqrt(alpha_t) [Eq. 11]: so p_sample's clipped route equals its Eq. 11 route wherever the clip
    changes nothing."""
    d = linear_diffusion()
    betas, ac, _ = float64_schedule()
    x_t = torch.randn(5, 3, 4, 4)
    t = torch.tensor([1, 5, 100, 600, 999])
    eps = toy_model(x_t, t)
    mean, _ = d.q_posterior(d.predict_x0_from_eps(x_t, t, eps), x_t, t)
    b = torch.from_numpy(betas[t]).reshape(5, 1, 1, 1)  # beta_t
    a = torch.from_numpy(ac[t]).reshape(5, 1, 1, 1)  # alpha_bar_t
    ref = (x_t.double() - b / (1 - a).sqrt() * eps.double()) / (1 - b).sqrt()  # Eq. 11
    torch.testing.assert_close(mean.double(), ref, atol=2e-5, rtol=1e-5)
    x_t, small = torch.rand(5, 3, 4, 4) - 0.5, 0.01 * torch.randn(5, 3, 4, 4)
    z = torch.randn(5, 3, 4, 4)
    clipped, plain = (d.p_sample(lambda x, t: small, x_t, 10, z, clip) for clip in (True, False))
    x_0_pred = d.predict_x0_from_eps(x_t, torch.full((5,), 10), small)
    assert x_0_pred.abs().max() < 1  # the clip is idle
    torch.testing.assert_close(clipped, plain, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_p_sample_without_clipping_is_algorithm_2(variance):
    """p_sample(clip_denoised=False) equals Alg. 2, line 4 in float64, with sigma^2 = beta_t or
    beta_tilde_t."""
    d = linear_diffusion()
    betas, ac, acp = float64_schedule()
    x_t, z = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    for t in [1, 37, 999]:
        out = d.p_sample(toy_model, x_t, t, noise=z, clip_denoised=False, variance=variance)
        eps = toy_model(x_t, torch.full((3,), t)).double()
        sigma2 = betas[t] if variance == "fixedlarge" else betas[t] * (1 - acp[t]) / (1 - ac[t])
        ref = (x_t.double() - betas[t] / math.sqrt(1 - ac[t]) * eps) / math.sqrt(1 - betas[t]) + math.sqrt(
            sigma2
        ) * z.double()
        torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="variance"):
        d.p_sample(toy_model, x_t, 1, variance="learned")


def test_last_step_adds_no_noise_and_clipping_bounds_x0():
    """At t = 0 (paper t = 1) z = 0 [Alg. 2, line 3]; with clipping the mean uses x_0 clipped to
    [-1, 1]."""
    d = linear_diffusion()
    x_t = torch.randn(4, 3, 4, 4) * 3
    a = d.p_sample(toy_model, x_t, 0, noise=torch.randn_like(x_t))
    b = d.p_sample(toy_model, x_t, 0, noise=torch.randn_like(x_t))
    assert torch.equal(a, b)
    t = torch.full((4,), 0)
    x_0 = d.predict_x0_from_eps(x_t, t, toy_model(x_t, t))
    assert x_0.abs().max() > 1  # the clip has work to do
    torch.testing.assert_close(a, d.q_posterior(x_0.clamp(-1, 1), x_t, t)[0])


# -----------------------------------------------------------------------------
# Part I: the variational bound in bits/dim
# -----------------------------------------------------------------------------


def official_terms_bpd(x_0, x_t, t, eps, betas, variance, clip_denoised=True):
    """The official _vb_terms_bpd and _prior_bpd (diffusion_utils_2.py, utils.py) written again
    in numpy float64, from the schedule betas: (terms (B,), prior (B,)) in bits/dim."""
    ac = np.cumprod(1 - betas)
    acp = np.append(1.0, ac[:-1])
    pv = betas * (1 - acp) / (1 - ac)
    q_log_var = np.log(np.append(pv[1], pv[1:]))  # posterior_log_variance_clipped
    p_log_var = {"fixedlarge": np.log(np.append(pv[1], betas[1:])), "fixedsmall": q_log_var}
    p_log_var = p_log_var[variance][t][:, None, None, None]
    coef1 = (betas * np.sqrt(acp) / (1 - ac))[t][:, None, None, None]
    coef2 = ((1 - acp) * np.sqrt(1 - betas) / (1 - ac))[t][:, None, None, None]
    a = ac[t][:, None, None, None]
    x_0_pred = x_t / np.sqrt(a) - np.sqrt(1 / a - 1) * eps
    if clip_denoised:
        x_0_pred = np.clip(x_0_pred, -1, 1)
    true_mean = coef1 * x_0 + coef2 * x_t
    model_mean = coef1 * x_0_pred + coef2 * x_t

    def kl(m1, lv1, m2, lv2):
        return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

    def cdf(x):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    kl_t = kl(true_mean, q_log_var[t][:, None, None, None], model_mean, p_log_var)
    inv_stdv = np.exp(-0.5 * p_log_var)
    cdf_plus = cdf(inv_stdv * (x_0 - model_mean + 1 / 255))
    cdf_min = cdf(inv_stdv * (x_0 - model_mean - 1 / 255))
    log_p = np.where(
        x_0 < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(
            x_0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
        ),
    )
    B = len(t)
    kl_bits = kl_t.reshape(B, -1).mean(1) / np.log(2)
    nll_bits = -log_p.reshape(B, -1).mean(1) / np.log(2)
    prior = kl(np.sqrt(ac[-1]) * x_0, np.log(1 - ac[-1]), 0.0, 0.0)
    return np.where(t == 0, nll_bits, kl_bits), prior.reshape(B, -1).mean(1) / np.log(2)


def random_pixels(shape, seed=0):
    """uint8 images as the bound sees them, x = uint8 / 127.5 - 1, with both edge values present."""
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0] = 0  # the open bin (-inf, -1 + 1/255]
    x[:, 0, 0, 1] = 255  # the open bin [1 - 1/255, inf)
    return x.double() / 127.5 - 1


def test_vb_term_and_prior_bpd_match_the_official_formulas():
    """vb_term (L_0 [Eq. 13] at t = 0, the KLs L_{t-1} [Eq. 5] after) and prior_bpd (L_T) equal
    the official code's formulas in numpy float64, for a network and a plain callable, t mixed."""
    torch.manual_seed(0)
    T = 20
    d = linear_diffusion(T, 0.2).double()
    betas = np.linspace(1e-4, 0.2, T)
    net = randomized(ddpm.ResAttUNet(**TINY)).eval()
    weights = torch.randn(3, 8, 8, dtype=torch.float64)

    def network(x_t, t):  # in float32, as a network under autocast runs in a lower precision
        return net(x_t.float(), t)

    def plain(x_t, t):  # a fixed random per-pixel map, in float64
        return weights * x_t + 0.1 * t[:, None, None, None]

    x_0 = random_pixels((6, 3, 8, 8))
    t = torch.tensor([0, 5, 0, 19, 1, 12])
    x_t = d.q_sample(x_0, t, torch.randn_like(x_0))
    with torch.no_grad():
        eps_network = network(x_t, t).double()
    # the network once per variance (with the clip, as evaluated); the callable with and without
    cases = [(network, eps_network, True), (plain, plain(x_t, t), True), (plain, plain(x_t, t), False)]
    for variance in ["fixedlarge", "fixedsmall"]:
        for model, eps, clip in cases:
            with torch.no_grad():
                terms = d.vb_term(model, x_0, x_t, t, variance, clip_denoised=clip)
            ref, ref_prior = official_terms_bpd(
                x_0.numpy(), x_t.numpy(), t.numpy(), eps.numpy(), betas, variance, clip
            )
            assert terms.shape == (6,) and terms.dtype == torch.float64
            np.testing.assert_allclose(terms.numpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d.prior_bpd(x_0).numpy(), ref_prior, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="variance"):
        d.vb_term(plain, x_0, x_t, t, variance="learned")


def test_bits_per_dim_of_a_perfect_denoiser():
    """With eps_theta = the true noise, an image of all 128s has L = 1.7920844 bits/dim with
    sigma^2 = beta ("fixedlarge") and 1.3056651 with beta_tilde [Eq. 5, 13; Sec. 3.2]; with
    beta_tilde every KL is 0 and L = L_0 + L_T."""
    d = linear_diffusion(1000).double()
    x_0 = torch.full((2, 3, 4, 4), 128 / 127.5 - 1, dtype=torch.float64)

    def true_noise(x_t, t):  # eps from x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        scaled_x_0 = ddpm.extract(d.sqrt_alphas_cumprod, t, x_t.shape) * x_0
        return (x_t - scaled_x_0) / ddpm.extract(d.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    g = torch.Generator().manual_seed(0)
    large = d.vb_terms(true_noise, x_0, "fixedlarge", generator=g)  # (B, T)
    small = d.vb_terms(true_noise, x_0, "fixedsmall", generator=g)
    prior = d.prior_bpd(x_0)
    # the float32 buffers (rounded, then made float64) move the totals by ~2e-7
    np.testing.assert_allclose((large.sum(1) + prior).numpy(), 1.7920844, atol=1e-6)
    np.testing.assert_allclose((small.sum(1) + prior).numpy(), 1.3056651, atol=1e-6)
    assert small[:, 1:].abs().max() < 1e-9  # the same Gaussians: every L_{t-1}, t > 1, is 0
    torch.testing.assert_close(large[:, 0], small[:, 0])  # one decoder variance: beta_tilde_2
    total = d.bits_per_dim(true_noise, x_0.float(), generator=g)  # in float32 as in use
    np.testing.assert_allclose(total.numpy(), 1.7920844, atol=1e-5)


def test_decoder_probabilities_sum_to_one():
    """The discretized decoder [Eq. 13] gives the 256 pixel values probabilities that sum to 1,
    for means inside and outside [-1, 1] and scales from 1e-3 to 2."""
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1)[:, None, None]  # (256, 1, 1)
    means = torch.tensor([-1.2, -1.0, -0.3, 0.0, 0.004, 0.9, 1.1], dtype=torch.float64)
    log_scales = torch.tensor([1e-3, 0.01, 0.1, 1.0, 2.0], dtype=torch.float64).log()
    log_p = ddpm.discretized_gaussian_log_likelihood(x, means[:, None], log_scales[None, :])
    assert log_p.shape == (256, 7, 5) and (log_p <= 0).all()
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(7, 5, dtype=torch.float64))


def test_bits_per_dim_is_vb_terms_plus_prior_with_a_fresh_x_t_per_step():
    """bits_per_dim = sum of vb_terms + prior_bpd [Eq. 5], and column t of vb_terms is vb_term
    at code t on its own x_t ~ q(x_t | x_0) [Eq. 4], drawn from the generator step by step."""
    T = 20
    d = linear_diffusion(T, 0.2)
    x_0 = random_pixels((2, 3, 4, 4)).float()  # under 100 numbers: torch's ops stay serial
    terms = d.vb_terms(toy_model, x_0, "fixedsmall", generator=torch.Generator().manual_seed(3))
    assert terms.shape == (2, T) and terms.isfinite().all()
    g = torch.Generator().manual_seed(3)
    for t in range(T):
        t_batch = torch.full((2,), t)
        x_t = d.q_sample(x_0, t_batch, torch.randn(x_0.shape, generator=g))
        by_hand = d.vb_term(toy_model, x_0, x_t, t_batch, "fixedsmall")
        torch.testing.assert_close(terms[:, t], by_hand, atol=0, rtol=0)
    total = d.bits_per_dim(toy_model, x_0, "fixedsmall", torch.Generator().manual_seed(3))
    torch.testing.assert_close(total, terms.sum(1) + d.prior_bpd(x_0), atol=0, rtol=0)
    other = d.vb_terms(toy_model, x_0, "fixedsmall", generator=torch.Generator().manual_seed(4))
    assert (other[:, 1:] != terms[:, 1:]).all()  # another seed: other x_t at every step


# -----------------------------------------------------------------------------
# Part II: the networks
# -----------------------------------------------------------------------------


def test_timestep_embedding_is_sinusoidal():
    """The embedding is [sin(t w_i), cos(t w_i)] with w_i = 10000^(-i / (half - 1)) [Sec. 4,
    official code]."""
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


def test_attention_is_softmax_over_the_keys():
    """attention() is float64 softmax(q k^T / sqrt(C)) v with weights summing to 1 over the keys
    (not the queries), F.scaled_dot_product_attention computes the same, and AttnBlock is x +
    proj_out of it."""
    torch.manual_seed(0)
    block = randomized(ddpm.AttnBlock(32)).double()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    B, C, H, W = x.shape
    qkv = block.qkv(block.norm(x)).reshape(B, 3, C, H * W)  # (B, 3, C, N)
    q, k, v = qkv.transpose(2, 3).unbind(1)  # (B, N, C) each
    scores = q @ k.transpose(1, 2) / math.sqrt(C)  # (B, N queries, N keys)
    weights = scores.softmax(dim=-1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H * W, dtype=torch.float64))
    torch.testing.assert_close(ddpm.attention(q, k, v), weights @ v)
    torch.testing.assert_close(nn.functional.scaled_dot_product_attention(q, k, v), weights @ v)

    def attend(w):  # x + proj_out(w v) for attention weights w
        return x + block.proj_out((w @ v).transpose(1, 2).reshape(B, C, H, W))

    out = block(x)
    torch.testing.assert_close(out, attend(weights))
    assert (out - attend(scores.softmax(dim=-2))).abs().max() > 1e-3  # the original project's bug


def test_attention_q_k_v_start_as_three_layers():
    """q, k and v are initialised as three C x C layers (fan_avg over C and C, std sqrt(2 / 2C) =
    0.0625 at C = 256), as in the official code, not as one C x 3C layer (0.0442) [App. B]."""
    torch.manual_seed(0)
    block = ddpm.AttnBlock(256)
    for w in block.qkv.weight.detach().chunk(3):  # each (C, C, 1, 1)
        assert w.std().item() == pytest.approx(0.0625, rel=0.01)  # 65,536 draws: std error 0.3%
        assert w.abs().max() <= math.sqrt(6 / 512)  # the uniform's bound
    assert block.qkv.bias.abs().max() == 0 and block.proj_out.weight.abs().max() == 0


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
    d = linear_diffusion(20)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    for _ in range(3):
        opt.zero_grad()
        d.p_losses(model, x_0).backward()
        opt.step()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_paper_network_has_35746307_parameters_and_docstrings_agree():
    """ResAttUNet() is the paper's CIFAR-10 network: 35,746,307 parameters; each class's docstring
    states its own count."""
    counts = {name: ddpm.count_parameters(cls()) for name, cls in ddpm.MODELS.items()}
    assert counts["res_att"] == 35_746_307
    for name, cls in ddpm.MODELS.items():
        stated = re.search(r"([\d,]+)\s+parameters\s+at\s+the\s+defaults", cls.__doc__).group(1)
        assert int(stated.replace(",", "")) == counts[name], name


def test_paper_network_structure():
    """22 residual blocks, 6 attention blocks (5 at 16x16 + the middle), 3 down/up samplers (padded
    right and bottom); zero-initialised outputs [App. B]; the ablations have no attention (res) and
    no shortcut (conv)."""
    model = ddpm.ResAttUNet()
    mods = list(model.modules())

    def count(cls, modules=mods):
        return sum(type(m) is cls for m in modules)

    kinds = (ddpm.ResBlock, ddpm.AttnBlock, nn.ZeroPad2d, nn.Upsample)
    assert [count(c) for c in kinds] == [22, 6, 3, 3]
    pads = [m.padding for m in mods if isinstance(m, nn.ZeroPad2d)]
    assert all(p == (0, 1, 0, 1) for p in pads)  # TensorFlow's "SAME", stride 2
    assert all(m.num_groups == 32 for m in mods if isinstance(m, nn.GroupNorm))
    assert all(m.p == 0.1 for m in mods if isinstance(m, nn.Dropout))
    zero = [m.conv2.weight for m in mods if isinstance(m, ddpm.ResBlock)]
    zero += [m.proj_out.weight for m in mods if isinstance(m, ddpm.AttnBlock)]
    zero.append(model.conv_out.weight)
    assert all(w.abs().max() == 0 for w in zero)
    assert ddpm.count_parameters(model.temb) == 128 * 512 + 512 + 512 * 512 + 512
    x = torch.randn(1, 3, 32, 32)
    hits = []
    for m in mods:
        if isinstance(m, ddpm.AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: hits.append(inp[0].shape[-1]))
    model.eval()(x, torch.tensor([5]))
    assert hits == [16, 16, 4, 16, 16, 16]  # down 2, middle (4x4), up 3
    res, conv = list(ddpm.ResUNet().modules()), list(ddpm.ConvUNet().modules())
    assert (count(ddpm.ResBlock, res), count(ddpm.AttnBlock, res)) == (22, 0)
    assert [count(c, conv) for c in (ddpm.ConvBlock, ddpm.ResBlock, ddpm.AttnBlock)] == [22, 0, 0]


def test_bad_network_sizes_raise_with_the_constraint():
    """An image size the levels cannot halve and widths GroupNorm(32) cannot split raise ValueError
    naming the rule."""
    with pytest.raises(ValueError, match="divisible"):
        ddpm.ResAttUNet(image_size=30)
    with pytest.raises(ValueError, match="multiples of 32"):
        ddpm.ConvUNet(base_channels=48)


@pytest.mark.parametrize("name", list(ddpm.MODELS))
def test_tiny_model_overfits_a_fixed_batch(name):
    """On one fixed (x_0, t, eps) a tiny model drives L_simple down at least 100-fold in 100 Adam
    steps."""
    torch.manual_seed(0)
    model = ddpm.MODELS[name](in_channels=3, **{**TINY, "dropout": 0.0})
    d = linear_diffusion(20)
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


def test_bf16_autocast_changes_the_speed_not_the_loss():
    """Under bf16 autocast the network really runs in bf16 (every conv's output and eps_theta are
    bf16) while L_simple is float32, not equal to float32's, and within 2% of it."""
    torch.manual_seed(0)
    model = randomized(ddpm.ResAttUNet(in_channels=3, **TINY)).eval()
    d = linear_diffusion()
    x_0, noise = torch.rand(16, 3, 8, 8) * 2 - 1, torch.randn(16, 3, 8, 8)
    t = torch.randint(0, 1000, (16,))
    convs, eps = [], []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: convs.append(out.dtype))

    def watched(x_t, t):  # the model, its outputs kept in eps
        eps.append(model(x_t, t))
        return eps[-1]

    with torch.no_grad():
        loss32 = d.p_losses(watched, x_0, t, noise)
        assert set(convs) == {torch.float32} and eps[-1].dtype == torch.float32
        convs.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16 = d.p_losses(watched, x_0, t, noise)
    assert set(convs) == {torch.bfloat16} and eps[-1].dtype == torch.bfloat16
    assert loss16.dtype == torch.float32 and loss16.item() != loss32.item()
    assert abs(loss16.item() / loss32.item() - 1) < 0.02


# -----------------------------------------------------------------------------
# Part III: training and sampling
# -----------------------------------------------------------------------------


def test_get_batch_scales_to_unit_range_and_flips_half():
    """get_batch maps {0..255} to [-1, 1] [Sec. 4] and mirrors about half of the images [App. B]."""
    torch.manual_seed(0)
    data = torch.randint(0, 256, (2000, 1, 2, 3), dtype=torch.uint8)
    idx = torch.arange(2000)
    plain = ddpm.get_batch(data, idx, flip=False)
    torch.testing.assert_close(plain, data.float() / 127.5 - 1)
    flipped = ddpm.get_batch(data, idx, flip=True)
    mirrored = (flipped == plain.flip(3)).flatten(1).all(1) & ~(flipped == plain).flatten(1).all(1)
    kept = (flipped == plain).flatten(1).all(1)
    assert (mirrored | kept).all() and abs(mirrored.float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(2000)


def test_train_step_warmup_and_ema_match_an_independent_computation():
    """train_step with make_optimizer: lr = 2e-4 * n / warmup [official code]; after 6 steps the EMA
    equals ema_n = d_n ema_{n-1} + (1 - d_n) net_n with d_n = min(0.9999, (1 + n) / (10 + n)),
    recomputed in float64."""
    torch.manual_seed(0)
    net = ddpm.ResAttUNet(in_channels=3, **TINY)
    ema = ddpm.copy.deepcopy(net).requires_grad_(False)
    d = linear_diffusion(20)
    optimizer, scheduler = ddpm.make_optimizer(net, lr=2e-4, warmup=10)
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    reference = [p.detach().double().clone() for p in net.parameters()]
    for n in range(6):
        before = [p.detach().clone() for p in net.parameters()]
        assert scheduler.get_last_lr()[0] == pytest.approx(2e-4 * n / 10)
        loss, grad_norm = ddpm.train_step(net, d, optimizer, x_0)
        scheduler.step()
        ddpm.ema_update(ema, net, n)
        assert torch.isfinite(loss) and grad_norm > 0
        moved = any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        assert moved == (n > 0)  # the first update has lr = 0, as in the official code
        decay = min(0.9999, (1 + n) / (10 + n))
        reference = [
            decay * r + (1 - decay) * p.detach().double() for r, p in zip(reference, net.parameters())
        ]
    for r, e in zip(reference, ema.parameters()):
        torch.testing.assert_close(e.double(), r, atol=1e-6, rtol=1e-5)


def test_train_step_applies_exactly_the_clipped_gradient(monkeypatch):
    """train_step steps with g * min(1, c / ||g||), ||g|| the global norm over all parameters
    [App. B, official code: clip at 1]: with SGD at lr 1 the weights move by exactly -g c / ||g||
    when ||g|| = 50 c, by -g when ||g|| = c / 2 (c = 0.3); it returns ||g|| before clipping."""
    torch.manual_seed(0)
    net = randomized(ddpm.ResAttUNet(in_channels=1, **{**TINY, "dropout": 0.0}))
    x_0, target = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    d, scale, clip = linear_diffusion(20), [1.0], 0.3

    def fixed_loss(model, x_0, *args, **kwargs):  # L_simple at a fixed t and eps: no draws
        return scale[0] * (model(x_0, torch.tensor([3, 15])) - target).pow(2).mean()

    monkeypatch.setattr(d, "p_losses", fixed_loss)
    grads = torch.autograd.grad(fixed_loss(net, x_0), list(net.parameters()))  # g at scale 1
    norm = torch.cat([g.double().flatten() for g in grads]).norm().item()  # float32 sums drift
    for factor in (50.0, 0.5):
        scale[0] = factor * clip / norm  # the gradient is now scale * g, of norm factor * clip
        model = copy.deepcopy(net)
        before = [p.detach().clone() for p in model.parameters()]
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        _, grad_norm = ddpm.train_step(model, d, sgd, x_0, grad_clip=clip)
        assert grad_norm.item() == pytest.approx(factor * clip, rel=1e-6)
        kept = min(1.0, 1 / factor)  # the fraction of the gradient that clipping keeps
        for p_0, p, g in zip(before, model.parameters(), grads):  # to float32 rounding of p
            ulp = 2 * torch.finfo(torch.float32).eps * p_0.abs().max().item()
            torch.testing.assert_close(p_0 - p.detach(), scale[0] * kept * g, rtol=1e-5, atol=ulp)


def smoothness(x):
    """The mean correlation of horizontally adjacent pixels of images (B, C, H, W)."""
    a, b = x[..., :-1].flatten(), x[..., 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_parts_one_to_three_alone_train_and_sample():
    """The file up to the banner, run alone (as pasted into a notebook), uses nothing defined after
    it, trains with train_loop and samples with p_sample_loop: the EMA's L_simple falls well below
    the untrained network's 1, and its samples are smooth like the data (adjacent pixels correlate
    as the data's do), where the untrained network's are not."""
    method = SOURCE[: SOURCE.index(BANNER)]
    tree = ast.parse(SOURCE)
    later = {  # the functions and classes defined after the banner
        node.name
        for node in tree.body
        if node.lineno > method.count("\n") and isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    used = {node.id for node in ast.walk(ast.parse(method)) if isinstance(node, ast.Name)}
    assert not used & later, used & later  # no engineering before the banner
    ns = {"__name__": "notebook"}
    exec(compile(method, "ddpm.py, Parts I-III", "exec"), ns)
    torch.manual_seed(0)
    low = torch.rand(64, 1, 2, 2) * 255  # smooth 8x8 images: 2x2 random blocks, upsampled
    data = nn.functional.interpolate(low, size=8, mode="bilinear").round().to(torch.uint8)
    net = ns["ResAttUNet"](in_channels=1, **{**TINY, "dropout": 0.0})
    untrained = copy.deepcopy(net).eval()
    diffusion = ns["GaussianDiffusion"](ns["linear_beta_schedule"](20, 1e-4, 0.2))
    ema = ns["train_loop"](net, diffusion, data, steps=100, batch_size=16, lr=2e-3, warmup=10)
    x_0 = data.float() / 127.5 - 1
    with torch.no_grad():
        assert diffusion.p_losses(ema, x_0).item() < 0.3
    shape, samples = (64, 1, 8, 8), []
    for model in (ema, untrained):
        generator = torch.Generator().manual_seed(0)
        samples.append(ns["p_sample_loop"](diffusion, model, shape, generator=generator))
    trained, noise = samples
    assert trained.shape == shape and trained.abs().max() <= 1
    smooth = [smoothness(x) for x in (x_0, trained, noise)]
    assert smooth[0] > 0.8 and smooth[1] > 0.6 and smooth[2] < 0.3, smooth


def test_sample_loops_refuse_train_mode():
    """p_sample_loop and DDIM refuse a model left in train() mode (dropout on)."""
    d = linear_diffusion(20)
    net = ddpm.ConvUNet(in_channels=1, **TINY)
    for loop in (
        lambda: ddpm.p_sample_loop(d, net, (2, 1, 8, 8)),
        lambda: ddpm.ddim_sample_loop(d, net, (2, 1, 8, 8), 5),
    ):
        with pytest.raises(ValueError, match="eval"):
            loop()


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
            coef1, coef2 = (
                betas[t] * acp[t].sqrt() / (1 - a),
                (1 - acp[t]) * (1 - betas[t]).sqrt() / (1 - a),
            )
            sigma2 = (
                0.0 if t == 0 else betas[t] if variance == "fixedlarge" else betas[t] * (1 - acp[t]) / (1 - a)
            )
        else:  # sqrt(a') x_0_pred + sqrt(1 - a') (x_t - sqrt(a) x_0_pred) / sqrt(1 - a)
            ap = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            coef2 = (1 - ap).sqrt() / (1 - a).sqrt()
            coef1, sigma2 = ap.sqrt() - coef2 * a.sqrt(), 0.0
        k = coef1 * c + coef2
        m, v = coef1 * (1 - c * a.sqrt()) * mu + k * m, k**2 * v + sigma2
    return float(m), float(v) ** 0.5


@pytest.mark.parametrize("sampler,tol", [("fixedlarge", 0.005), ("fixedsmall", 0.005), ("ddim-50", 0.03)])
def test_samplers_with_exact_denoiser_reproduce_the_data(sampler, tol):
    """With the exact eps for data x_0 ~ N(mu, s^2), Alg. 2 (both variances) and DDIM (eta = 0, 50
    steps) match the closed-form chain, and (mu, s) within tol."""
    d = linear_diffusion()
    mu, s, n = 0.1, 0.2, 16_384
    model = gaussian_data_denoiser(d, mu, s)
    g = torch.Generator().manual_seed(0)
    if sampler.startswith("ddim"):
        x = ddpm.ddim_sample_loop(d, model, (n // 4, 1, 2, 2), steps=50, eta=0.0, generator=g)
        m, sd = gaussian_chain_mean_std(d, mu, s, steps=50)
    else:
        x = ddpm.p_sample_loop(d, model, (n // 4, 1, 2, 2), variance=sampler, generator=g)
        m, sd = gaussian_chain_mean_std(d, mu, s, variance=sampler)
    # against the exact law of this chain: 5 standard errors (sd / sqrt(n), sd / sqrt(2n))
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n)
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)
    # against the data: the chain's own discretisation error is under tol (DDIM's ODE with 50
    # steps narrows data this narrow by 0.024; Alg. 2 with T = 1000 is within 0.002)
    assert abs(m - mu) < tol and abs(sd - s) < tol


# -----------------------------------------------------------------------------
# Extras: DDIM
# -----------------------------------------------------------------------------


def cosine_schedule(T, s=0.008):
    """A second schedule for the samplers' tests: Nichol & Dhariwal's cosine one (their Eq. 17),
    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at 0.999."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def test_ddim_timesteps_run_from_T_minus_1_to_0():
    """The DDIM sub-sequence starts at T-1, ends at 0 and strictly decreases, for any 2 <= steps <=
    T."""
    for T, steps in [(1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (20, 7), (7, 7)]:
        ts = ddpm.ddim_timesteps(T, steps)
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    for steps in [0, 1, 1001]:
        with pytest.raises(ValueError):
            ddpm.ddim_timesteps(1000, steps)


def test_ddim_eta1_all_steps_equals_ddpm_with_beta_tilde():
    """DDIM with eta = 1 and steps = T is Alg. 2 with sigma^2 = beta_tilde, given the same noise
    [Song et al., Sec. 4.1]."""
    d = linear_diffusion(50, 0.2)
    shape = (8, 3, 4, 4)
    ddpm_x = ddpm.p_sample_loop(
        d, toy_model, shape, variance="fixedsmall", generator=torch.Generator().manual_seed(1)
    )
    ddim_x = ddpm.ddim_sample_loop(
        d, toy_model, shape, steps=50, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ddim_x, ddpm_x, atol=1e-4, rtol=1e-4)
    other = ddpm.ddim_sample_loop(
        d, toy_model, shape, steps=50, eta=0.0, generator=torch.Generator().manual_seed(1)
    )
    assert (other - ddpm_x).abs().max() > 0.1  # and eta matters


def ddim_by_hand(alphas_cumprod, ts, x_T, eta, generator):
    """Song et al.'s DDIM in float64 from x_T over the code steps ts (no clipping): Eq. 12 with
    sigma from Eq. 16, z drawn from `generator` before each step but the last (where sigma = 0)."""
    x = x_T.double()
    for i, t in enumerate(ts):
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else 1.0  # alpha_0 = 1 [Eq. 12]
        eps = toy_model(x, torch.full((len(x),), t)).double()
        x_0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # "predicted x_0" [Eq. 12]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)  # [Eq. 16]
        assert 1 - a_prev - sigma**2 >= 0  # in float64 it never needs a clamp for eta <= 1
        x = math.sqrt(a_prev) * x_0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=generator).double()
    return x


def test_ddim_with_eta_between_0_and_1_is_eq_12_by_hand():
    """DDIM with eta = 0.3 or 0.7 over 5 of T = 50 steps equals Eq. 12 with sigma from Eq. 16
    [Song et al. 2021], done by hand in float64 from the same x_T and z; 1 - a' - sigma^2 is >= 0
    for eta in {0.3, 1} at every step of every sub-sequence of both schedules; where float32
    rounds it below 0 (cosine, 2 steps, eta = 1) the clamp keeps the images finite."""
    ac = np.cumprod(1 - np.linspace(1e-4, 0.2, 50))  # float64, independently of GaussianDiffusion
    ts = [i * 49 // 4 for i in reversed(range(5))]  # tau: floor(i (T - 1) / (S - 1)) [Sec. 4.2]
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for eta in (0.3, 0.7):
        diffusion, g = linear_diffusion(50, 0.2), torch.Generator().manual_seed(1)
        out = ddpm.ddim_sample_loop(
            diffusion, toy_model, x_T.shape, 5, eta, clip_denoised=False, x_T=x_T, generator=g
        )
        ref = ddim_by_hand(ac, ts, x_T, eta, torch.Generator().manual_seed(1))
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        assert (out.double() - ddim_by_hand(ac, ts, x_T, 0.0, None)).abs().max() > 0.1  # eta acts
    for schedule in (ddpm.linear_beta_schedule, cosine_schedule):
        ac = torch.cumprod(1 - schedule(1000), 0)
        for steps in (2, 5, 10, 50, 100, 1000):
            ts = ddpm.ddim_timesteps(1000, steps)
            for t, s in zip(ts, ts[1:]):
                a, a_prev = ac[t], ac[s]
                for eta in (0.3, 1.0):
                    sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # [Eq. 16]
                    assert 1 - a_prev - sigma2 >= 0, (schedule, steps, t, eta)
    d = ddpm.GaussianDiffusion(cosine_schedule(1000))
    g = torch.Generator().manual_seed(1)
    out = ddpm.ddim_sample_loop(d, toy_model, x_T.shape, 2, 1.0, False, x_T=x_T, generator=g)
    ref = ddim_by_hand(d.alphas_cumprod.double().numpy(), [999, 0], x_T, 1.0, g.manual_seed(1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-4)


# -----------------------------------------------------------------------------
# Engineering: progress lines, compile, the samplers as the commands run them
# -----------------------------------------------------------------------------


def test_progress_lines_every_5_seconds_and_none_for_a_short_phase(monkeypatch, capsys):
    """A long phase prints a line every 5 s at most: what, how far, images/s and an ETA, then the
    time taken; a short phase prints nothing."""
    clock = iter(range(0, 10_000, 3))  # each call to the clock is 3 s later
    monkeypatch.setattr(ddpm.time, "time", lambda: next(clock))
    progress = ddpm.Progress("sampling (ddim, 4 steps)", 8, 2.5)
    for _ in range(8):
        progress.tick()
    lines = capsys.readouterr().out.splitlines()
    # 2 ticks of 2.5 images in 6 s
    assert lines[0] == "sampling (ddim, 4 steps): 2/8 | 0.8 images/s | ETA 18 s"
    assert lines[-1].startswith("sampling (ddim, 4 steps): 8/8 |")
    assert lines[-1].endswith("took 24 s")
    assert len(lines) == 4  # every 5 s at most: ticks 2, 4, 6 (each 6 s apart), and the last
    monkeypatch.setattr(ddpm.time, "time", lambda: 0.0)  # a phase that takes no time: silent
    progress = ddpm.Progress("quick", 3)
    for _ in range(3):
        progress.tick()
    assert capsys.readouterr().out == ""


def test_watched_model_counts_and_keeps_the_trajectory():
    """Watched passes calls through, ticks its progress once per call and keeps x_t at the calls it
    is told to (twice, where told twice: a sampler of fewer steps than the picture's columns)."""
    ticks = []
    net = ddpm.ConvUNet(in_channels=1, **TINY).eval()
    watched = ddpm.Watched(net, SimpleNamespace(tick=lambda: ticks.append(1)), keep=[0, 2, 2])
    assert watched.training is False
    d = linear_diffusion(20)
    x_T = torch.randn(2, 1, 8, 8)
    x_0 = ddpm.ddim_sample_loop(d, watched, x_T.shape, 5, x_T=x_T)
    assert len(ticks) == 5 and watched.calls == 5 and len(watched.kept) == 3
    assert torch.equal(watched.kept[0], x_T) and torch.equal(watched.kept[1], watched.kept[2])
    assert not torch.equal(watched.kept[1], x_T)
    assert x_0.shape == x_T.shape


def fake_torchvision_set(data, made):
    """A stand-in for a torchvision dataset class: no download; .data, .targets and .classes as
    torchvision's have them; each instance records (root, train) in `made`."""

    class Fake:
        def __init__(self, root, train=True, download=False, **kwargs):
            made.append((str(root), train))
            self.data, self.targets = data, [k % 10 for k in range(len(data))]
            self.classes = [str(k) for k in range(10)]

    return Fake


def test_torchvision_sets_are_padded_permuted_resized_and_spread(tmp_path, monkeypatch):
    """load_dataset on torchvision's training sets (faked: no download): 28x28 grey images padded
    with 2 zero pixels a side to (N, 1, 32, 32) uint8, exactly; CIFAR-10's (N, 32, 32, 3) permuted
    to (N, 3, 32, 32); another image size is the antialiased resize of those; max_images=k takes k
    images spread evenly over the set, the first and the last included, with their labels."""
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8, generator=g)  # a uint8 tensor
    rgb = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()  # numpy
    made = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_torchvision_set(grey, made))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_torchvision_set(rgb, made))
    x, y, classes = ddpm.load_dataset("fashion_mnist", tmp_path, 32)
    padded = torch.from_numpy(np.pad(grey.numpy(), ((0, 0), (2, 2), (2, 2))))[:, None]
    assert x.dtype == torch.uint8 and x.shape == (10, 1, 32, 32) and torch.equal(x, padded)
    assert y.tolist() == list(range(10)) and classes == 10
    assert made == [(str(tmp_path), True)]  # the training split
    resize = torchvision.transforms.functional.resize
    small = ddpm.load_dataset("fashion_mnist", tmp_path, 16)[0]
    assert small.shape == (10, 1, 16, 16) and torch.equal(small, resize(padded, 16, antialias=True))
    chw = torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy())  # (N, 3, 32, 32)
    assert torch.equal(ddpm.load_dataset("cifar10", tmp_path, 32)[0], chw)
    cifar16 = ddpm.load_dataset("cifar10", tmp_path, 16)[0]
    assert torch.equal(cifar16, resize(chw, 16, antialias=True))
    spread = [round(i * 9 / 3) for i in range(4)]  # 4 of 10: 0, 3, 6, 9
    x4, y4, _ = ddpm.load_dataset("cifar10", tmp_path, 32, max_images=4)
    assert torch.equal(x4, chw[spread]) and y4.tolist() == spread
    assert torch.equal(ddpm.load_dataset("fashion_mnist", tmp_path, 32, 4)[0], padded[spread])
    assert torch.equal(ddpm.load_dataset("cifar10", tmp_path, 32, max_images=50)[0], chw)
    ddpm.load_dataset("cifar10", tmp_path, 32, train=False)
    assert made[-1] == (str(tmp_path), False)  # the test split, for nll


def test_compiled_training_step_has_eager_loss_and_gradients(monkeypatch):
    """--compile wraps the network that the training iteration calls (its parameters are net's), in
    the GPU's layout (channels_last): the captured graph's loss and gradient of L_simple equal
    eager's to float32 rounding, and it runs the whole training step. The graph is captured by
    dynamo and differentiated by AOTAutograd, the parts this code's network shapes; inductor's own
    code generation is left to torch (a cold compile takes a minute on 2 cores) and to the GPU
    check."""
    modes, real = [], torch.compile

    def compile_for_test(module, mode=None):
        modes.append(mode)
        return real(module, backend="aot_eager")

    monkeypatch.setattr(ddpm.torch, "compile", compile_for_test)
    torch.manual_seed(0)
    config = dict(ddpm.PAPER, **TINY, channels=3, timesteps=20)
    config.update(channel_mult=[1], attn_resolutions=[8], dropout=0.0)  # one level: quicker
    cpu = torch.device("cpu")
    training, diffusion, model = ddpm.build_training(config, cpu, None, "auto")
    net = training.net
    assert modes == ["default"] and model is not net  # auto: no CUDA graphs off a GPU
    assert {id(p) for p in model.parameters()} == {id(p) for p in net.parameters()}
    randomized(net).to(memory_format=torch.channels_last)

    def channels_last(x):
        return x.contiguous(memory_format=torch.channels_last)

    x_0, noise = (channels_last(torch.rand(4, 3, 8, 8) * 2 - 1), channels_last(torch.randn(4, 3, 8, 8)))
    t = torch.randint(0, 20, (4,))
    losses, grads = [], []
    for module in (net, model):
        net.zero_grad(set_to_none=True)
        losses.append(diffusion.p_losses(module, x_0, t, noise))
        losses[-1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    eager, compiled = grads
    assert (compiled - eager).norm() < 1e-4 * eager.norm()
    loss, grad_norm = ddpm.train_iteration(training, diffusion, x_0, 0, model)
    assert torch.isfinite(loss) and grad_norm > 0
    assert ddpm.compile_model(net, "auto", cuda_graphs=True) is not net
    assert modes[-1] == "reduce-overhead" and ddpm.compile_model(net, None) is net


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_bf16_sampling_keeps_float32_state_and_the_same_images(sampler):
    """Under bf16 autocast (the CUDA default) only the network runs in bf16: x_t stays float32, and
    the images from the same x_T and z differ by under half an 8-bit level on average (one level
    is 2/255) and 4 levels at most, while the network's output itself is off by about 1%."""
    torch.manual_seed(0)
    model = randomized(ddpm.ResAttUNet(in_channels=3, **TINY)).eval()
    d = linear_diffusion(100)
    x_T, t = torch.randn(8, 3, 8, 8), torch.full((8,), 50)
    draws = [ddpm.Draw(sampler, 100 if sampler == "ddpm" else 20, amp=amp) for amp in (None, torch.bfloat16)]
    with torch.inference_mode():
        eps32 = model(x_T, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps16 = model(x_T, t)
        x32, x16 = (
            ddpm.run_sampler(
                d, model, x_T, draw, generator=torch.Generator().manual_seed(1), progress=quiet()
            )[0]
            for draw in draws
        )
    assert 1e-3 < (eps16 - eps32).norm() / eps32.norm() < 0.05  # bf16 really was used
    assert x16.dtype == torch.float32
    level = 2 / 255
    assert 0 < (x16 - x32).abs().max() < 4 * level  # run_sampler did run the network in bf16
    assert (x16 - x32).abs().mean() < 0.5 * level


def quiet():
    """A progress that says nothing."""
    return SimpleNamespace(tick=lambda: None)


def test_the_noise_z_is_drawn_apart_from_x_T(monkeypatch):
    """x_T and the sampler's noise z come from two streams: on a CPU, where both generators live,
    the first z is not x_T again (with one seed for both, it was)."""
    seen, real = [], ddpm.ddim_sample_loop

    def spy(diffusion, model, shape, steps, eta, x_T, generator):
        first_z = torch.randn(shape, generator=torch.Generator().set_state(generator.get_state()))
        seen.append((x_T, first_z))
        return real(diffusion, model, shape, steps, eta=eta, x_T=x_T, generator=generator)

    monkeypatch.setattr(ddpm, "ddim_sample_loop", spy)
    model = ddpm.ResAttUNet(in_channels=1, **TINY).eval()
    draw = ddpm.Draw("ddim", 5, eta=1.0, shape=(1, 8, 8), batch_size=2)
    ddpm.generate(model, linear_diffusion(20), draw, 2)
    ((x_T, first_z),) = seen
    assert not torch.allclose(x_T, first_z)


def test_the_draw_is_described_once_and_auto_is_ddpm_on_cuda_ddim_elsewhere():
    """make_draw: --sampler auto is Algorithm 2 (T steps) on CUDA and DDIM with eta 1 at 100 steps
    elsewhere; --sample-steps sets DDIM's (100 by default, T at most); one
    description names the sampler, its steps, eta or variance, and a conditional model's guidance
    weight and classes; the Draw holds the image shape, batch, seed and autocast too."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    paper = dict(timesteps=1000, channels=3, image_size=32)
    conditional = dict(paper, num_classes=10)

    def draw(config, device, *flags):
        args = ddpm.parse_args(["sample", "--ckpt", "x", *flags])
        return ddpm.make_draw(args, config, device, None)

    auto = draw(paper, cuda)
    assert (auto.sampler, auto.steps, str(auto)) == ("ddpm", 1000, "ddpm, 1000 steps, fixedlarge")
    auto = draw(conditional, cpu, "--seed", "3", "--batch-size", "7")
    assert str(auto) == "ddim, 100 steps, eta 1, guidance w = 0.5, each class in turn"
    assert (auto.shape, auto.batch_size, auto.seed, auto.num_classes) == ((3, 32, 32), 7, 3, 10)
    assert str(draw(conditional, cpu, "--class", "all")).endswith("w = 0.5, 8 of each class")
    assert str(draw(conditional, cpu, "--class", "3", "--guidance", "2")).endswith("w = 2, class 3")
    short = dict(paper, timesteps=20)
    assert draw(short, cpu, "--variance", "fixedsmall").steps == 20
    assert draw(paper, cpu, "--sampler", "ddim", "--sample-steps", "7", "--eta", "0.3").steps == 7
    with pytest.raises(ddpm.UserError, match="--sample-steps 21: more than the model's T = 20"):
        draw(short, cpu, "--sampler", "ddim", "--sample-steps", "21")
    with pytest.raises(ddpm.UserError, match="--class 10: the model knows classes 0 to 9"):
        draw(conditional, cpu, "--class", "10")


# -----------------------------------------------------------------------------
# Engineering: the commands, through main()
# -----------------------------------------------------------------------------


def write_image_folder(root, n=40, channels=3, size=(10, 12)):
    """n small PNG images (smooth random blobs) in two class folders, as a user would have."""
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        (root / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        low = torch.rand(1, channels, 3, 3, generator=g)
        img = nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)[0]
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(2).numpy()  # (H, W[, C])
        Image.fromarray(arr).save(root / f"class{k % 2}" / f"{k:03d}.png")
    return root


def read_samples(out_dir):
    """The images sample wrote under out_dir, as one uint8 array (N, H, W, C)."""
    return ddpm.load_image_folder(out_dir / "images", None)[0].permute(0, 2, 3, 1).numpy()


def read_png(path):
    """(C, H, W) uint8 tensor of a PNG file."""
    arr = np.array(Image.open(path))
    return torch.from_numpy(arr.reshape(*arr.shape[:2], -1)).permute(2, 0, 1)


def grid_cells(img, rows, cols, size):
    """The images of a save_grid picture (2-pixel padding), as (rows, cols, C, size, size)."""
    step = size + 2
    cells = [
        [img[:, 2 + r * step : 2 + r * step + size, 2 + c * step : 2 + c * step + size] for c in range(cols)]
        for r in range(rows)
    ]
    return torch.stack([torch.stack(row) for row in cells])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def train_flags(image_dir, out_dir, *extra):
    """The command line of a tiny training run on the images of image_dir, into out_dir."""
    flags = ["--dataset", "folder", "--data-dir", str(image_dir), "--out-dir", str(out_dir)]
    return [*flags, *TINY_FLAGS, *"--batch-size 8 --warmup 10 --device cpu".split(), *extra]


def sample_flags(ckpt, out_dir, *extra):
    """The command line of sample: a few images from a checkpoint, with 5 DDIM steps."""
    flags = ["sample", "--ckpt", str(ckpt), "--out-dir", str(out_dir), "--device", "cpu"]
    return [*flags, *"--sampler ddim --sample-steps 5".split(), *extra]


@pytest.fixture(scope="module")
def trained_run(image_dir, tmp_path_factory):
    """One tiny training run (2 epochs of 5 steps), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        flags = train_flags(image_dir, out, *"--epochs 2 --sample-every 1 --log-every 2".split())
        assert ddpm.main(flags) == 0
    out.joinpath("stdout.txt").write_text(stdout.getvalue())
    return out


def state_of(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)


def log_steps(out_dir):
    """The steps of log.csv's rows."""
    return [int(r.split(",")[0]) for r in (out_dir / "log.csv").read_text().splitlines()[1:]]


def test_train_writes_checkpoint_log_and_pictures(trained_run):
    """A tiny run writes ckpt.pt (step 10 = 2 epochs of 40 // 8), a log.csv with finite losses,
    grids and both pictures, each described by its sampler; the last column of
    reverse_process.png is the first 8 images of samples.png."""
    ckpt = state_of(trained_run)
    assert ckpt["step"] == 10 and ckpt["config"]["model"] == "res_att"
    assert ckpt["config"]["sampler"] == "ddim, 20 steps, eta 1"  # auto off a GPU, T = 20
    rows = (trained_run / "log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,grad_norm,images_per_s,elapsed_s"
    assert log_steps(trained_run) == [2, 4, 6, 8, 10]
    assert all(math.isfinite(float(r.split(",")[2])) and len(r.split(",")) == 7 for r in rows[1:])
    grids = sorted(p.name for p in (trained_run / "grids").iterdir())
    assert grids == ["epoch_0001.png", "epoch_0002.png"]
    grid = read_png(trained_run / "samples.png")
    assert grid.shape == (3, 2 + 8 * 10, 2 + 8 * 10)  # 8 x 8 images of 8 px with 2 px padding
    trajectory = read_png(trained_run / "reverse_process.png")
    assert trajectory.shape == (3, 2 + 8 * 10, 2 + 10 * 10)  # 8 rows, 10 columns (x_T ... x_0)
    assert torch.equal(grid_cells(trajectory, 8, 10, 8)[:, -1], grid_cells(grid, 8, 8, 8)[0])
    assert not torch.equal(grid_cells(trajectory, 8, 10, 8)[:, 0], grid_cells(grid, 8, 8, 8)[0])
    assert not list(trained_run.glob("*.tmp"))
    assert "done: 10 steps" in (trained_run / "stdout.txt").read_text()


def test_checkpoint_holds_only_tensors_and_plain_values(trained_run, tmp_path):
    """ckpt.pt loads with weights_only=True; a file that would run code on load is refused, and so
    is a torch file that is not a checkpoint of this format."""
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "step", "config", "rng", "elapsed"} <= set(ckpt)
    evil = tmp_path / "evil.pt"
    torch.save({"format": ddpm.CKPT_FORMAT, "payload": ddpm.UserError("x")}, evil)  # an object
    with pytest.raises(ddpm.UserError, match="cannot load"):
        ddpm.load_checkpoint(evil)
    torch.save({**ckpt, "format": "ddpm.py checkpoint 1"}, tmp_path / "old.pt")
    with pytest.raises(ddpm.UserError, match="not a ddpm.py checkpoint"):
        ddpm.load_checkpoint(tmp_path / "old.pt")


def test_a_checkpoint_of_the_previous_version_still_samples_and_resumes(trained_run, tmp_path):
    """A checkpoint as the previous version wrote it (every flag in its config, a gradient scaler's
    empty state, every rank's random states) samples and resumes."""
    ckpt = state_of(trained_run)
    ckpt.update(scaler={}, epoch=2)
    for key in ("sampler", "fid_sampler"):  # not in the previous version's config
        del ckpt["config"][key]
    ckpt["config"].update(weights="ema", ckpt_every=0, explicit=None, schedule="linear")
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        assert ddpm.main(sample_flags(tmp_path / "old" / "ckpt.pt", tmp_path / "s")) == 0
        image_dir = ckpt["config"]["data_dir"]
        flags = train_flags(image_dir, tmp_path / "old", "--resume", "--max-steps", "11")
        assert ddpm.main(flags) == 0
    assert state_of(tmp_path / "old")["step"] == 11
    ckpt["config"]["schedule"] = "cosine"  # a schedule of an earlier version, since removed
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    with pytest.raises(ddpm.UserError, match="cosine schedule is no longer supported"):
        ddpm.load_sampler(tmp_path / "old" / "ckpt.pt", torch.device("cpu"))
    resume = train_flags(image_dir, tmp_path / "old", "--resume", "--max-steps", "12")
    with pytest.raises(ddpm.UserError, match="cosine schedule is no longer supported"):
        ddpm.train(ddpm.parse_args(resume))


def test_sample_from_checkpoint(trained_run, tmp_path):
    """sample writes N images as PNG files, a grid and sample.json (how they were drawn), from the
    checkpoint alone; it refuses a folder that holds more images than it would replace."""
    ckpt, out = trained_run / "ckpt.pt", tmp_path / "s"
    assert ddpm.main(sample_flags(ckpt, out, "--num-samples", "5", "--batch-size", "2")) == 0
    assert (out / "grid.png").exists()
    (record,) = json.loads((out / "sample.json").read_text())
    assert record["sampler"] == "ddim, 5 steps, eta 0" and record["images"] == 5
    assert record["step"] == 10 and record["seed"] == 0
    files = sorted((out / "images").iterdir())
    assert len(files) == 5
    img = read_png(files[0])
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8
    # a smaller run into the same folder would leave 3 of these beside its own: refused
    assert ddpm.main(sample_flags(ckpt, out, "--num-samples", "2")) == 2
    assert sorted((out / "images").iterdir()) == files and torch.equal(read_png(files[0]), img)
    # one as large or larger replaces them all: allowed
    assert ddpm.main(sample_flags(ckpt, out, "--num-samples", "6", "--batch-size", "3")) == 0
    assert len(list((out / "images").iterdir())) == 6
    assert len(json.loads((out / "sample.json").read_text())) == 2


def test_sample_is_reproducible_uses_eval_mode_and_variance(trained_run, tmp_path, monkeypatch):
    """The same --seed gives the same images; the DDPM sampler runs on the model in eval() mode (no
    dropout), and --variance reaches p_sample (fixedsmall gives other images)."""
    variances = []
    real_p_sample = ddpm.GaussianDiffusion.p_sample

    def spy(self, *args, **kwargs):
        variances.append(kwargs["variance"])
        return real_p_sample(self, *args, **kwargs)

    monkeypatch.setattr(ddpm.GaussianDiffusion, "p_sample", spy)
    arrays = []
    for k, extra in enumerate([[], [], ["--variance", "fixedsmall"]]):
        out = tmp_path / f"s{k}"
        flags = sample_flags(trained_run / "ckpt.pt", out, "--num-samples", "3")
        assert ddpm.main([*flags, "--seed", "7", "--sampler", "ddpm", *extra]) == 0
        arrays.append(read_samples(out))
    assert np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[0], arrays[2])
    assert set(variances[:20]) == {"fixedlarge"} and set(variances[40:]) == {"fixedsmall"}


def images_by_hand(ckpt, weights, schedule, seed, n, steps):
    """What sample --sampler ddim should write for a checkpoint: the network built
    from its config and ckpt[weights] here, DDIM (eta = 0) from x_T ~ randn(seed) drawn on the
    CPU, mapped to uint8 (N, H, W, C)."""
    cfg = ckpt["config"]
    net = ddpm.MODELS[cfg["model"]](
        in_channels=cfg["channels"],
        base_channels=cfg["base_channels"],
        channel_mult=tuple(cfg["channel_mult"]),
        num_res_blocks=cfg["num_res_blocks"],
        attn_resolutions=tuple(cfg["attn_resolutions"]),
        dropout=cfg["dropout"],
        image_size=cfg["image_size"],
    )
    net.load_state_dict(ckpt[weights])
    shape = (n, cfg["channels"], cfg["image_size"], cfg["image_size"])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    d = ddpm.GaussianDiffusion(schedule(cfg["timesteps"]))
    x_0 = ddpm.ddim_sample_loop(d, net.eval(), shape, steps, x_T=x_T)
    return ((x_0 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_sample_draws_from_the_ema_weights(trained_run, tmp_path):
    """sample draws from the EMA of the weights [App. B]: its images equal DDIM run here on the
    network built from the checkpoint's EMA, from the same x_T, and not those of the raw weights."""
    ckpt = state_of(trained_run)
    torch.manual_seed(0)  # 10 steps at a warming-up lr leave the two alike: move the raw weights
    ckpt["model"] = {k: v + 0.05 * torch.randn_like(v) for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    flags = sample_flags(tmp_path / "ckpt.pt", tmp_path / "s", "--num-samples", "3", "--seed", "7")
    assert ddpm.main(flags) == 0
    images = read_samples(tmp_path / "s").astype(int)
    ema, raw = (images_by_hand(ckpt, key, ddpm.linear_beta_schedule, 7, 3, 5) for key in ("ema", "model"))
    assert np.abs(images - ema).max() <= 1 and np.abs(images - raw).max() > 10  # 1: a rounding tie


def test_grey_folder_gives_one_channel(tmp_path):
    """Channels follow the data: a folder of grey images trains a 1-channel model (ckpt.pt's first
    conv takes 1 channel and its last gives 1), whose pictures are grey and whose samples are
    (N, H, W, 1)."""
    images = write_image_folder(tmp_path / "grey", n=16, channels=1)
    x = ddpm.load_dataset("folder", images, 8)[0]
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.uint8
    fast = ["--sampler", "ddim", "--sample-steps", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        flags = train_flags(images, tmp_path / "run", "--max-steps", "2", "--sample-every", "0")
        assert ddpm.main([*flags, *fast]) == 0
        ckpt = state_of(tmp_path / "run")
        assert ckpt["config"]["channels"] == 1
        for key in ("model", "ema"):  # conv weights are (out, in, k, k): one takes 1, one gives 1
            convs = [w.shape for w in ckpt[key].values() if w.ndim == 4]
            assert [s[1] for s in convs].count(1) == 1 and [s[0] for s in convs].count(1) == 1
        for picture in ("samples.png", "reverse_process.png"):  # PNGs in RGB, all three equal
            rgb = read_png(tmp_path / "run" / picture)
            assert rgb.shape[0] == 3 and (rgb == rgb[:1]).all() and rgb.float().std() > 0
        sample = sample_flags(tmp_path / "run" / "ckpt.pt", tmp_path / "s")
        assert ddpm.main([*sample, "--num-samples", "2"]) == 0
    assert read_samples(tmp_path / "s").shape == (2, 8, 8, 1)


def test_train_command_takes_the_steps_of_train_loop(image_dir, tmp_path):
    """train (the command) and train_loop (Part III) from the same seed take the same steps: the
    same weights and EMA after 7 steps, on the same data order, flips, t, eps and dropout."""
    argv = ["--max-steps", "7", "--sample-every", "0", "--lr", "1e-3"]
    assert ddpm.main(train_flags(image_dir, tmp_path, *argv)) == 0
    ckpt = state_of(tmp_path)
    data = ddpm.load_dataset("folder", image_dir, 8)[0]
    torch.manual_seed(0)
    net = ddpm.ResAttUNet(in_channels=3, **TINY)
    diffusion = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(20))
    torch.manual_seed(0)  # train seeds seed + rank before its first step
    ema = ddpm.train_loop(net, diffusion, data, 7, lr=1e-3, warmup=10, batch_size=8, seed=0)
    for key, module in (("model", net), ("ema", ema)):
        state = module.state_dict()
        assert all(torch.equal(state[k], ckpt[key][k]) for k in state), key
    torch.manual_seed(0)
    start = ddpm.ResAttUNet(in_channels=3, **TINY).state_dict()
    assert not torch.equal(start["conv_in.weight"], ckpt["model"]["conv_in.weight"])  # it trained


def test_resume_is_bit_identical_after_kills_with_one_log_row_per_step(image_dir, tmp_path, monkeypatch):
    """A run killed (as by SIGKILL: no handler runs) at random moments and resumed each time with
    the same command ends bit-identical to an uninterrupted one (weights, EMA, Adam, step), with
    exactly one log.csv row per step: a kill between a checkpoint and its log row loses no row."""

    class Killed(BaseException):  # not an Exception: nothing in ddpm.py catches it
        pass

    common = "--max-steps 13 --sample-every 0 --log-every 1 --ckpt-minutes 1e-9".split()
    assert ddpm.main(train_flags(image_dir, tmp_path / "once", *common)) == 0
    real_save, writes = ddpm.save_checkpoint, []
    kills = {3: "after the save", 6: "after the save", 7: "before the save", 11: "after the save"}

    def killing_save(path, state):
        writes.append(state["step"])
        if kills.get(state["step"]) == "before the save" and writes.count(state["step"]) == 1:
            raise Killed
        real_save(path, state)
        if kills.get(state["step"]) == "after the save" and writes.count(state["step"]) == 1:
            raise Killed

    monkeypatch.setattr(ddpm, "save_checkpoint", killing_save)
    flags, resume = train_flags(image_dir, tmp_path / "killed", *common), []
    for _ in range(5):
        try:
            assert ddpm.main(flags + resume) == 0
            break
        except Killed:
            resume = ["--resume"]
    a, b = state_of(tmp_path / "once"), state_of(tmp_path / "killed")
    assert a["step"] == b["step"] == 13 and sorted(set(writes)) == list(range(1, 14))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert log_steps(tmp_path / "killed") == list(range(1, 14))


def test_resume_takes_the_network_and_data_from_the_checkpoint(image_dir, tmp_path, capsys):
    """--resume takes the network, T and data from the checkpoint and every other flag from
    the command line: a resume that types none of the network's flags trains the saved network on
    the saved data, at the lr typed now; a typed network flag that agrees is fine."""
    out = tmp_path / "run"
    flags = ["--max-steps", "3", "--lr", "1e-3", "--sample-every", "0"]
    assert ddpm.main(train_flags(image_dir, out, *flags)) == 0
    resume = ["--resume", "--out-dir", str(out), "--device", "cpu", "--sample-every", "0"]
    resume += "--batch-size 8 --max-steps 6 --lr 5e-4 --image-size 8".split()
    assert ddpm.main(resume) == 0
    config = state_of(out)["config"]
    assert state_of(out)["step"] == 6 and config["lr"] == 5e-4 and config["base_channels"] == 32
    assert config["data_dir"] == str(image_dir)
    assert config["channel_mult"] == [1, 2] and config["timesteps"] == 20


def test_ctrl_c_and_sigterm_save_a_loadable_checkpoint(image_dir, tmp_path, monkeypatch):
    """SIGTERM and SIGINT stop after the current step with a checkpoint; so does a KeyboardInterrupt
    raised inside a step; the handlers in place before are restored (whatever they were: a
    background job starts with SIGINT ignored)."""
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
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    flags = train_flags(image_dir, tmp_path, "--epochs", "5", "--sample-every", "0")
    assert ddpm.main(flags) == 130 and state_of(tmp_path)["step"] == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert ddpm.main(flags + ["--resume"]) == 130 and state_of(tmp_path)["step"] == 6
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert ddpm.main(flags + ["--resume"]) == 130
    assert state_of(tmp_path)["step"] == 6  # the 9th step was cut short: no save, no row
    assert log_steps(tmp_path)[-1] == 6


def test_a_second_process_is_refused_while_a_run_holds_its_folder(image_dir, tmp_path, capsys):
    """The same training started twice (two terminals, or --resume while the first runs): the second
    is refused in one line, before it writes a row, by the OS lock that the first holds for its
    life; a holder killed with SIGKILL leaves no lock behind."""
    out = tmp_path / "run"
    out.mkdir()
    code = "import sys, time, ddpm; from pathlib import Path; lock = ddpm.locked(Path(sys.argv[1]))"
    code += "; lock.__enter__()"
    code += "; print('held', flush=True); time.sleep(60)"
    here = Path(__file__).parent
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], cwd=here, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        flags = train_flags(image_dir, out, "--max-steps", "2", "--sample-every", "0")
        expect_error(flags, "--out-dir", "in use by another ddpm.py train", capsys=capsys)
        assert not (out / "log.csv").exists() and not (out / "ckpt.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with ddpm.locked(out):  # the OS dropped the killed process's lock
        with pytest.raises(ddpm.UserError, match="in use"):  # and holds this one against another
            ddpm.locked(out).__enter__()


def test_an_ignored_sigint_stays_ignored(image_dir, tmp_path, monkeypatch):
    """A run started with SIGINT ignored (a background job) keeps ignoring it: no handler is
    installed for it."""
    seen, real_step = [], ddpm.train_step

    def spy(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ddpm, "train_step", spy)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        flags = train_flags(image_dir, tmp_path, "--max-steps", "1", "--sample-every", "0")
        assert ddpm.main(flags) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


EVERY_STEP = ["--epochs", "5", "--ckpt-minutes", "1e-9", "--sample-every", "0"]  # saves every step


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 4 stops the run before its save, names the last good step, and leaves the
    step-3 checkpoint untouched."""
    real_losses, calls = ddpm.GaussianDiffusion.p_losses, []

    def nan_at_step_4(self, *args, **kwargs):
        calls.append(1)
        loss = real_losses(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(ddpm.GaussianDiffusion, "p_losses", nan_at_step_4)
    code = ddpm.main(train_flags(image_dir, tmp_path, *EVERY_STEP, "--log-every", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "after step 3" in err and "holds step 3" in err
    assert len(err.strip().splitlines()) == 1 and state_of(tmp_path)["step"] == 3


def test_infinite_gradient_stops_before_the_weights_reach_a_checkpoint(
    image_dir, tmp_path, monkeypatch, capsys
):
    """A finite loss with an infinite gradient at step 3 (clipping turns it into NaN weights) stops
    the run like a NaN loss, even when the save is due at once: ckpt.pt keeps step 2, with finite
    weights and EMA."""
    real_clip, calls = ddpm.nn.utils.clip_grad_norm_, []

    def inf_gradient_at_step_3(parameters, max_norm):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 3:
            parameters[0].grad[0].fill_(float("inf"))
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(ddpm.nn.utils, "clip_grad_norm_", inf_gradient_at_step_3)
    code = ddpm.main(train_flags(image_dir, tmp_path, *EVERY_STEP, "--log-every", "4"))
    err = capsys.readouterr().err
    assert code == 2 and "after step 2" in err and "holds step 2" in err
    ckpt = state_of(tmp_path)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for key in ("model", "ema") for v in ckpt[key].values())


def test_full_disk_keeps_the_last_checkpoint_and_the_log_has_one_row_per_step(
    image_dir, tmp_path, monkeypatch, capsys
):
    """A checkpoint that cannot be written ends the run with one line; the one before it stays
    whole. Resumed from it, the run redoes the steps after it, and log.csv keeps one row per
    step."""
    real_save, calls = torch.save, []

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            message = "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed"
            raise RuntimeError(message + " writing file")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    code = ddpm.main(train_flags(image_dir, tmp_path, *EVERY_STEP, "--log-every", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1
    assert state_of(tmp_path)["step"] == 1 and not (tmp_path / "ckpt.pt.tmp").exists()
    assert log_steps(tmp_path) == [1, 2]  # the row of step 2 comes before its failed save
    flags = train_flags(image_dir, tmp_path, "--resume", "--max-steps", "6", "--sample-every", "0")
    assert ddpm.main(flags + ["--log-every", "1"]) == 0
    assert log_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_timed_saved_at_the_end(image_dir, tmp_path, monkeypatch):
    """By default a checkpoint is written every --ckpt-minutes (5) and at the end, not at every
    epoch end: a short run saves once; with a tiny --ckpt-minutes every step saves."""
    saves, real_save = [], ddpm.save_checkpoint

    def spy(path, state):
        saves.append(state["step"])
        return real_save(path, state)

    monkeypatch.setattr(ddpm, "save_checkpoint", spy)
    flags = train_flags(image_dir, tmp_path / "a", "--epochs", "2", "--sample-every", "0")
    assert ddpm.main(flags) == 0
    assert saves == [10]  # 2 epochs of 5 steps
    saves.clear()
    flags = ["--max-steps", "3", "--ckpt-minutes", "1e-9", "--sample-every", "0"]
    assert ddpm.main(train_flags(image_dir, tmp_path / "b", *flags)) == 0
    assert saves == [1, 2, 3]


def expect_error(argv, *words, capsys):
    code = ddpm.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("ddpm.py: error:"), err
    for word in words:
        assert word in err, (word, err)


def test_nll_command_is_the_bound_of_the_ema_weights_on_the_test_images(
    trained_run, image_dir, tmp_path, capsys
):
    """nll: the bound [Eq. 5] of the EMA weights on --num-images test images chosen evenly, equal
    to bits_per_dim computed here with the same x_t draws; its split into L_0, L_1..L_{T-1} and
    L_T adds up; a progress line names the network calls; the record in nll.json beside the
    checkpoint; a NaN weight ends in one line."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "ckpt.pt", run)
    flags = ["nll", "--ckpt", str(run / "ckpt.pt"), "--data-dir", str(image_dir), "--device", "cpu"]
    flags += ["--num-images", "6", "--batch-size", "4", "--seed", "3", "--variance", "fixedsmall"]
    clock = iter(range(0, 10**6, 10))  # 10 s between readings: a progress line at every call
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm, "time", SimpleNamespace(time=lambda: next(clock)))
        assert ddpm.main(flags) == 0
    out = capsys.readouterr().out
    (record,) = json.loads((run / "nll.json").read_text())
    assert record["images"] == 6 and record["split"] == "test" and record["variance"] == "fixedsmall"
    assert record["step"] == 10 and record["seed"] == 3 and record["stderr"] > 0
    assert "nll of 6 images, 20 network calls each: 1/40 |" in out and "ETA" in out
    assert "nll of 6 images, 20 network calls each: 40/40 |" in out and "bits/dim" in out
    model, diffusion, config = ddpm.load_sampler(run / "ckpt.pt", torch.device("cpu"))
    images = ddpm.load_dataset("folder", image_dir, 8, 6, train=False)[0]
    g = torch.Generator().manual_seed(3)
    totals = [
        diffusion.bits_per_dim(model, batch.float() / 127.5 - 1, variance="fixedsmall", generator=g)
        for batch in images.split(4)
    ]
    total = torch.cat(totals).double()
    assert record["bits_per_dim"] == pytest.approx(total.mean().item(), abs=1e-5)
    assert record["stderr"] == pytest.approx((total.std() / math.sqrt(6)).item(), abs=1e-5)
    parts = record["L_0"] + record["L_1_to_L_T"]
    assert parts == pytest.approx(record["bits_per_dim"], abs=1e-4) and 0 < record["L_T"] < parts
    ckpt = state_of(run)
    ckpt["ema"]["conv_in.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, run / "ckpt.pt")
    expect_error(flags, "not finite", capsys=capsys)


def test_bad_input_gives_one_line_errors(image_dir, trained_run, tmp_path, capsys):
    """Each mistake ends with one line naming the flag or file, exit status 2, no traceback."""

    def run(*extra):
        return train_flags(image_dir, tmp_path / "new", *extra)

    expect_error(run("--model", "unet"), "--model", "invalid choice", capsys=capsys)
    expect_error(["--dataset", "imagenet"], "--dataset", capsys=capsys)
    expect_error(run("--sampler", "euler"), "--sampler", capsys=capsys)
    expect_error(run("--variance", "learned"), "--variance", capsys=capsys)
    expect_error(run("--amp", "fp16"), "--amp", "invalid choice", capsys=capsys)
    expect_error(run("--image-size", "7"), "divisible", "--image-size", capsys=capsys)
    expect_error(run("--base-channels", "48"), "multiples of 32", "--base-channels", capsys=capsys)
    expect_error(run("--channel-mult", "1,x"), "--channel-mult", "invalid integers", capsys=capsys)
    expect_error(run("--epochs", "1.5"), "--epochs: invalid int value: '1.5'", capsys=capsys)
    expect_error(run("--batch-size", "0"), "--batch-size", capsys=capsys)
    # numbers out of range, each caught before any work with the flag's name and its range
    for flag, value, must in [
        ("--channel-mult", "1,0", "from 1 to 64"),
        ("--attn-resolutions", "-16", "from 1 to 4,096"),
        ("--timesteps", "1", "from 2 to 100,000"),
        ("--lr", "-1", "from 1e-12 to 1"),
        ("--lr", "nan", "from 1e-12 to 1"),
        ("--grad-clip", "0", "from 1e-09 to inf"),
        ("--ema-decay", "1.5", "from 0 to 1"),
        ("--dropout", "1.5", "from 0 to 1"),
        ("--warmup", "-5", "from 0 to"),
        ("--max-steps", "-3", "from 0 to"),
        ("--ckpt-minutes", "-1", "from 0 to"),
        ("--sample-every", "-1", "from 0 to"),
        ("--eta", "-1", "from 0 to 1"),
        ("--sample-steps", "1", "from 2 to 100,000"),
    ]:
        expect_error(run(flag, value), flag, must, capsys=capsys)
    expect_error(run("--dropout", "1"), "dropout < 1", capsys=capsys)  # the network's own check
    expect_error(run("--sample-steps", "21"), "--sample-steps 21", "T = 20", capsys=capsys)
    nll = ["nll", "--ckpt", str(trained_run / "ckpt.pt"), "--device", "cpu"]
    expect_error([*nll, "--batch-size", "0"], "--batch-size", capsys=capsys)
    expect_error([*nll, "--dataset", "folder"], "--data-dir", "test images", capsys=capsys)
    expect_error(run("--data-dir", str(tmp_path / "missing")), "--data-dir", "not a folder", capsys=capsys)
    (tmp_path / "empty").mkdir()
    expect_error(run("--data-dir", str(tmp_path / "empty")), "no .png/.jpg/.jpeg", capsys=capsys)
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
    flags = sample_flags(trained_run / "ckpt.pt", tmp_path / "s", "--sample-steps", "50")
    expect_error(flags, "--sample-steps 50", capsys=capsys)
    # an existing run is never overwritten, and a resume may not change the network
    expect_error(train_flags(image_dir, trained_run), "exists", "--resume", capsys=capsys)
    before = (trained_run / "ckpt.pt").read_bytes()
    flags = train_flags(image_dir, trained_run, "--resume", "--base-channels", "64")
    expect_error(flags, "--base-channels 64 contradicts the checkpoint's 32", capsys=capsys)
    flags = train_flags(image_dir, trained_run, "--resume", "--timesteps", "30")
    expect_error(flags, "--timesteps 30 contradicts the checkpoint's 20", capsys=capsys)
    assert (trained_run / "ckpt.pt").read_bytes() == before


def test_hostile_numbers_end_in_one_line(image_dir, tmp_path, capsys):
    """Numbers torch cannot hold, or a network that cannot fit, end in one line naming the flag
    before any work: a seed beyond 32 bits, huge T, image size, multipliers or block counts, an
    infinite learning rate, and a network of more than 2^32 parameters."""

    def run(*extra):
        return train_flags(image_dir, tmp_path / "new", *extra)

    huge = "99999999999999999999"
    expect_error(run("--seed", huge), "--seed", "from 0 to", capsys=capsys)
    expect_error(["sample", "--ckpt", "x.pt", "--seed", huge], "--seed", capsys=capsys)
    expect_error(run("--timesteps", huge), "--timesteps", "from 2 to 100,000", capsys=capsys)
    expect_error(run("--image-size", huge), "--image-size", capsys=capsys)
    expect_error(run("--channel-mult", f"1,{huge}"), "--channel-mult", capsys=capsys)
    expect_error(run("--channel-mult", ",".join(["1"] * 17)), "at most 16", capsys=capsys)
    expect_error(run("--num-res-blocks", huge), "--num-res-blocks", "from 1 to 64", capsys=capsys)
    expect_error(run("--lr", "1e309"), "--lr", "from 1e-12 to 1", capsys=capsys)
    expect_error(run("--eta", "inf"), "--eta", capsys=capsys)
    expect_error(["sample", "--ckpt", "x.pt", "--num-samples", huge], "--num-samples", capsys=capsys)
    flags = ("--base-channels", "4096", "--channel-mult", "64,64", "--attn-resolutions", "4")
    expect_error(run(*flags), "parameters, too many", "--base-channels", capsys=capsys)
    assert not (tmp_path / "new" / "ckpt.pt").exists()


def test_wandb_without_the_package_is_a_clear_error(image_dir, tmp_path, monkeypatch, capsys):
    """--wandb without wandb installed ends with one line saying how to install it, before any
    work."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes "import wandb" fail, installed or not
    expect_error(train_flags(image_dir, tmp_path / "w", "--wandb"), "pip install wandb", capsys=capsys)
    assert not (tmp_path / "w").exists()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch, capsys):
    """Without internet, --dataset cifar10 ends with one line pointing to the files or to --dataset
    folder."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    flags = ["--data-dir", str(tmp_path), "--device", "cpu", "--out-dir", str(tmp_path / "o")]
    expect_error(flags, "could not get cifar10", "--dataset folder", capsys=capsys)


def test_a_cpu_told_to_train_the_papers_network_is_pointed_to_the_quick_start(tmp_path, monkeypatch, capsys):
    """The main command on a machine without a GPU says once, at the start, that the paper's
    network is a GPU recipe, and points to the quick start."""

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the first step: the lines before it are what counts

    monkeypatch.setattr(ddpm, "train_step", stop)
    monkeypatch.setattr(
        ddpm, "load_dataset", lambda *a: (torch.zeros(256, 3, 32, 32, dtype=torch.uint8), None, 0)
    )
    assert ddpm.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 130
    out = capsys.readouterr().out
    assert out.count("35,746,307 parameters is a GPU recipe") == 1 and "quick start" in out


def test_out_of_gpu_memory_names_the_batch_flag(trained_run, tmp_path, monkeypatch, capsys):
    """A batch too big for the GPU ends with one line saying which flag to lower, not a
    traceback."""

    def too_big(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ddpm, "run_sampler", too_big)
    flags = sample_flags(trained_run / "ckpt.pt", tmp_path)
    expect_error(flags, "out of GPU memory", "--batch-size", capsys=capsys)


def test_failed_compile_names_the_flag(image_dir, tmp_path, monkeypatch, capsys):
    """--compile on a machine where inductor cannot build its kernels (no C compiler, say) ends with
    one line naming --compile and the way out, not a traceback."""

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", no_compiler)  # imports the module
    torch._dynamo.reset()
    flags = train_flags(image_dir, tmp_path / "run", "--compile", "default", "--max-steps", "2")
    expect_error(flags, "--compile failed", "C compiler", "run without --compile", capsys=capsys)
    torch._dynamo.reset()


def test_help_documents_every_flag():
    """Every flag of every command has a help text that shows its default where it takes a value;
    the flags a checkpoint decides say so."""
    parser = ddpm.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(ddpm.COMMANDS)
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if action.nargs != 0 and not action.required:
                assert "(default: " in action.help, (name, action.dest)
    train = " ".join(commands["train"].format_help().split())
    base = "--base-channels BASE_CHANNELS channels at full size, a multiple of 32 (default: 128"
    assert base + "; --resume: the run's)" in train
    assert "eps = (1 + w) eps(x, y) - w eps(x); diffusers' guidance_scale is 1 + w" in train


def test_bench_on_a_cpu_says_what_it_measured(capsys):
    """.ci/bench.py on a CPU takes the quick start's network for the flags not typed, and prints
    training and sampling images/s at the batch it used, the first calls' seconds apart."""
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent / ".ci" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        "--image-size 8 --attn-resolutions 4 --timesteps 20 --model res --steps 2 --device cpu".split()
    )
    out = capsys.readouterr().out
    assert "bench: res, 635,427 parameters, 8x8, batch 32" in out  # the quick start's, typed size
    for row in ("train", "sample"):
        line = next(line for line in out.splitlines() if line.startswith(f"{row}: "))
        assert float(line.split()[1].replace(",", "")) > 0 and "ms per call (the first 3 calls" in line


def ddp_worker(rank, world, ports, image_dir, root):
    """One of two torchrun-style processes (Gloo): the DDP scenarios one after the other, each in
    its own process group; what each returned and printed goes to root/rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results, real_step, real_save = {}, ddpm.train_step, ddpm.save_checkpoint
    real_inception, real_generate, shares = ddpm.inception, ddpm.generate, []

    def run(name, port, *extra, fault=None):
        os.environ["MASTER_PORT"] = str(port)
        calls = []

        def step(*args, **kwargs):
            calls.append(1)
            out = real_step(*args, **kwargs)
            if fault == "signal" and (rank, len(calls)) == (1, 2):  # rank 1 alone is told to stop
                signal.raise_signal(signal.SIGTERM)
            return out

        def full_disk(path, state):
            raise ddpm.UserError(f"cannot write {path} (No space left on device)")

        def generate(model, diffusion, draw, n, first=0):  # the FID samples: a share each
            shares.append(n)
            return real_generate(model, diffusion, draw, n, first=first)

        ddpm.train_step = step
        if fault == "disk":
            ddpm.save_checkpoint = full_disk
        if fault == "fid":
            ddpm.inception, ddpm.generate = standin_inception([]), generate
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            flags = train_flags(image_dir, root / name, "--sample-every", "0", "--max-steps", "6")
            code = ddpm.main([*flags, *extra])
        results[name] = (code, err.getvalue(), len(calls), out.getvalue())
        ddpm.train_step, ddpm.save_checkpoint = real_step, real_save
        ddpm.inception, ddpm.generate = real_inception, real_generate

    run("once", ports[0])
    run("twice", ports[1], "--max-steps", "3")
    run("twice", ports[2], "--resume")
    run("signal", ports[3], "--max-steps", "20", fault="signal")
    run("disk", ports[4], "--ckpt-minutes", "1e-9", fault="disk")
    fid = ["--fid-every", "1", "--fid-samples", "6", "--max-steps", "5", "--ref-stats"]
    run("fid", ports[5], *fid, str(root / "reference.npz"), fault="fid")
    results["shares"] = shares
    torch.save(results, root / f"rank{rank}.pt")


def test_ddp_two_gloo_processes_agree_on_every_stop(image_dir, tmp_path):
    """torchrun-style DDP with 2 Gloo processes: rank 0 alone writes, and the two hold the same
    weights; a run stopped and resumed reaches its end; a SIGTERM that reaches rank 1 alone, after
    step 2, stops both at the next agreement (step 10), saved once and said once; a full disk on
    rank 0 ends both ranks with one line, and neither hangs; --fid-every draws a share of the
    samples on each process, and rank 0 writes the FID."""
    np.savez(tmp_path / "reference.npz", mu=np.zeros(16), sigma=np.eye(16), image_size=8)
    ports = []
    for _ in range(6):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    torch.multiprocessing.spawn(ddp_worker, args=(2, ports, image_dir, tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["once"][0] == r1["once"][0] == 0 and r0["once"][2] == r1["once"][2] == 6
    assert state_of(tmp_path / "once")["step"] == 6
    assert r0["twice"][0] == r1["twice"][0] == 0 and state_of(tmp_path / "twice")["step"] == 6
    assert r0["signal"][0] == r1["signal"][0] == 130 and r0["signal"][2] == r1["signal"][2] == 10
    assert state_of(tmp_path / "signal")["step"] == 10
    assert r0["signal"][1].count("stopped at step 10: saved") == 1 and r1["signal"][1] == ""
    assert r0["disk"][0] == r1["disk"][0] == 2 and r0["disk"][2] == r1["disk"][2] == 6
    disk_error = r0["disk"][1].strip()
    assert "No space left on device" in disk_error and len(disk_error.splitlines()) == 1
    assert r1["disk"][1] == "" and not (tmp_path / "disk" / "ckpt.pt").exists()
    assert r0["fid"][0] == r1["fid"][0] == 0 and r0["shares"] == r1["shares"] == [3]
    (row,) = csv.DictReader(open(tmp_path / "fid" / "fid.csv"))
    assert row["step"] == "5" and row["samples"] == "6" and math.isfinite(float(row["fid"]))


def write_run(folder, batch_size, log, fid=None):
    """A run folder as train leaves it, for compare: log.csv, fid.csv and ckpt.pt's batch size."""
    folder.mkdir()
    (folder / "log.csv").write_text("step,epoch,loss,lr,grad_norm,images_per_s,elapsed_s\n" + log)
    if fid:
        header = "step,images_seen,fid,inception_score,inception_score_std,samples,sampler,seconds\n"
        (folder / "fid.csv").write_text(header + fid)
    torch.save(dict(format=ddpm.CKPT_FORMAT, config=dict(batch_size=batch_size)), folder / "ckpt.pt")


def test_compare_tabulates_loss_curves_by_images_seen(tmp_path, capsys):
    """compare prints each run's mean loss over 8 stretches of training images seen (steps times
    the batch size that ckpt.pt holds), from the rows of log.csv, "-" where a run has no row; a
    step logged twice (by an older version after a crash) counts once, with its last row."""
    for name, batch, scale in [("a", 4, 1.0), ("b", 16, 2.0)]:
        rows = [f"{s},0,{scale * s},1e-4,1.0,10.0,1.0" for s in range(10, 161, 10)]
        rows.insert(1, "20,0,999,1e-4,1.0,10.0,1.0")  # step 20 twice: the last row counts
        write_run(tmp_path / name, batch, "\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" among them
        assert ddpm.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["images", "seen", "a", "b"] and len(lines) == 9
    assert lines[1].split() == ["0-80", "15.0000", "-"]  # a: steps 10 and 20; b: none
    assert lines[2].split() == ["80-160", "35.0000", "20.0000"]  # b: step 10, 160 images
    assert lines[-1].split() == ["560-640", "155.0000", "80.0000"]
    expect_error(["compare", str(tmp_path / "missing")], "log.csv", capsys=capsys)
    (tmp_path / "a" / "ckpt.pt").unlink()  # its batch size: the images seen cannot be counted
    expect_error(["compare", str(tmp_path / "a")], "holds no ckpt.pt", capsys=capsys)


# -----------------------------------------------------------------------------
# FID (after the banner), with a stand-in for pytorch-fid's Inception network
# -----------------------------------------------------------------------------


def test_frechet_distance_against_closed_forms():
    """In float64: equal statistics give 0; diagonal covariances give ||mu1 - mu2||^2 + sum (s1 -
    s2)^2 (s: the standard deviations); any two covariances give what tr((S1^1/2 S2 S1^1/2)^1/2),
    a second way of computing the trace of the root, gives."""
    g = torch.Generator().manual_seed(0)
    d, f64 = 64, dict(generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, **f64), torch.randn(d, **f64)
    s1, s2 = torch.rand(d, **f64), torch.rand(d, **f64)
    closed = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())
    diagonal = ddpm.frechet_distance(mu1, s1.square().diag(), mu2, s2.square().diag())
    assert diagonal == pytest.approx(closed, rel=1e-10)
    a, b = torch.randn(d, 2 * d, **f64), torch.randn(d, 2 * d, **f64)
    S1, S2 = a @ a.T / (2 * d), b @ b.T / (2 * d)
    assert abs(ddpm.frechet_distance(mu1, S1, mu1, S1)) < 1e-9
    w, v = torch.linalg.eigh(S1)
    root1 = v @ w.sqrt().diag() @ v.T  # S1^(1/2)
    trace_root = torch.linalg.eigvalsh(root1 @ S2 @ root1).clamp(min=0).sqrt().sum()
    second = float((mu1 - mu2).square().sum() + S1.trace() + S2.trace() - 2 * trace_root)
    assert ddpm.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(second, rel=1e-10)


def test_inception_score_is_improved_gans_formula():
    """inception_score: softmax in float64, 10 contiguous splits, exp(mean KL(p(y|x) || p(y))) each,
    mean and numpy std (ddof 0), against a transcription of improved-gan's get_inception_score;
    fewer than 10 images: one split each, IS 1."""
    logits = 3 * np.random.default_rng(0).standard_normal((1003, 1008))
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = preds[(i * preds.shape[0] // 10) : ((i + 1) * preds.shape[0] // 10), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = ddpm.inception_score(torch.from_numpy(logits).float())
    assert mean == pytest.approx(np.mean(scores), rel=1e-5) and std == pytest.approx(np.std(scores), rel=1e-4)
    assert 1 < mean < 1008 and std > 0
    assert ddpm.inception_score(torch.randn(4, 10)) == (1.0, 0.0)


def test_fid_and_is_come_from_one_pass_and_the_classifier_has_no_bias():
    """fid_and_is sees each image once: the FID of its features and the IS of their logits,
    features @ classifier.T (no bias), as inception_score and frechet_distance give them."""
    calls = []
    network, classifier = standin_inception(calls)(None)
    images = torch.randint(
        0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    mu = torch.zeros(16, dtype=torch.float64)
    sigma = torch.eye(16, dtype=torch.float64)
    scoring = dict(network=network, classifier=classifier, mu=mu, sigma=sigma)
    scores = ddpm.fid_and_is(scoring, images, torch.device("cpu"), "test")
    assert sum(calls) == 30
    features = network(images.float() / 255)[0].flatten(1).double()
    assert scores["inception_score"] == pytest.approx(
        ddpm.inception_score(features @ classifier.T)[0], rel=1e-6
    )
    fid = ddpm.frechet_distance(features.mean(0), features.T.cov(), mu, sigma)
    assert scores["fid"] == pytest.approx(fid, rel=1e-6)


def test_the_real_inception_classifier_is_the_fc_layer_after_pool3():
    """Where pytorch-fid and its weights are present: ddpm.inception's classifier is the fc weight
    of the same TF Inception, and pool3 @ weight.T is that network's logits less the fc bias (a
    weights file without the classifier, as rebuilt offline, gives a nan IS, not IS = 1)."""
    fid_inception = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid is not installed")
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ddpm.FID_WEIGHTS
    if not weights.is_file():
        pytest.skip(f"pytorch-fid's Inception weights are not at {weights}")
    network, classifier = ddpm.inception(torch.device("cpu"))
    full = fid_inception.fid_inception_v3().eval()
    if not full.fc.weight.any():  # a file rebuilt offline without the classifier: IS is nan
        assert classifier.isnan().all()
        pytest.skip("pytorch-fid's weights file here holds no classifier (rebuilt offline)")
    assert torch.equal(classifier, full.fc.weight.detach().double())
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool3 = network(x)[0].flatten(1).double()
        logits = full(2 * x - 1).double()  # pytorch-fid scales [0, 1] to [-1, 1] itself
    assert torch.allclose(pool3 @ classifier.T, logits - full.fc.bias.double(), atol=1e-3)


def test_feature_statistics_see_images_as_pytorch_fid_reads_pngs():
    """The network gets RGB floats in [0, 1], a grey image as three equal channels (as PIL's
    convert("RGB") gives pytorch-fid), in batches; mu and sigma are numpy's mean and cov of its
    pool3 output, (B, D, 1, 1) as pytorch-fid's InceptionV3 returns it in a list."""
    seen = []

    def features(x):
        return torch.cat([x.mean((2, 3)), x[:, :, 0, 0] * x[:, :, 1, 1]], 1)  # (B, 6)

    def network(x):
        seen.append(x)
        return [features(x)[:, :, None, None]]

    grey = torch.randint(0, 256, (600, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    grey = grey.to(torch.uint8)
    mu, sigma = ddpm.feature_statistics(network, grey, torch.device("cpu"), "test")
    x = torch.cat(seen)
    assert len(seen) > 1 and x.dtype == torch.float32
    assert torch.equal(x, (grey.float() / 255).expand(-1, 3, -1, -1))
    f = features(x).double().numpy()
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f, rowvar=False), rtol=1e-10)


def standin_inception(calls):
    """A stand-in for ddpm.inception: 16 fixed random features of the 8x8-pooled image, returned as
    pytorch-fid's network returns them, and a classifier of 10 classes on them; records how many
    images it saw per call, and checks that they come as pytorch-fid wants them."""
    weights = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))
    classifier = torch.randn(10, 16, generator=torch.Generator().manual_seed(1)).double()

    def network(x):
        assert x.dtype == torch.float32 and x.shape[1] == 3 and 0 <= x.min() <= x.max() <= 1
        calls.append(len(x))
        return [(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ weights)[:, :, None, None]]

    def inception(device):
        return network, classifier

    return inception


def test_reference_statistics_are_computed_once_then_read_from_the_cache(image_dir, tmp_path):
    """The training set's statistics at the run's image size are computed on first use, cached under
    ~/.cache/ddpm.py (not in the user's --data-dir) and read back from there, computed again when
    the folder changes; --ref-stats takes a file of the usual mu/sigma form instead."""
    data, calls, cpu = tmp_path / "data", [], torch.device("cpu")
    shutil.copytree(image_dir, data)
    network, _ = standin_inception(calls)(cpu)
    mu, sigma, where = ddpm.reference_statistics("folder", data, None, 8, network, cpu)
    assert sum(calls) == 40 and "40 folder training images" in where
    direct = ddpm.feature_statistics(network, ddpm.load_dataset("folder", data, 8)[0], cpu, "")
    assert torch.equal(mu, direct[0]) and torch.equal(sigma, direct[1])
    (cache,) = (Path(os.environ["XDG_CACHE_HOME"]) / "ddpm.py").glob("fid_stats_folder_8px_*.npz")
    assert "cached" in where and sorted(data.rglob("*.npz")) == []  # not in the user's folder
    calls.clear()
    again = ddpm.reference_statistics("folder", data, None, 8, network, cpu)
    assert calls == [1] and again[2] == f"statistics in {cache}"  # 1: its width
    assert torch.equal(again[0], mu) and torch.equal(again[1], sigma)
    shutil.copy(data / "class0" / "000.png", data / "class0" / "extra.png")  # the folder changes
    calls.clear()
    changed = ddpm.reference_statistics("folder", data, None, 8, network, cpu)
    assert sum(calls) == 41  # a new cache file for the folder as it is now: the 41 images
    assert "41 folder training images, cached" in changed[2]
    assert not torch.equal(changed[0], mu)
    (data / "class0" / "extra.png").unlink()
    ddpm.reference_statistics("folder", data, None, 4, network, cpu)  # another size: its own file
    assert len(list(cache.parent.glob("fid_stats_folder_4px_*.npz"))) == 1
    np.savez(tmp_path / "ref.npz", mu=np.arange(16.0), sigma=np.eye(16))
    mu, sigma, where = ddpm.reference_statistics("folder", data, tmp_path / "ref.npz", 8, network, cpu)
    assert torch.equal(mu, torch.arange(16.0, dtype=torch.float64))
    assert where == f"statistics in {tmp_path / 'ref.npz'}"


def test_fid_command_scores_sampled_images_and_records_fid_and_is(
    trained_run, image_dir, tmp_path, monkeypatch, capsys
):
    """fid --images scores the images sample wrote (its grid.png left out), from their folder or the
    one above it, against the training set's statistics (computed once, then cached): it prints
    the FID and IS and adds a record of both, and of its protocol, to fid.json beside them."""
    calls = []
    monkeypatch.setattr(ddpm, "inception", standin_inception(calls))
    data = tmp_path / "data"
    shutil.copytree(image_dir, data)
    common = ["--device", "cpu", "--batch-size", "8", "--sampler", "ddim", "--sample-steps", "5"]
    sample = ["sample", "--ckpt", str(trained_run / "ckpt.pt"), "--num-samples", "24", *common]
    assert ddpm.main([*sample, "--out-dir", str(tmp_path / "s")]) == 0
    fid = ["fid", "--data-dir", str(data), "--dataset", "folder", "--device", "cpu"]
    for images in (tmp_path / "s" / "images", tmp_path / "s"):
        assert ddpm.main([*fid, "--images", str(images)]) == 0
        out = capsys.readouterr().out
        record = json.loads((images.parent / "fid.json").read_text())[-1]
        assert f"FID {record['fid']:.2f}, IS {record['inception_score']:.2f} ± " in out
        assert record["samples"] == 24 and "folder_8px" in record["reference"]  # computed, then read
        assert "pytorch-fid" in record["network"] and record["inception_score_std"] >= 0
        assert "note: FID from 24 images" in out
    assert "grid.png left out" in out  # the folder above images/ holds it
    first = json.loads((tmp_path / "fid.json").read_text())[-1]
    assert first["fid"] == record["fid"] and first["inception_score"] == record["inception_score"]
    assert sum(calls) == 40 + 2 * 24 + 1  # the training set once, then its cache (and its width)


def test_fid_errors_end_in_one_line_before_any_work(trained_run, image_dir, tmp_path, monkeypatch, capsys):
    """Without pytorch-fid, without its weights (offline), with a reference of another width or
    not finite, without --images, or with images that are not images: one line each, before any
    scoring; --fid-every checks the same before training starts."""
    run = tmp_path / "run"
    fid = ["fid", "--device", "cpu", "--data-dir", str(tmp_path)]
    (tmp_path / "s").mkdir()
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "s" / f"{k}.png")
    images = ["--images", str(tmp_path / "s")]
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # "import pytorch_fid" fails
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    expect_error([*fid, *images], "pip install pytorch-fid", capsys=capsys)
    expect_error(train_flags(image_dir, run, "--fid-every", "1"), "pip install pytorch-fid", capsys=capsys)
    assert not (run / "log.csv").exists()

    class Offline:  # pytorch-fid as it behaves offline: the weights' download fails
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    fake = SimpleNamespace(InceptionV3=Offline)
    monkeypatch.setitem(sys.modules, "pytorch_fid", SimpleNamespace(inception=fake))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", fake)
    weights = Path(torch.hub.get_dir()) / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    expect_error([*fid, *images], str(weights), capsys=capsys)
    monkeypatch.setattr(ddpm, "inception", standin_inception([]))
    (tmp_path / "bad.npz").write_text("not an npz")
    bad = ["--ref-stats", str(tmp_path / "bad.npz")]
    expect_error([*fid, *images, *bad], "--ref-stats", "mu and sigma", capsys=capsys)
    expect_error(fid, "--images", "required", capsys=capsys)
    expect_error([*fid, "--images", str(tmp_path / "bad.npz")], "not a folder", capsys=capsys)
    expect_error([*fid, "--images", str(tmp_path / "none")], "--images", capsys=capsys)
    (tmp_path / "one").mkdir()  # no covariance from one image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "0.png")
    np.savez(tmp_path / "ok.npz", mu=np.zeros(16), sigma=np.eye(16))
    one = ["--images", str(tmp_path / "one"), "--ref-stats", str(tmp_path / "ok.npz")]
    expect_error([*fid, *one], "2 or more images; --images", "has 1", capsys=capsys)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "0.png").write_text("not a PNG")
    expect_error([*fid, "--images", str(tmp_path / "text")], "cannot decode", capsys=capsys)
    for name, mu, sigma in (("nan", np.full(16, np.nan), np.eye(16)), ("64", np.zeros(64), np.eye(64))):
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
        ref = ["--ref-stats", str(tmp_path / f"{name}.npz")]
        expect_error([*fid, *images, *ref], "finite, of the network's 16 features", capsys=capsys)
    assert not list(tmp_path.rglob("fid.json"))


def test_fid_every_logs_rows_kept_out_of_images_per_s(image_dir, tmp_path, monkeypatch, capsys):
    """--fid-every 1: a fid.csv row at the end of each epoch (step, images seen, FID, IS and its
    spread, samples, sampler, seconds) from the EMA weights, with --sampler auto's FID sampler (DDIM, eta 1,
    min(100, T) steps): the FID that fid gives for the checkpoint; its time stays out of log.csv's
    images/s; a resumed run keeps the rows up to its step."""
    clock = [0.0]

    def tick():  # a clock that moves 1 ms per reading, and 100 s per call of the network
        clock[0] += 0.001
        return clock[0]

    network, classifier = standin_inception([])(None)

    def slow(x):
        clock[0] += 100
        return network(x)

    def inception(device):
        return slow, classifier

    monkeypatch.setattr(ddpm, "inception", inception)
    monkeypatch.setattr(ddpm, "time", SimpleNamespace(time=tick, perf_counter=tick))
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(image_dir, data)
    flags = ["--fid-every", "1", "--fid-samples", "6", "--log-every", "5", "--sample-every", "0"]
    assert ddpm.main(train_flags(data, run, "--epochs", "2", *flags)) == 0
    rows = list(csv.DictReader(open(run / "fid.csv")))
    assert [(r["step"], r["images_seen"], r["samples"]) for r in rows] == [
        ("5", "40", "6"),
        ("10", "80", "6"),
    ]
    assert {r["sampler"] for r in rows} == {"ddim, 20 steps, eta 1"}
    assert all(float(r["seconds"]) >= 100 for r in rows)
    speeds = {r["step"]: float(r["images_per_s"]) for r in csv.DictReader(open(run / "log.csv"))}
    assert "10" in speeds and min(speeds.values()) > 1000  # 8 images a step, 1 ms a reading
    capsys.readouterr()
    again = ["--ckpt", str(run / "ckpt.pt"), "--num-samples", "6", "--sampler", "ddim", "--eta", "1"]
    again += ["--sample-steps", "20", "--device", "cpu", "--out-dir", str(run / "samples")]
    assert ddpm.main(["sample", *again]) == 0  # the same images as the last row's
    fid = ["fid", "--images", str(run / "samples"), "--dataset", "folder", "--data-dir", str(data)]
    assert ddpm.main([*fid, "--device", "cpu"]) == 0
    assert f"FID {float(rows[1]['fid']):.2f}" in capsys.readouterr().out
    (record,) = json.loads((run / "fid.json").read_text())  # the same Inception pass gives the IS
    assert record["inception_score"] == pytest.approx(float(rows[1]["inception_score"]), abs=1e-4)
    assert record["inception_score_std"] == pytest.approx(float(rows[1]["inception_score_std"]), abs=1e-4)
    assert ddpm.main(train_flags(data, run, "--epochs", "3", "--resume", *flags)) == 0
    assert [r["step"] for r in csv.DictReader(open(run / "fid.csv"))] == ["5", "10", "15"]


def test_compare_plots_loss_and_fid_against_images_seen(tmp_path, monkeypatch, capsys):
    """compare --plot draws loss and fid.csv's FID against images seen (steps times the batch size
    that ckpt.pt holds), a line per run; without matplotlib, one line naming it."""
    for name, batch in (("a", 4), ("b", 8)):
        (tmp_path / name).mkdir()
        log = "step,epoch,loss,lr,grad_norm,images_per_s,elapsed_s\n"
        log += "10,0,0.5,1,1,1,1\n20,0,0.25,1,1,1,1\n"
        (tmp_path / name / "log.csv").write_text(log)
        fid = f"step,images_seen,fid,samples,sampler,seconds\n20,{20 * batch},9.5,6,ddim,1\n"
        (tmp_path / name / "fid.csv").write_text(fid)
        torch.save(dict(format=ddpm.CKPT_FORMAT, config=dict(batch_size=batch)), tmp_path / name / "ckpt.pt")
    lines = []

    def plot(*args, **kwargs):
        lines.append((args, kwargs))

    axes = [SimpleNamespace(plot=plot, set=dict, legend=dict) for _ in "ab"]
    figure = SimpleNamespace(savefig=lambda path, **k: Path(path).write_text("png"))
    pyplot = SimpleNamespace(subplots=lambda *a, **k: (figure, axes))
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert ddpm.main(["compare", *runs, "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    out = capsys.readouterr().out
    assert "a: FID 9.50 after 80 images" in out and "nan" not in out  # 2 rows: 2 stretches
    loss_a, fid_a, loss_b, fid_b = [(list(map(list, a)), k["label"]) for a, k in lines]
    assert loss_a[0][0] == [40, 80] and loss_b[0][0] == [80, 160] and loss_b[1] == "b"
    assert fid_a[0][:2] == [[80], [9.5]] and fid_b[0][:2] == [[160], [9.5]]
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    expect_error(["compare", *runs, "--plot", "x.png"], "pip install matplotlib", capsys=capsys)


# -----------------------------------------------------------------------------
# Class-conditional training and classifier-free guidance (after the banner)
# -----------------------------------------------------------------------------


def test_an_unconditional_network_is_unchanged_by_the_label_input():
    """Without num_classes the network has the same keys, and from the same seed the same outputs,
    as before the label input existed (numbers from that version); with it, one more table."""
    torch.manual_seed(0)
    net = ddpm.ResAttUNet(in_channels=3, **TINY).eval()
    g = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.data += 0.02 * torch.randn(p.shape, generator=g)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        out = net(x, t).double()
    assert len(net.state_dict()) == 128 and not any("label" in k for k in net.state_dict())
    assert out.sum().item() == pytest.approx(-12.661014072597027, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(60.546604158356786, rel=1e-5)
    cond = ddpm.ResAttUNet(in_channels=3, num_classes=10, **TINY)
    extra = set(cond.state_dict()) - set(net.state_dict())
    assert extra == {"label_emb.weight"} and cond.label_emb.weight.shape == (11, 128)


def test_guidance_mixes_the_two_predictions_as_eq_6():
    """Guided(w) is (1 + w) eps(x, t, y) - w eps(x, t, none) [Ho & Salimans, Eq. 6], in float64;
    w = 0 is the conditional prediction, and y = "no label" the unconditional one for any w."""
    torch.manual_seed(0)
    net = randomized(ddpm.ResAttUNet(in_channels=1, num_classes=3, **TINY)).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 10, 19])
    y, none = torch.tensor([0, 1, 2, 1]), torch.full((4,), 3)
    with torch.no_grad():
        eps_y, eps_none = net(x, t, y), net(x, t, none)
        assert (eps_y - eps_none).abs().max() > 1e-3  # the label matters
        for w in (0.0, 1.0, 3.0):
            expected = (1 + w) * eps_y.double() - w * eps_none.double()
            guided = ddpm.Guided(net, y, w, 3)(x, t).double()
            torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
            unguided = ddpm.Guided(net, none, w, 3)(x, t)
            torch.testing.assert_close(unguided, eps_none, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the mix in float32 under autocast too
            assert ddpm.Guided(net, y, 2.0, 3)(x, t).dtype == torch.float32


def test_the_label_input_no_label_by_default_and_refused_without_classes():
    """A class-conditional network called without labels uses its "no label" row, the one that
    guidance and label dropout train; an unconditional one refuses labels with one line."""
    torch.manual_seed(0)
    net = randomized(ddpm.ResAttUNet(in_channels=1, num_classes=3, **TINY)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, torch.full((2,), 3)))
        assert not torch.equal(net(x, t), net(x, t, torch.zeros(2, dtype=torch.long)))
    unconditional = ddpm.ResAttUNet(in_channels=1, **TINY)
    with pytest.raises(ValueError, match="class labels y for a network without them"):
        unconditional(x, t, torch.zeros(2, dtype=torch.long))


def test_label_dropout_drops_the_requested_share():
    """drop_labels keeps each label or puts "no label" (K) in its place, with probability drop
    (within 5 standard errors over 200,000 labels) [Ho & Salimans, Alg. 1]."""
    torch.manual_seed(0)
    y = torch.randint(0, 10, (200, 1000))
    out = ddpm.drop_labels(y, 10, 0.1)
    dropped = out == 10
    assert torch.equal(out[~dropped], y[~dropped])
    share = dropped.double().mean().item()
    assert abs(share - 0.1) < 5 * math.sqrt(0.1 * 0.9 / dropped.numel())
    assert not ddpm.drop_labels(y, 10, 0.0).eq(10).any()


def test_folder_classes_come_from_its_subfolders(tmp_path):
    """--dataset folder: one class per immediate subfolder, in sorted order, image by image as
    load_dataset orders them; with an image outside the subfolders, no classes."""
    root = write_image_folder(tmp_path / "two", n=12)  # class0/, class1/ alternately
    _, y, classes = ddpm.load_dataset("folder", root, 8)
    files = sorted(root.rglob("*.png"))
    assert classes == 2 and y.tolist() == [int(f.parent.name[-1]) for f in files]
    _, y4, _ = ddpm.load_dataset("folder", root, 8, max_images=4)
    assert y4.tolist() == [y[i].item() for i in ddpm.evenly_spaced(12, 4)]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "top.png")
    assert ddpm.load_dataset("folder", root, 8)[1:] == (None, 0)


@pytest.fixture(scope="module")
def conditional_run(image_dir, tmp_path_factory):
    """A tiny class-conditional run (two classes: the class0/ and class1/ folders)."""
    out = tmp_path_factory.mktemp("cond")
    with contextlib.redirect_stdout(io.StringIO()):
        flags = ["--class-cond", "--max-steps", "3", "--sample-every", "0", "--sampler", "ddim"]
        assert ddpm.main(train_flags(image_dir, out, *flags, "--sample-steps", "4")) == 0
    return out


def test_conditional_run_round_trip_and_pictures(conditional_run, tmp_path, capsys):
    """A --class-cond checkpoint keeps its label table and class count, resumes, and samples
    --class all as one row per class (each row from its own label); its final pictures have
    one row per class too."""
    ckpt = state_of(conditional_run)
    assert ckpt["config"]["num_classes"] == 2 and ckpt["config"]["class_cond"] is True
    assert ckpt["model"]["label_emb.weight"].shape == (3, 128)
    assert ckpt["config"]["sampler"] == "ddim, 4 steps, eta 0, guidance w = 0.5, 8 of each class"
    grid = read_png(conditional_run / "samples.png")
    assert grid.shape == (3, 2 + 2 * 10, 2 + 8 * 10)  # 2 classes x 8 images of 8 px
    assert read_png(conditional_run / "reverse_process.png").shape == (3, 2 + 2 * 10, 2 + 10 * 10)
    image_dir = ckpt["config"]["data_dir"]
    resume = train_flags(image_dir, conditional_run, "--resume", "--max-steps", "4", "--sampler", "ddim")
    assert ddpm.main([*resume, "--sample-steps", "2"]) == 0
    assert state_of(conditional_run)["step"] == 4
    calls = []
    real = ddpm.Guided.__init__

    def spy(self, model, y, w, K):
        calls.append((y.tolist(), w, K))
        real(self, model, y, w, K)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.Guided, "__init__", spy)
        ckpt = conditional_run / "ckpt.pt"
        every = ["--num-samples", "16", "--class", "all", "--guidance", "2"]
        assert ddpm.main(sample_flags(ckpt, tmp_path / "all", *every)) == 0
        one = ["--num-samples", "4", "--class", "1"]
        assert ddpm.main(sample_flags(ckpt, tmp_path / "one", *one)) == 0
        few = ["--num-samples", "4", "--class", "all"]  # a row per class still
        assert ddpm.main(sample_flags(ckpt, tmp_path / "few", *few)) == 0
    assert calls[0] == ([0] * 8 + [1] * 8, 2.0, 2) and calls[1] == ([1] * 4, 0.5, 2)
    assert read_png(tmp_path / "all" / "grid.png").shape == (3, 2 + 2 * 10, 2 + 8 * 10)
    assert read_png(tmp_path / "few" / "grid.png").shape == (3, 2 + 2 * 10, 2 + 8 * 10)
    assert read_samples(tmp_path / "few").shape[0] == 16
    (record,) = json.loads((tmp_path / "all" / "sample.json").read_text())
    assert record["sampler"] == "ddim, 5 steps, eta 0, guidance w = 2, 8 of each class"


def test_guidance_flags_end_in_one_line(trained_run, conditional_run, image_dir, tmp_path, capsys):
    """--class on an unconditional checkpoint, a class the model does not know, and --class-cond
    on a folder with images outside class subfolders each end in one line."""
    unconditional = sample_flags(trained_run / "ckpt.pt", tmp_path / "s", "--class", "1")
    expect_error(unconditional, "--class", "not class-conditional", capsys=capsys)
    unknown = sample_flags(conditional_run / "ckpt.pt", tmp_path / "s", "--class", "2")
    expect_error(unknown, "--class 2", "classes 0 to 1", capsys=capsys)
    expect_error(["sample", "--ckpt", "x.pt", "--class", "one"], "--class", capsys=capsys)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "a.png")
    flags = train_flags(flat, tmp_path / "run", "--class-cond")
    expect_error(flags, "--class-cond", "a subfolder each", capsys=capsys)
    flags = train_flags(image_dir, tmp_path / "run", "--class-cond", "--cond-drop", "0")
    expect_error(flags, "--cond-drop 0", "no 'no label' row", capsys=capsys)


README = Path(ddpm.__file__).with_name("README.md")


def readme_commands(text):
    """The arguments of every ddpm.py command in the README: in bash blocks and inline code."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split(" #")[0].split("&&"):
                tokens = shlex.split(part)
                if "ddpm.py" in tokens:
                    commands.append(tokens[tokens.index("ddpm.py") + 1 :])
    for inline in re.findall(r"`python ddpm\.py([^`]*)`", text.replace("\n", " ")):
        commands.append(shlex.split(inline))
    return commands


def test_readme_commands_parse_and_pictures_exist():
    """Every ddpm.py command line in the README is accepted by the parser; every picture it shows is
    in assets/ and small; it is a front page of at most 300 lines."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    commands = readme_commands(text)
    assert len(commands) >= 15
    for argv in commands:
        if "--help" in argv:
            with pytest.raises(SystemExit) as done:
                ddpm.parse_args(argv)
            assert done.value.code == 0
        else:
            ddpm.parse_args(argv)  # raises UserError (one line) for any flag or value it does not take
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
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


# -----------------------------------------------------------------------------
# import: the paper's released weights, from diffusers' format (after the banner)
# -----------------------------------------------------------------------------
CIFAR10_UNET = dict(  # diffusers' UNet2DModel configuration of google/ddpm-cifar10-32
    _class_name="UNet2DModel",
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=[128, 256, 256, 256],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    **ddpm.PAPER_UNET,
)
TINY_UNET = dict(CIFAR10_UNET, sample_size=8, layers_per_block=1, block_out_channels=[32, 64])
TINY_UNET.update(down_block_types=["DownBlock2D", "AttnDownBlock2D"])
TINY_UNET.update(up_block_types=["AttnUpBlock2D", "UpBlock2D"])


def diffusers_folder(folder, config, state, scheduler=None):
    """A folder as diffusers writes one: config.json and diffusion_pytorch_model.bin (a pipeline:
    unet/ and scheduler/ when a scheduler configuration is given)."""
    unet = folder / "unet" if scheduler else folder
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(config))
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    if scheduler:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def as_diffusers(net):
    """A network's weights under diffusers' names (TO_DIFFUSERS's rules; q, k and v apart)."""
    state = {}
    for name, tensor in net.state_dict().items():
        for pattern, replacement in ddpm.TO_DIFFUSERS:
            name = re.sub(pattern, replacement, name)
        if tensor.ndim == 4 and ("qkv" in name or "to_out" in name):
            tensor = tensor.flatten(1)  # a 1x1 conv's kernel, as a linear layer's (C_out, C_in)
        if ".qkv." in name:
            for kind, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3)):
                state[name.replace("qkv", kind)] = part
        else:
            state[name] = tensor
    return state


def test_import_writes_a_checkpoint_that_samples_as_the_folders_network(image_dir, tmp_path):
    """import reads a diffusers folder (a UNet folder or a pipeline with unet/ and scheduler/),
    builds the network its configuration describes, puts every weight in its place and writes a
    ckpt.pt that sample reads and --resume trains on: the network computes what the original did."""
    torch.manual_seed(0)
    net = randomized(ddpm.ResAttUNet(in_channels=3, **{**TINY, "attn_resolutions": (4,)})).eval()
    schedule = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=20)
    folder = diffusers_folder(tmp_path / "pipe", TINY_UNET, as_diffusers(net), schedule)
    data = ["--dataset", "folder", "--data-dir", str(image_dir)]
    assert ddpm.main(["import", str(folder), "--out-dir", str(tmp_path / "run"), *data]) == 0
    model, diffusion, config = ddpm.load_sampler(tmp_path / "run" / "ckpt.pt", torch.device("cpu"))
    assert config["attn_resolutions"] == [4] and config["channel_mult"] == [1, 2]
    assert config["timesteps"] == 20 and config["model"] == "res_att"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 19])
    with torch.no_grad():
        assert torch.equal(model(x, t), net(x, t))
    samples = sample_flags(tmp_path / "run" / "ckpt.pt", tmp_path / "s")
    assert ddpm.main(samples) == 0
    resume = train_flags(image_dir, tmp_path / "run", "--resume", "--max-steps", "2")
    fast = ["--sample-every", "0", "--sampler", "ddim", "--sample-steps", "2"]
    assert ddpm.main([*resume, *fast]) == 0 and state_of(tmp_path / "run")["step"] == 2


def test_import_refuses_foreign_and_broken_folders_in_one_line(tmp_path, monkeypatch, capsys):
    """Not a folder, another network, another schedule, no weights, a weight missing, misshapen or
    left over, and safetensors without its package: one line each, naming the first misfit."""
    net = ddpm.ResAttUNet(in_channels=3, **TINY)
    state = as_diffusers(net)

    def attempt(name, config, weights, *words, scheduler=None):
        folder = diffusers_folder(tmp_path / name, config, weights, scheduler)
        expect_error(["import", str(folder), "--out-dir", str(tmp_path / "out")], *words, capsys=capsys)

    expect_error(["import", str(tmp_path / "none")], "config.json", capsys=capsys)
    attempt("foreign", dict(TINY_UNET, _class_name="UNet2DConditionModel"), state, "_class_name")
    attempt("flip", dict(TINY_UNET, flip_sin_to_cos=True), state, "flip_sin_to_cos = True")
    attempt("list", dict(TINY_UNET, sample_size=[8, 16]), state, "not a UNet2DModel's configuration")
    cosine = dict(beta_schedule="squaredcos_cap_v2")
    attempt("cosine", TINY_UNET, state, "beta_schedule = squaredcos_cap_v2", scheduler=cosine)
    missing = {k: v for k, v in state.items() if k != "conv_out.weight"}
    attempt("missing", TINY_UNET, missing, "conv_out.weight is missing")
    attempt("shape", TINY_UNET, {**state, "conv_in.weight": torch.zeros(32, 3, 5, 5)}, "conv_in.weight")
    attempt("extra", TINY_UNET, {**state, "class_embedding.weight": torch.zeros(3)}, "no place")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY_UNET))
    expect_error(["import", str(tmp_path / "empty")], "diffusion_pytorch_model", capsys=capsys)
    (tmp_path / "empty" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    expect_error(["import", str(tmp_path / "empty")], "pip install safetensors", capsys=capsys)
    assert not (tmp_path / "out").exists()


def test_import_by_name_downloads_through_huggingface_hub(image_dir, tmp_path, monkeypatch, capsys):
    """import NAME (owner/name, not a folder here) asks huggingface_hub for the model's
    configurations and weights, then imports that folder; without the package, or offline, one
    line each (tested with the download stubbed: no test reaches the internet)."""
    torch.manual_seed(0)
    net = ddpm.ResAttUNet(in_channels=3, **{**TINY, "attn_resolutions": (4,)})
    folder = diffusers_folder(tmp_path / "hub" / "snapshot", TINY_UNET, as_diffusers(net))
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        if repo_id == "google/offline":
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub", SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.chdir(tmp_path)
    out = ["--out-dir", str(tmp_path / "run"), "--dataset", "folder", "--data-dir", str(image_dir)]
    assert ddpm.main(["import", "google/ddpm-tiny", *out]) == 0
    assert asked[0][0] == "google/ddpm-tiny" and "*.json" in asked[0][1]
    model = ddpm.load_sampler(tmp_path / "run" / "ckpt.pt", torch.device("cpu"))[0]
    assert torch.equal(model.state_dict()["conv_in.weight"], net.state_dict()["conv_in.weight"])
    expect_error(["import", "google/offline", *out], "could not download google/offline", capsys=capsys)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    expect_error(["import", "google/ddpm-cifar10-32"], "pip install huggingface_hub", capsys=capsys)


def test_import_of_diffusers_unet_computes_the_same():
    """Where diffusers is installed: its UNet2DModel in the CIFAR-10 configuration, with random
    weights saved as safetensors and as .bin, imports to a network that computes the same; so does
    the 256-pixel models' layout (6 levels, attention at the fifth), narrower and at 64 pixels."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (CI has none)")
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    cifar10 = {k: v for k, v in CIFAR10_UNET.items() if k != "_class_name"}
    large = dict(cifar10, sample_size=64, block_out_channels=[32, 32, 64, 64, 128, 128])
    large.update(down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"])
    large.update(up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
    for config, size, parameters in ((cifar10, 32, 35_746_307), (large, 64, 7_126_275)):
        torch.manual_seed(0)
        theirs = diffusers.UNet2DModel(**config).eval()
        with torch.no_grad():
            for p in theirs.parameters():  # away from the zero init, so that every weight counts
                p.add_(0.02 * torch.randn_like(p))
        x, t = torch.randn(2, 3, size, size), torch.tensor([3, 700])
        with torch.no_grad():
            expected = theirs(x, t).sample
        with tempfile.TemporaryDirectory() as root:
            for safe in (True, False) if size == 32 else (True,):
                folder = Path(root) / f"unet{safe}"
                theirs.save_pretrained(folder, safe_serialization=safe)
                out = Path(root) / f"run{safe}"
                assert ddpm.main(["import", str(folder), "--out-dir", str(out)]) == 0
                ours = ddpm.load_sampler(out / "ckpt.pt", torch.device("cpu"))[0]
                with torch.no_grad():
                    got = ours(x, t)
                assert ddpm.count_parameters(ours) == parameters
                assert (got - expected).norm() < 1e-4 * expected.norm()
