"""
ddpm.py: Denoising Diffusion Probabilistic Models in one file.

A faithful, readable PyTorch implementation of Ho, Jain & Abbeel, "Denoising Diffusion
Probabilistic Models" (arXiv:2006.11239, 2020), checked against the paper's official code.
Parts I-III are the method: read them with the paper open, or paste them alone into a notebook,
where they train, sample and measure the bound. After the banner that ends Part III come the
extras (DDIM, classifier-free guidance) and the engineering (progress lines, checkpoints, FID and
IS, signals, DDP, the command line). README.md has the commands; the main one:
    pip install -r requirements.txt && python ddpm.py --model res_att --epochs 100

Paper symbols and their names here
    T                       num_timesteps (--timesteps)
    beta_t                  betas
    alpha_t = 1 - beta_t    alphas
    alpha_bar_t             alphas_cumprod              (product of alpha_s for s <= t)
    beta_tilde_t            posterior_variance          [Eq. 7]
    mu_tilde_t(x_t, x_0)    q_posterior(...)[0]         [Eq. 7]
    mu_theta(x_t, t)        the mean in p_sample        [Eq. 11]
    eps, eps_theta          noise, eps_pred = model(x_t, t)
    x_0, x_t, z             x_0, x_t, noise              (tensors in [-1, 1] for images)
    sigma_t^2               beta_t ("fixedlarge") or beta_tilde_t ("fixedsmall")   [Sec. 3.2]
    L; L_0, L_{t-1}; L_T    bits_per_dim; vb_term; prior_bpd (in bits/dim)      [Eq. 5, 13]

The time-index rule (the one place off-by-one bugs live)
    Code t in {0, ..., T-1} stands for paper step t+1. Training draws t = randint(0, T); the
    sampler runs t = T-1, ..., 0 and adds no noise at t = 0. The network always sees the code t.

Shape letters
    B batch, C channels, H height, W width, N = H*W positions, K sampler steps kept.

Deliberate deviations from the paper (each marked NOTE(paper) where it happens)
    1. Sampling clips the predicted x_0 to [-1, 1] and takes the posterior mean, as the official
       code does; with clip_denoised=False it is Eq. 11 and Algorithm 2 exactly.
    2. The EMA decay warms up as min(0.9999, (1 + n) / (10 + n)), so that a short run's EMA is
       not pure noise; the paper uses a flat 0.9999.
    3. An epoch is floor(50000 / 128) = 390 full batches (the last partial batch is dropped, so
       that every step has one shape).
    4. Mixed precision (bf16 autocast) on CUDA by default; --amp none for float32.
    5. The bound in bits/dim follows the official code: the decoder's variance at t = 1 is
       beta_tilde_2 (not beta_1) with "fixedlarge", and its normal CDF is a tanh approximation.
    6. Extras the paper does not have, after the banner: DDIM (Song et al. 2021) and
       classifier-free guidance (Ho & Salimans 2022; the optional label input).

Section map
    Part I   the diffusion process: linear_beta_schedule, extract, the bound's KL and decoder,
             GaussianDiffusion (q, p_theta, and the bound L in bits/dim)
    Part II  the networks: the blocks, ResAttUNet (the paper's network), ResUNet, ConvUNet
    Part III training (Alg. 1: train_step, train_iteration, train_loop), sampling (Alg. 2)
    Extras   ddim_sample_loop, Guided
    Engineering: progress lines, data, checkpoints, Draw (how images are drawn), FID and IS,
             train, sample, fid, nll, compare, import, the command line
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torchvision.utils import save_image


# =============================================================================
# Part I. The diffusion process  [Sec. 2, Sec. 3]
# =============================================================================
# --- The noise schedule  [Sec. 4] ----------------------------------------------------------------
def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    """The forward-process variances beta_1..beta_T, evenly spaced from beta_start to beta_end
    [Sec. 4: "increasing linearly from 1e-4 to 0.02"], as a float64 tensor of shape (T,)."""
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ValueError(f"timesteps must be an integer >= 2, got {timesteps!r}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    # float64 so that alpha_bar, a product of 1000 factors, keeps its digits
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


# --- extract: one coefficient per sample, ready to broadcast  [the per-t scalars of Eq. 4-15] ----
# Time-index rule: code t in {0..T-1} is paper step t+1, so a[t] is the paper's a_{t+1}.
def extract(a, t, x_shape):
    """Gather a[t] for each sample of the batch, on a's device (t is moved there), shaped
    (B, 1, 1, 1) to broadcast over an x of shape x_shape."""
    B = t.shape[0]
    out = a.gather(0, t.to(a.device))  # (B,)
    return out.reshape(B, *((1,) * (len(x_shape) - 1)))  # (B, 1, 1, 1)


# --- The pieces of the bound: two Gaussians' KL, and the discrete decoder  [Eq. 5, Eq. 13] --------
# All elementwise and in nats; GaussianDiffusion.vb_term averages them into bits/dim.
def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats: the closed form
    that makes every term of L [Eq. 5] but L_0 and L_T a comparison of two Gaussians [Sec. 2]."""
    variance_ratio = torch.exp(log_var1 - log_var2)  # s1 / s2, with s the variances
    squared_gap = (mean1 - mean2) ** 2 * torch.exp(-log_var2)  # (m1 - m2)^2 / s2
    # 0.5 (-1 + log(s2 / s1) + s1 / s2 + (m1 - m2)^2 / s2)
    return 0.5 * (-1.0 + log_var2 - log_var1 + variance_ratio + squared_gap)


def approx_standard_normal_cdf(x):
    """Phi(x), the standard normal CDF, by the tanh approximation the official code uses:
    0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))."""
    # NOTE(paper): the official code's approximation, not erf: the bound moves by ~3e-4 bits/dim
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """The decoder p_theta(x_0 | x_1) of Eq. 13, elementwise, in nats: log of the mass that
    N(mean, exp(log_scale)^2) puts on x's bin [x - 1/255, x + 1/255], for pixels x in {0..255}
    scaled to [-1, 1]; the bins of -1 and 1 are open to -inf and inf, so the 256 masses sum to 1.
    Uses: approx_standard_normal_cdf."""
    centered_x = x - mean
    inv_stdv = torch.exp(-log_scale)  # 1 / sigma_1
    # delta_+(x) = x + 1/255 and delta_-(x) = x - 1/255 [Eq. 13], standardised
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    cdf_min = approx_standard_normal_cdf(min_in)
    # each probability is kept >= 1e-12 before its log, as the official code does
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()  # x = -1: delta_-(x) = -inf
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()  # x = 1: delta_+(x) = inf
    log_cdf_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()  # the 254 inner bins
    # the edge tests use +-0.999, away from the neighbouring pixels at +-(1 - 2/255)
    top_or_inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    return torch.where(x < -0.999, log_cdf_plus, top_or_inner)


# --- The forward process q and one step of the reverse process p_theta  [Sec. 2-3, Eq. 1-15] -----
class GaussianDiffusion(nn.Module):
    """The fixed forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and the
    learned reverse process p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) [Eq. 1-2]. No
    learned parameters: the schedule as float32 buffers (computed in float64), which `.to(device)`
    moves. `model` is any callable model(x_t, t) -> eps_pred, t a (B,) LongTensor. Uses: extract,
    and for the bound in bits/dim: normal_kl, discretized_gaussian_log_likelihood."""

    def __init__(self, betas):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D schedule of at least 2 values in (0, 1)")
        self.num_timesteps = len(betas)  # T
        # alpha_t = 1 - beta_t  [Sec. 2, before Eq. 4]
        alphas = 1.0 - betas
        # alpha_bar_t = prod_{s<=t} alpha_s  [Sec. 2, before Eq. 4]
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_0 = 1 before the first step
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        ac = alphas_cumprod  # short names for the formulas below
        ac_prev = alphas_cumprod_prev
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t [Eq. 7], 0 at t = 1
        pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        buffers = {  # each glossed with its symbol and the code that reads it
            "betas": betas,  # beta_t; p_sample (Eq. 11, and sigma_t^2 = beta_t)
            "alphas_cumprod": ac,  # alpha_bar_t; DDIM, after the banner
            "sqrt_alphas_cumprod": ac.sqrt(),  # sqrt(alpha_bar_t); q_sample
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),  # sqrt(1 - alpha_bar_t); q_sample
            "sqrt_recip_alphas": alphas.rsqrt(),  # 1 / sqrt(alpha_t); p_sample (Eq. 11)
            "sqrt_recip_alphas_cumprod": ac.rsqrt(),  # sqrt(1 / alpha_bar_t); predict_x0_from_eps
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),  # sqrt(1 / alpha_bar_t - 1)
            "posterior_variance": pv,  # beta_tilde_t [Eq. 7]; q_posterior, p_sample
            # log beta_tilde_t, its 0 at t = 1 (no log) replaced by beta_tilde_2 as the official
            # code does; vb_term (q's variance, and p_theta's for "fixedsmall")
            "posterior_log_variance_clipped": torch.cat([pv[1:2], pv[1:]]).log(),
            # log sigma_t^2 for "fixedlarge": log beta_t [Sec. 3.2], but log beta_tilde_2 at t = 1
            # as the official code (see vb_term); vb_term
            "fixedlarge_log_variance": torch.cat([pv[1:2], betas[1:]]).log(),
            # beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t): the weight of x_0 in mu_tilde
            # [Eq. 7]; q_posterior
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            # (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t): the weight of x_t in
            # mu_tilde [Eq. 7]; q_posterior
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        # float32, moved by .to(device), rebuilt rather than saved
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x_0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) in closed form  [Eq. 4]:
        x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps."""
        if noise is None:
            noise = torch.randn_like(x_0)  # eps ~ N(0, I)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0  # (B, 1, 1, 1) * (B, C, H, W)
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise
        )

    def p_losses(self, model, x_0, t=None, noise=None):
        """L_simple [Eq. 14], Algorithm 1, lines 3-5: the mean squared error between the true
        noise and the network's prediction of it from x_t."""
        B = x_0.shape[0]
        if t is None:
            # Alg. 1, line 3: t ~ Uniform({1, ..., T}), i.e. code t in {0..T-1}
            t = torch.randint(0, self.num_timesteps, (B,), device=self.betas.device)
        if noise is None:
            noise = torch.randn_like(x_0)  # Alg. 1, line 4: eps ~ N(0, I)
        # the argument of eps_theta in Alg. 1, line 5:
        # sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        x_t = self.q_sample(x_0, t, noise)
        eps_pred = model(x_t, t)
        # Alg. 1, line 5: || eps - eps_theta(x_t, t) ||^2, averaged over pixels and batch
        return F.mse_loss(eps_pred.float(), noise.float())

    def predict_x0_from_eps(self, x_t, t, eps):
        """Invert Eq. 4 for x_0 given the noise  [Eq. 15]:
        x_0 = sqrt(1 / alpha_bar_t) * x_t - sqrt(1 / alpha_bar_t - 1) * eps."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def q_posterior(self, x_0, x_t, t):
        """The forward-process posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)
        [Eq. 6-7]. Returns (mean, variance), the variance shaped (B, 1, 1, 1)."""
        # mu_tilde_t = coef1 * x_0 + coef2 * x_t  [Eq. 7]
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return mean, extract(self.posterior_variance, t, x_t.shape)  # beta_tilde_t  [Eq. 7]

    def p_sample(self, model, x_t, t, noise=None, clip_denoised=True, variance="fixedlarge"):
        """One reverse step x_t -> x_{t-1}  [Alg. 2, lines 3-4]. `t` is a Python int shared by
        the batch; `noise` fixes z (drawn when None)."""
        if variance not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"variance must be 'fixedlarge' or 'fixedsmall', got {variance!r}")
        shape = x_t.shape
        B = shape[0]
        t_batch = torch.full((B,), t, device=x_t.device, dtype=torch.long)  # (B,)
        eps_pred = model(x_t, t_batch)  # eps_theta(x_t, t)
        if clip_denoised:
            # NOTE(paper): the official code's route to mu_theta: predict x_0 [Eq. 15], clip it to
            # [-1, 1] where the data lives, and take the posterior mean mu_tilde(x_t, x_0) [Eq. 7].
            # Where the clip changes nothing this is Eq. 11 below (tested).
            x_0_pred = self.predict_x0_from_eps(x_t, t_batch, eps_pred).clamp(-1.0, 1.0)
            mean, _ = self.q_posterior(x_0_pred, x_t, t_batch)
        else:
            # Eq. 11: mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta) / sqrt(alpha_t)
            beta_t = extract(self.betas, t_batch, shape)  # (B, 1, 1, 1)
            eps_coef = beta_t / extract(self.sqrt_one_minus_alphas_cumprod, t_batch, shape)
            mean = extract(self.sqrt_recip_alphas, t_batch, shape) * (x_t - eps_coef * eps_pred)
        if t == 0:
            return mean  # Alg. 2, line 3: z = 0 at the last step, so x_0 is the mean
        if noise is None:
            noise = torch.randn_like(x_t)  # Alg. 2, line 3: z ~ N(0, I)
        # sigma_t^2 = beta_t ("fixedlarge", the paper's CIFAR-10 choice) or beta_tilde_t [Sec. 3.2]
        sigma = (self.betas[t] if variance == "fixedlarge" else self.posterior_variance[t]).sqrt()
        # Alg. 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z
        return mean + sigma * noise

    def vb_term(self, model, x_0, x_t, t, variance="fixedlarge", clip_denoised=True):
        """One term of the variational bound L [Eq. 5] at the code steps t (B,), in bits/dim (B,).
        With s = t + 1 the paper's step: where s >= 2, L_{s-1} = KL(q(x_{s-1} | x_s, x_0) ||
        p_theta(x_{s-1} | x_s)); where s = 1, the decoder's L_0 = -log p_theta(x_0 | x_1) [Eq. 13].
        p_theta's mean is p_sample's, its variance sigma_t^2 as `variance` says; x_t is given, so
        the term is deterministic. Uses: normal_kl, discretized_gaussian_log_likelihood."""
        if variance not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"variance must be 'fixedlarge' or 'fixedsmall', got {variance!r}")
        shape = x_t.shape
        # q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)  [Eq. 6-7]
        true_mean, _ = self.q_posterior(x_0, x_t, t)
        true_log_var = extract(self.posterior_log_variance_clipped, t, shape)  # (B, 1, 1, 1)
        # p_theta(x_{t-1} | x_t): the mean as p_sample takes it, from x_0 predicted [Eq. 15]
        eps_pred = model(x_t, t).to(x_t.dtype)  # x_t's float32, even if the model ran in bf16
        x_0_pred = self.predict_x0_from_eps(x_t, t, eps_pred)
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)  # NOTE(paper): as in p_sample
        model_mean, _ = self.q_posterior(x_0_pred, x_t, t)  # mu_theta(x_t, t)
        # log sigma_t^2: log beta_t ("fixedlarge") or log beta_tilde_t ("fixedsmall") [Sec. 3.2].
        # NOTE(paper): at t = 1 (code 0) both take beta_tilde_2 (not beta_1, nor beta_tilde_1 = 0)
        # as the official code does, for "fixedlarge" "to get a better decoder log likelihood"
        log_vars = self.fixedlarge_log_variance
        if variance == "fixedsmall":
            log_vars = self.posterior_log_variance_clipped
        model_log_var = extract(log_vars, t, shape)  # (B, 1, 1, 1)
        # L_{t-1}: the KL of two Gaussians per dimension [Eq. 5], in nats
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)  # (B, C, H, W)
        # L_0 = -log p_theta(x_0 | x_1), the discrete decoder [Eq. 13]; log sigma = log sigma^2 / 2
        nll = -discretized_gaussian_log_likelihood(x_0, model_mean, 0.5 * model_log_var)
        # bits/dim: the mean over the C*H*W dimensions, in bits
        kl_bits = kl.flatten(1).mean(1) / math.log(2.0)  # (B,)
        nll_bits = nll.flatten(1).mean(1) / math.log(2.0)  # (B,)
        return torch.where(t == 0, nll_bits, kl_bits)  # (B,): L_0 at t = 0, else L_{t-1}

    def prior_bpd(self, x_0):
        """The prior term of L [Eq. 5], L_T = KL(q(x_T | x_0) || N(0, I)), in bits/dim (B,). It has
        no learned part: under 3e-5 bits/dim with the paper's schedule. Uses: normal_kl."""
        # q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I)  [Eq. 4]
        mean = self.sqrt_alphas_cumprod[-1] * x_0
        log_var = (1.0 - self.alphas_cumprod[-1]).log()  # log(1 - alpha_bar_T)
        zero = torch.zeros_like(mean)  # p(x_T) = N(0, I): mean 0, log variance 0
        kl = normal_kl(mean, log_var, zero, zero)  # (B, C, H, W)
        return kl.flatten(1).mean(1) / math.log(2.0)  # (B,)

    @torch.inference_mode()
    def vb_terms(self, model, x_0, variance="fixedlarge", generator=None):
        """L_0, L_1, ..., L_{T-1} of the bound [Eq. 5] in bits/dim, (B, T): column t is vb_term at
        code t, the paper's L_t, on its own x_t ~ q(x_t | x_0), one fresh draw per image and step,
        as the official calc_bpd_loop. `generator` draws the noise; the model must be in eval()."""
        B = x_0.shape[0]
        columns = []
        for t in range(self.num_timesteps):
            t_batch = torch.full((B,), t, device=x_0.device, dtype=torch.long)  # (B,)
            noise = torch.randn(  # eps ~ N(0, I), fresh for each step
                x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype
            )
            x_t = self.q_sample(x_0, t_batch, noise)  # [Eq. 4]
            columns.append(self.vb_term(model, x_0, x_t, t_batch, variance=variance))  # (B,)
        return torch.stack(columns, dim=1)  # (B, T)

    @torch.inference_mode()
    def bits_per_dim(self, model, x_0, variance="fixedlarge", generator=None):
        """The variational bound L = L_0 + sum_{t>1} L_{t-1} + L_T [Eq. 5] in bits/dim, (B,): the
        negative log-likelihood bound of the paper's Table 1, for pixels x_0 = uint8 / 127.5 - 1
        (no dequantisation noise). Uses vb_terms (a fresh x_t per step) and prior_bpd."""
        return self.vb_terms(model, x_0, variance, generator).sum(1) + self.prior_bpd(x_0)


# =============================================================================
# Part II. The noise-prediction networks eps_theta(x_t, t)  [Sec. 4; App. B]
# =============================================================================
# --- Building blocks  [App. B: "a U-Net backbone similar to an unmasked PixelCNN++"] -------------
def timestep_embedding(t, dim):
    """The sinusoidal embedding of the step [Sec. 4: "the Transformer sinusoidal position
    embedding"], (B,) -> (B, dim), as the official code computes it, which differs from
    Vaswani et al. (it says so too): frequencies 10000^(-i / (half - 1)), i = 0..half-1, not
    10000^(-2i / dim), and the sines fill the first half of the channels and the cosines the
    second, rather than alternating."""
    half = dim // 2
    # frequencies 10000^(-i / (half - 1)) for i = 0..half-1: (half,)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


def init_(layer, scale=1.0):
    """The official initialisation: weights ~ variance_scaling(scale, "fan_avg", "uniform"),
    which is xavier_uniform with gain sqrt(scale); biases 0. scale=0 gives zeros."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels):
    """GroupNorm with 32 groups, the paper's replacement for weight normalisation [App. B]."""
    return nn.GroupNorm(32, channels, eps=1e-6)


def attention(q, k, v):
    """softmax(q k^T / sqrt(C)) v over the keys (each query's weights sum to 1): (..., N, C) ->
    (..., N, C). AttnBlock has F.scaled_dot_product_attention compute exactly this in one fused
    kernel (tested equal)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., N queries, N keys)
    return scores.softmax(dim=-1) @ v  # (..., N, C)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, GroupNorm -> SiLU before each, the time embedding added after the
    first and dropout before the second [App. B]. No shortcut: the plain block of ConvUNet."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = init_(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = init_(nn.Linear(temb_ch, out_ch))  # per-channel bias from the time step
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = init_(nn.Conv2d(out_ch, out_ch, 3, padding=1))

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # + (B, out_ch, 1, 1)
        return self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out_ch, H, W)


class ResBlock(ConvBlock):
    """The paper's residual block: x + F(x), F a ConvBlock (He et al. 2016), with a 1x1 conv on the
    shortcut when the channels change. F's last conv starts at zero: every block starts as the
    identity [official code]."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__(in_ch, out_ch, temb_ch, dropout)
        nn.init.zeros_(self.conv2.weight)
        self.shortcut = init_(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        return self.shortcut(x) + super().forward(x, temb)  # (B, out_ch, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the N = H*W positions, with a residual connection
    [App. B]: x + proj_out(softmax(q k^T / sqrt(C)) v), q, k and v 1x1 convs of GroupNorm(x)."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # q, k and v: three 1x1 convs computed as one
        for w in self.qkv.weight.chunk(3):  # each initialised as its own C x C layer, as the
            nn.init.xavier_uniform_(w)  # official code's three are (fan_avg over C and C, not 3C)
        nn.init.zeros_(self.qkv.bias)
        self.proj_out = init_(nn.Conv2d(ch, ch, 1), scale=0.0)  # zero: starts as the identity

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, N, 3C) with N = H*W
        q, k, v = qkv[:, None].chunk(3, dim=-1)  # 3 x (B, 1, N, C): one head
        h = F.scaled_dot_product_attention(q, k, v)  # = attention(q, k, v), fused: (B, 1, N, C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Sequential):
    """Halve the resolution with a stride-2 3x3 conv [App. B], padded at the right and bottom only:
    TensorFlow's "SAME" padding for a stride-2 conv, as the paper's code has. (B, C, H/2, W/2)."""

    def __init__(self, ch):
        super().__init__(nn.ZeroPad2d((0, 1, 0, 1)), init_(nn.Conv2d(ch, ch, 3, stride=2)))


class Upsample(nn.Sequential):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv [App. B]. (B, C, 2H, 2W)."""

    def __init__(self, ch):
        super().__init__(nn.Upsample(scale_factor=2.0), init_(nn.Conv2d(ch, ch, 3, padding=1)))


# --- The paper's network, then the two ablations of the three-model experiment  [App. B] ---------
# The paper's network comes first, as one unit like the official unet.py; the other two are it
# with a part taken away, and read as such.


class ResAttUNet(nn.Module):
    """The paper's CIFAR-10 network eps_theta(x_t, t): 35,746,307 parameters at the defaults. A UNet
    over len(channel_mult) levels (32, 16, 8 and 4 pixels by default). Going down, each level runs
    num_res_blocks residual blocks, with self-attention after each at the attn_resolutions, then
    halves the resolution; the middle runs block, attention, block; going up, each level runs
    num_res_blocks + 1 blocks, each fed the running features joined with one saved skip, then
    doubles the resolution. Every block sees the time embedding. `block` and `with_attention` serve
    the ablations; num_classes > 0 adds a class label y to the time embedding (not in the paper:
    classifier-free guidance, after the banner), label num_classes standing for "no label"."""

    def __init__(
        self,
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        image_size=32,
        block=ResBlock,
        with_attention=True,
        num_classes=0,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]  # channels at each level
        levels = len(widths)
        if levels < 1 or num_res_blocks < 1 or in_channels < 1 or not 0 <= dropout < 1:
            raise ValueError("need levels, num_res_blocks, in_channels >= 1 and 0 <= dropout < 1")
        if image_size % 2 ** (levels - 1):
            halvings = f"2**(len(channel_mult)-1) = {2 ** (levels - 1)}"  # each level halves it
            raise ValueError(f"image_size={image_size} must be divisible by {halvings}")
        if base_channels < 32 or any(w % 32 for w in widths):
            why = "so that GroupNorm(32) can split them"
            raise ValueError(f"channel widths {widths} must be multiples of 32 {why}")
        self.base_channels = base_channels
        self.num_classes = num_classes
        temb_ch = 4 * base_channels
        # timestep embedding: sinusoid (base) -> Linear (4 base) -> SiLU -> Linear (4 base)
        self.temb = nn.Sequential(
            init_(nn.Linear(base_channels, temb_ch)), nn.SiLU(), init_(nn.Linear(temb_ch, temb_ch))
        )
        self.conv_in = init_(nn.Conv2d(in_channels, base_channels, 3, padding=1))
        if num_classes:  # one learned vector per class, and one for "no label"
            self.label_emb = nn.Embedding(num_classes + 1, temb_ch)

        # one step of a level: a block, then attention where the resolution has it
        def stage(in_ch, out_ch, res):
            attend = with_attention and res in attn_resolutions
            attn = AttnBlock(out_ch) if attend else nn.Identity()
            return nn.ModuleList([block(in_ch, out_ch, temb_ch, dropout), attn])

        # Down: every stage output and every downsampled map is a skip the up path will take
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base_channels]  # the channels of each skip, in the order they are made
        ch = base_channels  # the channels of the running features
        res = image_size  # their resolution
        for level, width in enumerate(widths):
            self.down.append(nn.ModuleList())
            for _ in range(num_res_blocks):
                self.down[level].append(stage(ch, width, res))
                ch = width
                skips.append(ch)
            if level != levels - 1:
                self.downsample.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        # Middle, at the lowest resolution: block, attention, block
        self.mid_block1 = block(ch, ch, temb_ch, dropout)
        self.mid_attn = AttnBlock(ch) if with_attention else nn.Identity()
        self.mid_block2 = block(ch, ch, temb_ch, dropout)
        # Up: num_res_blocks + 1 stages per level, each joining one skip
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            self.up.append(nn.ModuleList())
            for _ in range(num_res_blocks + 1):
                self.up[-1].append(stage(ch + skips.pop(), width, res))
                ch = width
            if level != 0:
                self.upsample.append(Upsample(ch))
                res *= 2
        assert not skips, "every skip is taken exactly once"
        self.norm_out = group_norm(ch)
        self.conv_out = init_(nn.Conv2d(ch, in_channels, 3, padding=1), scale=0.0)  # zero init

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images x_t, t: (B,) code steps, y: (B,) class labels (None: "no
        label"; only a class-conditional network takes them) -> eps_pred (B, C, H, W)."""
        temb = self.temb(timestep_embedding(t, self.base_channels))  # (B, 4 base)
        if y is not None and not self.num_classes:
            raise ValueError("class labels y for a network without them (num_classes=0)")
        if self.num_classes:  # as the conditional DDPM and ADM networks do: added to the time's
            y = torch.full_like(t, self.num_classes) if y is None else y  # (B,); None: "no label"
            temb = temb + self.label_emb(y)  # (B, 4 base)
        hs = [self.conv_in(x)]  # (B, base, H, W): the first skip
        for level, stages in enumerate(self.down):
            for block, attn in stages:
                hs.append(attn(block(hs[-1], temb)))  # (B, C_level, H_level, W_level)
            if level < len(self.downsample):
                hs.append(self.downsample[level](hs[-1]))  # (B, C_level, H_level/2, W_level/2)
        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb)), temb)
        for level, stages in enumerate(self.up):
            for block, attn in stages:
                h = torch.cat([h, hs.pop()], dim=1)  # (B, C + C_skip, H_level, W_level)
                h = attn(block(h, temb))  # (B, C_level, H_level, W_level)
            if level < len(self.upsample):
                h = self.upsample[level](h)  # (B, C_level, 2 H_level, 2 W_level)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class ResUNet(ResAttUNet):
    """ResAttUNet without self-attention, at any resolution or in the middle: 34,164,227
    parameters at the defaults. The original project's "Residual UNet"."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs, with_attention=False)


class ConvUNet(ResAttUNet):
    """ResUNet without the blocks' shortcuts: plain ConvBlocks, not zero-initialised (that would cut
    the signal): 32,866,947 parameters at the defaults. The original project's "Conv UNet". The
    UNet's skips still reach the up path (conv_in's output the last block), but within a block the
    signal and the gradient pass through both convolutions with no way around them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs, with_attention=False, block=ConvBlock)


MODELS = {"conv": ConvUNet, "res": ResUNet, "res_att": ResAttUNet}  # the names --model takes


def count_parameters(model):
    """The number of trainable numbers in a model."""
    return sum(p.numel() for p in model.parameters())


# =============================================================================
# Part III. Training and sampling  [Alg. 1, Alg. 2; Sec. 4; App. B]
# =============================================================================
# --- Training  [Alg. 1; App. B: Adam 2e-4, warm-up, gradient clipping, EMA 0.9999, flips] --------
def batch_indices(n, batch_size, step, seed=0):
    """Which of the n training images make the batch of training step `step` (from 0): each epoch
    walks a random permutation of them that depends only on (seed, epoch), in whole batches."""
    # NOTE(paper): an epoch is n // batch_size full batches; the rest of the permutation is dropped
    epoch, i = divmod(step, n // batch_size)
    return epoch_permutation(n, seed + epoch)[i * batch_size : (i + 1) * batch_size]  # (B,)


@functools.lru_cache(maxsize=1)  # one permutation per epoch, not one per step
def epoch_permutation(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)


def get_batch(data, idx, flip):
    """Alg. 1, line 2: x_0 ~ q(x_0). The uint8 images data[idx] as floats in [-1, 1] [Sec. 4],
    each mirrored with probability 1/2 when flip is set (the paper's CIFAR-10 flips) [App. B]."""
    x_0 = data[idx.to(data.device)].float() / 127.5 - 1.0  # (B, C, H, W), {0..255} -> [-1, 1]
    if flip:
        mirror = torch.rand(x_0.shape[0], 1, 1, 1, device=x_0.device) < 0.5  # (B, 1, 1, 1)
        x_0 = torch.where(mirror, x_0.flip(3), x_0)
    return x_0


def make_optimizer(net, lr=2e-4, warmup=5000):
    """Adam with default betas and no weight decay, and the official code's linear learning-rate
    warm-up: lr * min(n / warmup, 1) at step n [App. B]. Returns (optimizer, scheduler)."""
    fused = next(net.parameters()).is_cuda  # one kernel for all parameters on a GPU
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=fused)

    def warm_up(n):  # the factor on lr at step n
        return min(1.0, n / warmup) if warmup else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warm_up)


@torch.no_grad()
def ema_update(ema, net, step, decay=0.9999):
    """The exponential moving average of the weights that samples are drawn from [App. B],
    parameter by parameter, at training step `step` (from 0)."""
    # NOTE(paper): the decay warms up as (1 + n) / (10 + n) before reaching 0.9999, so that a
    # short run's EMA is not an average over mostly random initial weights
    d = min(decay, (1 + step) / (10 + step))
    for ema_p, net_p in zip(ema.parameters(), net.parameters()):
        ema_p.lerp_(net_p, 1 - d)  # ema = d * ema + (1 - d) * net


def train_step(model, diffusion, optimizer, x_0, grad_clip=1.0, amp=None):
    """Algorithm 1, lines 3-5 on the batch x_0, with the official code's gradient clipping. amp:
    the autocast dtype (None: float32). Returns (loss, grad_norm), tensors not waited for here."""
    with torch.autocast(x_0.device.type, dtype=amp, enabled=amp is not None):
        loss = diffusion.p_losses(model, x_0)  # Alg. 1, lines 3-5: t, eps and L_simple
    loss.backward()  # Alg. 1, line 5: the gradient of L_simple
    weights = optimizer.param_groups[0]["params"]  # the parameters of eps_theta
    grad_norm = nn.utils.clip_grad_norm_(weights, grad_clip)  # their global norm <= grad_clip
    optimizer.step()  # Alg. 1, line 5: the gradient step (Adam)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@dataclasses.dataclass
class Training:
    """What Algorithm 1 updates from one step to the next, and the constants of its update
    [App. B]."""

    net: nn.Module  # eps_theta: the weights that Adam updates
    ema: nn.Module  # their moving average: what samples are drawn from
    optimizer: torch.optim.Optimizer  # Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR  # the learning-rate warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: torch.dtype = None  # autocast's dtype; None: float32


def make_training(net, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999, amp=None):
    """A Training for net: an EMA copy of it, and Adam with its warm-up."""
    ema = copy.deepcopy(net).eval().requires_grad_(requires_grad=False)
    optimizer, scheduler = make_optimizer(net, lr, warmup)
    return Training(
        net=net,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        amp=amp,
    )


def train_iteration(training, diffusion, x_0, step, model=None):
    """One iteration of Algorithm 1 at training step `step` (from 0) on the batch x_0: the
    gradient step, the warm-up and the EMA. model: what computes eps_theta with training.net's
    weights (training.net itself unless given). Returns (loss, grad_norm)."""
    if model is None:
        model = training.net
    loss, grad_norm = train_step(  # Alg. 1, lines 3-5
        model, diffusion, training.optimizer, x_0, grad_clip=training.grad_clip, amp=training.amp
    )
    training.scheduler.step()
    ema_update(training.ema, training.net, step, training.ema_decay)
    return loss, grad_norm


def train_loop(net, diffusion, data, steps, batch_size=128, flip=True, seed=0, **recipe):
    """Algorithm 1 repeated: train net on data (uint8 images (N, C, H, W)) for `steps` steps, each
    on a batch of batch_indices, with the recipe of make_training (lr, warmup, grad_clip,
    ema_decay, amp); returns the EMA copy of its weights, to sample from. The command line runs
    the same iterations, with its operations (checkpoints, logs) between them."""
    training = make_training(net, **recipe)
    net.train()
    for step in range(steps):  # Alg. 1, line 1: repeat
        idx = batch_indices(len(data), batch_size, step, seed)  # (batch_size,)
        x_0 = get_batch(data, idx, flip)  # Alg. 1, line 2: x_0 ~ q(x_0)
        train_iteration(training, diffusion, x_0, step)  # Alg. 1, lines 3-5
    return training.ema  # until converged: 800k steps for the paper's CIFAR-10 result


# --- Sampling  [Alg. 2] --------------------------------------------------------------------------
def check_eval(model):
    """Sampling with dropout on is a classic bug: refuse a module that is still in train()."""
    if getattr(model, "training", False):
        raise ValueError("call model.eval() before sampling: dropout is still active")


@torch.inference_mode()
def p_sample_loop(
    diffusion, model, shape, clip_denoised=True, variance="fixedlarge", x_T=None, generator=None
):
    """Algorithm 2: draw x_T ~ N(0, I) and apply p_sample for t = T-1, ..., 0; returns x_0.
    `generator` makes the draws reproducible; the model must be in eval() mode."""
    check_eval(model)
    device = diffusion.betas.device
    # Alg. 2, line 1: x_T ~ N(0, I)
    x_t = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
    # Alg. 2, line 2: for t = T, ..., 1 (code T-1, ..., 0)
    for t in reversed(range(diffusion.num_timesteps)):
        # Alg. 2, line 3: z ~ N(0, I) if t > 1 (code t > 0), else z = 0
        z = torch.randn(shape, generator=generator, device=device) if t > 0 else None
        # Alg. 2, line 4
        x_t = diffusion.p_sample(model, x_t, t, z, clip_denoised=clip_denoised, variance=variance)
    # Alg. 2, line 6: return x_0
    return x_t


# #############################################################################
#   The end of the method. Parts I-III above are a complete DDPM:
#       net = ResAttUNet(); diffusion = GaussianDiffusion(linear_beta_schedule(1000))
#       ema = train_loop(net, diffusion, data, steps=800_000)
#       x_0 = p_sample_loop(diffusion, ema, (64, 3, 32, 32))
#       nll = diffusion.bits_per_dim(ema, test_images)  # (B,), Table 1's NLL
#   Below: the extras (DDIM, guidance), then the engineering.
# #############################################################################


# =============================================================================
# Extras: DDIM and classifier-free guidance  [not in the paper]
# =============================================================================
def ddim_timesteps(num_timesteps, steps):
    """The DDIM sub-sequence tau [Song et al., Sec. 4.2]: `steps` code steps
    floor(i * (T-1) / (steps-1)), i = steps-1..0, strictly decreasing (their spacing is at least 1)
    from T-1 (pure noise) to 0 (the last lands on x_0)."""
    T = num_timesteps
    if not 2 <= steps <= T:
        raise ValueError(f"need 2 <= steps <= T = {T}, got {steps}")
    return [i * (T - 1) // (steps - 1) for i in reversed(range(steps))]


@torch.inference_mode()
def ddim_sample_loop(diffusion, model, shape, steps, eta=0.0, clip_denoised=True, x_T=None, generator=None):
    """DDIM sampling [Song et al. 2021, Eq. 12] over the `steps` steps of ddim_timesteps. With
    a = alpha_bar_t and a' = alpha_bar of the next (smaller) step, each step is
        x_prev = sqrt(a') x_0_pred + sqrt(1 - a' - sigma^2) eps + sigma z,
        sigma  = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')           [Eq. 16]
    eta = 0 is deterministic; eta = 1 with steps = T is Alg. 2 with sigma^2 = beta_tilde. A clipped
    x_0_pred gets the eps it implies, so that the step stays on the DDIM path. Returns x_0."""
    # NOTE(paper): DDIM is not in the paper (Song et al. 2021); --sampler ddim
    check_eval(model)
    device = diffusion.betas.device
    timesteps = ddim_timesteps(diffusion.num_timesteps, steps)
    x_t = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
    one = torch.ones((), device=device)
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        a = diffusion.alphas_cumprod[t]  # alpha_bar_t
        # alpha_bar of the next step, tau_{i-1}: 1 after the last
        a_prev = one if last else diffusion.alphas_cumprod[timesteps[i + 1]]
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)  # (B,)
        eps = model(x_t, t_batch)
        x_0_pred = diffusion.predict_x0_from_eps(x_t, t_batch, eps)  # "predicted x_0" in Eq. 12
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)  # NOTE(paper): as in p_sample
            eps = (x_t - a.sqrt() * x_0_pred) / (1 - a).sqrt()  # the eps that x_0_pred implies
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # [Eq. 16]
        # Eq. 12: "predicted x_0" + "direction pointing to x_t" (+ random noise below)
        x_t = a_prev.sqrt() * x_0_pred + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and not last:
            x_t = x_t + sigma * torch.randn(shape, generator=generator, device=device)
    return x_t


# --- Classifier-free guidance  [Ho & Salimans 2022, arXiv:2207.12598] -------------------------
# NOTE(paper): not in the paper; --class-cond trains on the labels, --guidance W samples with them
def drop_labels(y, num_classes, drop):
    """The class labels y (B,), each replaced by "no label" (num_classes) with probability drop, so
    that one network learns eps(x_t, t, y) and eps(x_t, t) [Ho & Salimans, Alg. 1]."""
    dropped = torch.rand(y.shape, device=y.device) < drop  # (B,)
    return torch.where(dropped, num_classes, y)


class Guided:
    """A class-conditional network as the samplers call it, model(x_t, t), with classifier-free
    guidance of weight w toward the classes y, from one batched evaluation [Ho & Salimans, Eq. 6]:
        eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t, no label)."""

    def __init__(self, model, y, w, num_classes):
        self.model = model
        self.w = w
        self.training = model.training  # what check_eval reads
        self.y = torch.cat([y, torch.full_like(y, num_classes)])  # (2B,): y, then "no label"

    def __call__(self, x_t, t):
        if self.w == 0:  # the conditional model alone: half the work
            return self.model(x_t, t, self.y[: len(x_t)])
        eps = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), self.y)  # (2B, C, H, W)
        eps_y, eps_none = eps.float().chunk(2)  # 2 x (B, C, H, W), in float32 under autocast too
        return (1 + self.w) * eps_y - self.w * eps_none


# =============================================================================
# Engineering: progress lines, data, devices, checkpoints, samplers, FID, the commands, the CLI
# =============================================================================
class UserError(Exception):
    """A mistake in the command line or its files: main() prints it on one line and exits 2."""


def first_line(e):
    """An exception's message cut to its first line (its type's name when it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def optional(module, package, user):
    """An optional extra, imported only by the flag or command that uses it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{user} needs the {package} package: pip install {package}")


# --- Progress lines: no phase that takes more than a few seconds is silent ---------------------
class Progress:
    """A phase's line every 5 s (what, how far, images/s, time left), then its time taken."""

    def __init__(self, what, total, images_per_tick=1.0):
        self.what = what  # the phase, as its lines name it
        self.total = total  # ticks in all
        self.images_per_tick = images_per_tick
        self.done = 0  # ticks so far
        self.printed = False  # whether the phase has printed a line yet
        self.start = time.time()
        self.shown = self.start  # when the last line was printed

    def tick(self):
        self.done += 1
        now = time.time()
        finished = self.done == self.total
        if now - self.shown < 5.0 and not (finished and self.printed):
            return
        speed = self.done * self.images_per_tick / max(now - self.start, 1e-9)  # images/s
        left = (self.total - self.done) * self.images_per_tick / speed
        when = f"took {now - self.start:.0f} s" if finished else f"ETA {left:.0f} s"
        print(f"{self.what}: {self.done}/{self.total} | {speed:,.1f} images/s | {when}", flush=True)
        self.shown = now
        self.printed = True


class Watched:
    """The network as a sampler calls it: ticks progress; keeps x_t at the calls in keep."""

    def __init__(self, model, progress, keep=()):
        self.model = model
        self.progress = progress
        self.keep = list(keep)  # the calls whose x_t to keep; a call may be listed twice
        self.kept = []  # x_t at those calls, in order
        self.calls = 0  # network calls so far
        self.training = model.training  # what check_eval reads

    def __call__(self, x_t, t):
        for _ in range(self.keep.count(self.calls)):  # a sampler of few steps: x_t repeated
            self.kept.append(x_t)
        self.calls += 1
        self.progress.tick()
        return self.model(x_t, t)


# --- Data: the whole training set decoded once into one uint8 tensor on the device  [Sec. 4] ---
TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def evenly_spaced(n, k=None):
    """k indices spread evenly over range(n); all of them when k is None or at least n."""
    return torch.linspace(0, n - 1, min(k or n, n)).round().long()


def load_dataset(name, data_dir, image_size, max_images=None, train=True):
    """(uint8 images (N, C, S, S), labels, classes) of a torchvision set's split, or a folder."""
    if name == "folder":
        return load_image_folder(Path(data_dir), image_size, max_images)
    try:
        dataset = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
        ds = dataset(data_dir, train=train, download=True)
    except Exception as e:  # no internet, a proxy, a full disk: all end the same way
        fix = f"put torchvision's {name} files there, or use --dataset folder --data-dir DIR"
        what = f"{name}'s {'training' if train else 'test'} images into --data-dir {data_dir}"
        raise UserError(f"could not get {what} ({first_line(e)}); {fix}")
    keep = evenly_spaced(len(ds.data), max_images)
    x = torch.as_tensor(np.asarray(ds.data))[keep]  # CIFAR-10: (N, 32, 32, 3); MNIST: (N, 28, 28)
    if x.ndim == 4:
        x = x.permute(0, 3, 1, 2)  # (N, 3, 32, 32)
    else:
        x = F.pad(x[:, None], (2, 2, 2, 2))  # (N, 1, 32, 32): 2 black pixels on every side
    if x.shape[-1] != image_size:
        x = TF.resize(x, [image_size, image_size], antialias=True)  # (N, C, H, W)
    return x.contiguous(), torch.as_tensor(ds.targets)[keep], len(ds.classes)


def image_files(root, flag="--data-dir", leave_out=()):
    """The .png/.jpg files under root, in a fixed order, but those named in leave_out (noted)."""
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if any(p.name in leave_out for p in files):
        print(f"note: {flag} {root}: {', '.join(leave_out)} left out")
    files = [p for p in files if p.name not in leave_out]
    if not files:
        raise UserError(f"{flag} {root} holds no .png/.jpg/.jpeg images")
    return files


def read_image(path, mode=None):
    """A (C, h, w) uint8 tensor of an image file, grey or RGB (mode None: as the file is)."""
    from PIL import Image  # Pillow: installed with torchvision

    try:
        with Image.open(path) as im:
            if mode is None and im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                mode = "L"
            x = torch.from_numpy(np.array(im.convert(mode or "RGB")))  # (h, w) or (h, w, 3)
    except OSError as e:
        raise UserError(f"cannot decode image {path}: {e}")
    return x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # (C, h, w)


def load_image_folder(root, size, max_images=None, flag="--data-dir", leave_out=()):
    """(images, labels or None, classes) of image_files(root); a class a subfolder."""
    files = image_files(root, flag, leave_out)
    files = [files[i] for i in evenly_spaced(len(files), max_images)]
    first = read_image(files[0])  # decides the channels (and the size) of all
    mode = "L" if len(first) == 1 else "RGB"
    size = size or min(first.shape[1:])
    progress = Progress(f"decoding {root}", len(files))
    images = []
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        for x in pool.map(functools.partial(read_image, mode=mode), files):
            images.append(TF.center_crop(TF.resize(x, size, antialias=True), size))  # shorter side
            progress.tick()
    folders = [f.relative_to(root).parts[0] if f.parent != root else None for f in files]
    if None in folders:
        return torch.stack(images), None, 0  # (N, C, H, W)
    classes = sorted(set(folders))
    return torch.stack(images), torch.tensor([classes.index(f) for f in folders]), len(classes)


# --- The network on its device, and torch.compile ---------------------------------------------
def build_model(config, device="cpu"):
    """The network a config describes, its size checked on the meta device first."""
    names = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")
    kwargs = {k: config[k] for k in (*names, "image_size")}
    kwargs.update(in_channels=config["channels"], num_classes=config.get("num_classes", 0))
    flags = "--image-size, --base-channels, --channel-mult or --num-res-blocks"
    try:
        with torch.device("meta"):
            size = count_parameters(MODELS[config["model"]](**kwargs))
    except ValueError as e:
        raise UserError(f"{e} (flags {flags})")
    if size > 2**32:  # 16 GiB of float32 weights, and three times that with Adam's state
        raise UserError(f"that network would have {size:,} parameters, too many: lower {flags}")
    net = MODELS[config["model"]](**kwargs)
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net.to(device)


def build_diffusion(config, device):
    """The diffusion of a configuration: the paper's linear schedule over its T steps."""
    if config.get("schedule", "linear") != "linear":  # a checkpoint of an earlier version
        raise UserError(f"the {config['schedule']} schedule is no longer supported (only linear)")
    return GaussianDiffusion(linear_beta_schedule(config["timesteps"])).to(device)


def setup_device(name, amp):
    """(device, autocast dtype or None: float32) for --device and --amp."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    if amp == "auto":  # NOTE(paper): bf16 autocast on CUDA (float32 master weights)
        amp = "bf16" if name == "cuda" else "none"
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per torchrun process
        torch.cuda.set_device(name)
        torch.backends.cudnn.benchmark = True  # shapes never change: cuDNN picks the fastest conv
        torch.set_float32_matmul_precision("high")  # float32 matmuls may use TF32 tensor cores
    return torch.device(name), {"bf16": torch.bfloat16, "none": None}[amp]


def compile_model(module, mode, cuda_graphs=False):
    """torch.compile in --compile's mode (None: off); auto adds CUDA graphs where they may run."""
    if mode == "auto":  # CUDA graphs replay a step's many small kernels as one
        mode = "reduce-overhead" if cuda_graphs else "default"
    return module if mode is None else torch.compile(module, mode=mode)


# --- Checkpoints, records and the run's lock ---------------------------------------------------
CKPT_FORMAT = "ddpm.py checkpoint 2"  # 2: the network's levels nested


def save_checkpoint(path, state):
    """Write a temporary file, then rename it: a crash leaves the old checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as e:  # a full disk (torch's zip writer raises RuntimeError)
        tmp.unlink(missing_ok=True)
        fix = "the checkpoint there, if any, is intact: free some disk space, then --resume"
        raise UserError(f"cannot write {path} ({first_line(e)}); {fix}")
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path, mmap=False):
    """A checkpoint, loaded with weights_only=True: tensors and plain values only, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (check --ckpt / --out-dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"cannot load {path}: truncated, or not from ddpm.py ({first_line(e)})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is a torch file but not a ddpm.py checkpoint")
    return ckpt


def prepare_out_dir(path):
    """Create the output folder and make sure we can write to it, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / ".ddpm_write_test").touch()
        (path / ".ddpm_write_test").unlink()
    except OSError as e:
        raise UserError(f"--out-dir {path} is not writable ({e.strerror or e})")


@contextlib.contextmanager
def locked(out_dir):
    """An OS lock on out_dir/train.lock, held while a run writes there; dropped on any exit."""
    try:
        import fcntl  # POSIX
    except ImportError:  # Windows has no fcntl: there a run is not locked
        yield
        return
    with open(out_dir / "train.lock", "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fix = "wait for it to end (or stop it), or use another --out-dir"
            raise UserError(f"--out-dir {out_dir} is in use by another ddpm.py train; {fix}")
        yield  # closing the file releases the lock


def add_record(path, record):
    """Append a record to the JSON list in path, whole or not at all (a temporary file renamed)."""
    records = json.loads(path.read_text()) if path.is_file() else []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records + [record], indent=1))
    os.replace(tmp, path)


# --- How images are drawn: one Draw per command, and the pictures and images it makes ----------
@dataclasses.dataclass(frozen=True)
class Draw:
    """How images are drawn, built once per command by make_draw; str(draw) is how lines say it."""

    sampler: str  # ddpm (Alg. 2) or ddim
    steps: int  # network evaluations per image
    eta: float = 0.0  # DDIM's noise
    variance: str = "fixedlarge"  # ddpm's sigma_t^2
    guidance: float = 0.0  # classifier-free guidance w (a class-conditional model's)
    shape: tuple = (3, 32, 32)  # (C, H, W) of an image
    batch_size: int = 500  # images per sampler batch
    seed: int = 0  # x_T drawn on the CPU from seed; z from seed ^ Z_STREAM
    amp: torch.dtype = None  # autocast's dtype; None: float32
    num_classes: int = 0  # a class-conditional model's classes; 0: unconditional
    label: object = None  # --class: a class K, "all" (rows of 8 per class), or None (in turn)

    def __str__(self):
        text = f"{self.sampler}, {self.steps} steps"
        text += f", eta {self.eta:g}" if self.sampler == "ddim" else f", {self.variance}"
        if self.num_classes:  # and which classes: --class K, all, or none (each in turn)
            classes = CLASS_WORDS.get(self.label, f"class {self.label}")
            text += f", guidance w = {self.guidance:g}, {classes}"
        return text


CLASS_WORDS = {None: "each class in turn", "all": "8 of each class"}  # str(Draw) of --class
Z_STREAM = 0x9E3779B9  # seed ^ Z_STREAM seeds the noise z: never x_T's seed (a non-zero XOR)


def make_draw(args, config, device, amp):
    """The Draw of train's or sample's sampler flags (the one helper that reads parsed flags)."""
    T = config["timesteps"]
    num_classes = config.get("num_classes", 0)
    label = getattr(args, "label", None)  # --class: sample's
    if label is not None and not num_classes:
        raise UserError("--class: the model is not class-conditional (train with --class-cond)")
    if label not in (None, "all") and label >= num_classes:
        raise UserError(f"--class {label}: the model knows classes 0 to {num_classes - 1}")
    sampler = args.sampler
    eta = args.eta
    if sampler == "auto":
        sampler = "ddpm" if device.type == "cuda" else "ddim"
        eta = 1.0
    steps = args.sample_steps
    if sampler != "ddpm" and steps is not None and steps > T:
        raise UserError(f"--sample-steps {steps}: more than the model's T = {T}")
    if sampler == "ddpm":
        steps = T
    elif steps is None:
        steps = min(100, T)
    # sample's --batch-size; train's is its training batch, and --fid-batch-size its draws
    batch_size = args.fid_batch_size if args.command == "train" else args.batch_size
    return Draw(
        sampler,
        steps,
        eta=eta,
        variance=args.variance,
        guidance=args.guidance,
        shape=(config["channels"], config["image_size"], config["image_size"]),
        batch_size=batch_size,
        seed=args.seed,
        amp=amp,
        num_classes=num_classes,
        label=label,
    )


def guided(model, draw, first, n, device):
    """The network for images first..first+n-1 of a draw: a conditional one guided to their class."""
    if not draw.num_classes:
        return model
    index = torch.arange(first, first + n, device=device)  # (n,): the images' numbers in the draw
    y = index % draw.num_classes  # each class in turn
    if draw.label == "all":
        y = index // 8 % draw.num_classes  # rows of 8 per class
    if draw.label not in (None, "all"):
        y = torch.full((n,), draw.label, device=device)
    return Guided(model, y, draw.guidance, draw.num_classes)


def run_sampler(diffusion, model, x_T, draw, generator, progress, keep=()):
    """(x_0, x_t at the calls in keep) of a draw's sampler run from x_T under its autocast."""
    net = Watched(model, progress, keep)
    shape = x_T.shape
    with torch.autocast(x_T.device.type, dtype=draw.amp, enabled=draw.amp is not None):
        if draw.sampler == "ddpm":
            x_0 = p_sample_loop(diffusion, net, shape, variance=draw.variance, x_T=x_T, generator=generator)
        else:
            x_0 = ddim_sample_loop(
                diffusion, net, shape, draw.steps, eta=draw.eta, x_T=x_T, generator=generator
            )
    return x_0, net.kept


def save_grid(x, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid with nrow images per row."""
    save_image((x.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


def draw_pictures(model, diffusion, draw, path, reverse_process=False):
    """A grid of 64 samples (or 8 per class) at path; and their reverse process, if asked."""
    device = diffusion.betas.device
    n = 8 * min(draw.num_classes, 16) if draw.num_classes else 64
    x_T = torch.randn((n, *draw.shape), generator=torch.Generator().manual_seed(draw.seed)).to(device)
    generator = torch.Generator(device).manual_seed(draw.seed ^ Z_STREAM)
    progress = Progress(f"{path.name} ({draw})", draw.steps, n / draw.steps)
    keep = [i * draw.steps // 9 for i in range(9)] if reverse_process else []  # x_t at 9 steps
    eps_model = guided(model, draw, first=0, n=n, device=device)
    x_0, kept = run_sampler(
        diffusion, eps_model, x_T, draw, generator=generator, progress=progress, keep=keep
    )
    save_grid(x_0, path)
    if reverse_process:
        rows = list(range(0, n, 8)) if draw.num_classes else list(range(8))  # the first of each class
        xs = torch.stack([*kept, x_0])[:, rows]  # (10, rows, C, H, W): x_t at 9 steps, then x_0
        save_grid(xs.transpose(0, 1).flatten(0, 1), path.with_name("reverse_process.png"), 10)


def generate(model, diffusion, draw, n, first=0):
    """Images first..first+n-1 of a draw as uint8 (n, C, H, W); x_T drawn on the CPU from seed."""
    device = diffusion.betas.device
    batch = min(draw.batch_size, n)
    batches = math.ceil(n / batch)
    x_T_generator = torch.Generator().manual_seed(draw.seed)
    z_generator = torch.Generator(device).manual_seed(draw.seed ^ Z_STREAM)
    what = f"sampling {n} images ({draw}), network calls"
    progress = Progress(what, batches * draw.steps, batch / draw.steps)
    images = []
    for start in range(0, batches * batch, batch):
        x_T = torch.randn((batch, *draw.shape), generator=x_T_generator).to(device)
        eps_model = guided(model, draw, first=first + start, n=batch, device=device)
        x_0, _ = run_sampler(diffusion, eps_model, x_T, draw, generator=z_generator, progress=progress)
        images.append(((x_0.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(images)[:n]  # (n, C, H, W), [-1, 1] -> {0..255}


# --- FID and IS: Inception features of samples, against the training set's (FID) ---------------
# FID [Heusel et al. 2017] and the Inception Score [Salimans et al. 2016], as papers report them
FID_NETWORK = "pytorch-fid's InceptionV3 (TF FID weights): pool3, 2048 features; it resizes to 299"
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # where pytorch-fid looks for its weights


def inception(device):
    """pytorch-fid's InceptionV3, as papers use it: (the network, images in [0, 1] -> [2048 pool3
    features]; its classifier's weight (1008, 2048): logits = pool3 @ weight.T, without the bias
    that improved-gan's Inception Score leaves out)."""
    fid_inception = optional("pytorch_fid.inception", "pytorch-fid", "FID and IS")
    try:
        blocks = [fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]  # pool3: 2048 features
        network = fid_inception.InceptionV3(blocks).eval().to(device)
        classifier = fid_inception.fid_inception_v3().fc.weight.detach().double().cpu()
    except OSError as e:  # it downloads its weights on first use
        where = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
        fix = f"put {FID_WEIGHTS} (pytorch-fid's GitHub releases) at {where}"
        raise UserError(f"pytorch-fid could not get its Inception weights ({first_line(e)}); {fix}")
    if not classifier.any():  # a weights file rebuilt without the classifier: no IS from it
        print(f"note: {FID_WEIGHTS} holds no classifier (all zero): IS is nan; FID is unaffected")
        classifier = torch.full_like(classifier, math.nan)
    return network, classifier


@torch.no_grad()
def image_features(network, images, device, what):
    """The network's features (N, D) in float64 of uint8 images (N, C, H, W), seen as PNGs are."""
    if len(images) < 2:  # one image has no covariance
        raise UserError(f"FID needs 2 or more images; {what} has {len(images)}")
    size = 250 if device.type == "cuda" else 25  # a CPU takes some 3 s for 25: a line every 5 s
    progress = Progress(f"features of {what}", math.ceil(len(images) / size), size)
    features = []
    for batch in images.split(size):
        x = batch.to(device).float().div(255).expand(-1, 3, -1, -1)  # grey: 3 equal channels
        features.append(network(x)[0].flatten(1).double().cpu())  # (B, D)
        progress.tick()
    return torch.cat(features)  # (N, D)


def feature_statistics(network, images, device, what):
    """(mu, sigma) in float64 of the network's features of uint8 images."""
    features = image_features(network, images, device, what)  # (N, D)
    return features.mean(0), features.T.cov()  # cov: unbiased, as numpy's


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): the FID."""
    root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root)


def inception_score(logits, splits=10):
    """The Inception Score of logits (N, K) as improved-gan computes it: p(y|x) = softmax in
    float64, the images in `splits` contiguous parts (fewer for fewer than 10 images), each part
    exp(mean over x of KL(p(y|x) || p(y))), p(y) its mean; (mean, std with ddof 0) over parts."""
    p = logits.double().softmax(dim=1)  # (N, K): p(y | x)
    N = len(p)
    splits = min(splits, N)
    scores = []
    for i in range(splits):
        part = p[i * N // splits : (i + 1) * N // splits]  # (n, K), improved-gan's boundaries
        p_y = part.mean(0, keepdim=True)  # (1, K): p(y) over the part
        kl = (part * (part.log() - p_y.log())).sum(1)  # (n,): KL(p(y|x) || p(y))
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def fid_and_is(scoring, images, device, what):
    """{"fid", "inception_score", "inception_score_std"} of uint8 images, from one network pass."""
    features = image_features(scoring["network"], images, device, what)  # (N, D)
    fid = frechet_distance(features.mean(0), features.T.cov(), scoring["mu"], scoring["sigma"])
    logits = features @ scoring["classifier"].T  # (N, 1008): the classifier without its bias
    score, spread = inception_score(logits)
    return dict(fid=fid, inception_score=score, inception_score_std=spread)


def reference_statistics(dataset, data_dir, ref_stats, size, network, device):
    """(mu, sigma, where from) of --ref-stats, or of the training data, cached in ~/.cache/ddpm.py."""
    key = f"{dataset} {Path(data_dir).resolve()} {size}px"
    if dataset == "folder" and not ref_stats:
        stats = [p.stat() for p in image_files(Path(data_dir))]
        key += f" {len(stats)} files, {sum(s.st_size for s in stats)} bytes, {max(s.st_mtime for s in stats)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm.py"
    path = Path(ref_stats or cache / f"fid_stats_{dataset}_{size}px_{digest}.npz")
    if ref_stats or path.is_file():
        try:
            with np.load(path) as f:
                mu = f["mu"]
                sigma = f["sigma"]
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"--ref-stats {path}: not an npz of mu and sigma ({first_line(e)})")
        with torch.no_grad():  # the network's features: as many as the reference's, and finite
            D = network(torch.zeros(1, 3, size, size, device=device))[0].shape[1]
        finite = np.isfinite(mu).all() and np.isfinite(sigma).all()
        if mu.shape != (D,) or sigma.shape != (D, D) or not finite:
            raise UserError(f"{path}: mu and sigma must be finite, of the network's {D} features")
        return torch.from_numpy(mu).double(), torch.from_numpy(sigma).double(), f"statistics in {path}"
    images, _, _ = load_dataset(dataset, data_dir, size)  # the images, not their labels
    mu, sigma = feature_statistics(network, images, device, f"the {dataset} training set")
    where = f"{len(images):,} {dataset} training images"
    tmp = path.with_suffix(".tmp.npz")
    try:  # whole or not at all; a cache that cannot be written: not cached
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, mu=mu.numpy(), sigma=sigma.numpy())
        os.replace(tmp, path)
        where += f", cached in {path}"
    except OSError:
        pass
    return mu, sigma, where


def sample_fid(scoring, model, diffusion, draw, n, procs):
    """fid_and_is of n images of a draw: a share drawn by each process, scored on rank 0."""
    rank = procs["rank"]
    share = torch.arange(n).tensor_split(procs["world"])[rank]  # the images this process draws
    own = dataclasses.replace(draw, seed=draw.seed + rank)  # each process its own x_T
    images = generate(model, diffusion, own, len(share), first=int(share[0]))  # (len(share), C, H, W)
    if procs["world"] > 1:  # the shares to rank 0: no process waits in a collective for long
        shares = [None] * procs["world"]
        dist.all_gather_object(shares, images)
        images = torch.cat(shares)  # (n, C, H, W)
    if rank > 0:
        return None
    return fid_and_is(scoring, images, diffusion.betas.device, f"{n:,} samples")


def fid_scoring(dataset, data_dir, ref_stats, size, device):
    """{"network", "classifier", "mu", "sigma", "where"}: what FID and IS are measured with."""
    network, classifier = inception(device)  # first: a missing package or file stops here
    mu, sigma, where = reference_statistics(
        dataset, data_dir, ref_stats=ref_stats, size=size, network=network, device=device
    )
    return dict(network=network, classifier=classifier, mu=mu, sigma=sigma, where=where)


# --- train: Part III's iteration with checkpoints, resume, logs, signals, NaN guards and DDP ---
def open_run(path, resume, typed):
    """(checkpoint or None, config): on --resume the checkpoint's, typed flags agreeing."""
    if not resume and path.exists():
        raise UserError(f"{path} exists: add --resume to continue it, or another --out-dir")
    ckpt = load_checkpoint(path) if resume else None
    if ckpt:  # the schedule of an earlier version is refused before any work
        build_diffusion(ckpt["config"], "cpu")
    config = {}
    for key, default in PAPER.items():
        config[key] = ckpt["config"].get(key, default) if ckpt else default
        if ckpt and typed[key] not in (None, config[key]) and key != "data_dir":
            flag = f"--{key.replace('_', '-')} {typed[key]}"
            fix = "drop it, or start a new run in another --out-dir"
            raise UserError(f"--resume: {flag} contradicts the checkpoint's {config[key]}; {fix}")
        if typed[key] is not None:
            config[key] = typed[key]
    return ckpt, config


def build_training(config, device, amp, compile_mode, world=1, **recipe):
    """(training, diffusion, model): model, the net as the iteration calls it."""
    training = make_training(build_model(config, device), amp=amp, **recipe)
    model = training.net
    if world > 1:  # gradients averaged over the processes during backward
        model = nn.parallel.DistributedDataParallel(model)
    model = compile_model(model, compile_mode, cuda_graphs=device.type == "cuda" and world == 1)
    return training, build_diffusion(config, device), model


def training_data(config, cond_drop, device):
    """(images, labels or None, classes) of a run's dataset, on the device."""
    data, labels, classes = load_dataset(config["dataset"], config["data_dir"], config["image_size"])
    if not config["class_cond"]:
        return data.to(device), None, 0
    if classes < 2:
        raise UserError("--class-cond needs 2 or more classes, a subfolder each of --data-dir")
    if cond_drop == 0:
        raise UserError("--class-cond with --cond-drop 0 learns no 'no label' row for guidance")
    return data.to(device), labels.to(device), classes


# The columns of log.csv and fid.csv, each with how its values are written
LOG = {"step": "{}", "epoch": "{}", "loss": "{:.6f}", "lr": "{:.3e}", "grad_norm": "{:.4f}"}
LOG.update(images_per_s="{:.1f}", elapsed_s="{:.1f}")
FID_LOG = {"step": "{}", "images_seen": "{}", "fid": "{:.4f}", "inception_score": "{:.4f}"}
FID_LOG.update(inception_score_std="{:.4f}", samples="{}", sampler="{}", seconds="{:.1f}")


def open_csv(path, columns, step, resumed):
    """A CSV file opened to write: its columns and, when resumed, its old rows up to step."""
    rows = [list(columns)]
    if resumed and path.exists():
        with open(path, newline="") as f:
            rows += [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= step]
    file = open(path, "w", newline="", buffering=1)  # line-buffered: each row on disk at once
    csv.writer(file).writerows(rows)
    return file


def write_row(file, columns, row):
    """A row (a dict by column) of a CSV file of those columns."""
    csv.writer(file).writerow([form.format(row[key]) for key, form in columns.items()])


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM only note themselves in the list it yields; an ignored SIGINT stays so."""
    requested = []  # the signals received
    previous = {}  # the handlers to put back

    def note(signum, frame):
        requested.append(signum)

    if threading.current_thread() is threading.main_thread():  # where signals are delivered
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, note)
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def agree(numbers, procs):
    """Each number's maximum over procs {"rank", "world", "device"}: all decide alike."""
    if procs["world"] == 1:
        return numbers
    numbers = torch.tensor(numbers, device=procs["device"])
    dist.all_reduce(numbers, dist.ReduceOp.MAX)
    return numbers.tolist()


def saved_parts(training):
    """What a checkpoint saves the state of, by its key there."""
    return dict(
        model=training.net, ema=training.ema, optimizer=training.optimizer, scheduler=training.scheduler
    )


def restore(training, ckpt, seed, procs):
    """(step, elapsed s): a resumed run's states, or (0, 0.0); each process seeded apart."""
    rank = procs["rank"]
    world = procs["world"]
    torch.manual_seed(seed + rank)  # a different t, eps, flip and dropout per process
    if ckpt is None:
        return 0, 0.0
    for key, part in saved_parts(training).items():
        part.load_state_dict(ckpt[key])
    torch.manual_seed(seed + rank + world * ckpt["step"])
    if world == 1:
        torch.set_rng_state(ckpt["rng"]["torch"][0])
        if procs["device"].type == "cuda" and ckpt["rng"]["cuda"][0] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0])
    return ckpt["step"], ckpt["elapsed"]


def checkpoint(path, training, state, saved_step, procs):
    """Save on rank 0 if every process's weights are finite; all stop if it cannot."""
    finite = all(p.isfinite().all() for p in training.net.parameters())
    if agree([int(not finite)], procs)[0]:
        what = f"the loss went NaN or infinite after step {saved_step}, and the weights with it"
        raise UserError(f"{what}; {path} holds step {saved_step} (try --amp none or a lower --lr)")
    cuda_rng = torch.cuda.get_rng_state() if procs["device"].type == "cuda" else None
    rng = dict(torch=[torch.get_rng_state()], cuda=[cuda_rng])
    state = dict(state, format=CKPT_FORMAT, rng=rng)
    state.update({key: part.state_dict() for key, part in saved_parts(training).items()})
    error = ""  # rank 0's, which every process stops with
    try:
        if procs["rank"] == 0:
            save_checkpoint(path, state)
    except UserError as e:  # a full disk
        error = str(e)
    if agree([int(bool(error))], procs)[0]:
        raise UserError(error or "rank 0 could not write the checkpoint")


def what_is_due(step, every, signals, loss_sum, saved_at, procs):
    """What is due after training step `step` (from 1), decided alike by every process: a dict of
    epoch, log (a log.csv row), save (ckpt.pt), stop (a signal came: save and end), grid and fid.
    every: total_steps, steps_per_epoch, log, ckpt_minutes, grid and fid (epochs; 0: never)."""
    last = step == every["total_steps"]
    log = step % every["log"] == 0 or last
    save = last
    stop = False
    if procs["world"] == 1 or log or step % 10 == 0:  # several processes agree every 10 steps
        late = 0 < every["ckpt_minutes"] <= (time.time() - saved_at) / 60
        bad = log and not loss_sum.isfinite()  # reads the GPU, as log rows do
        votes = agree([len(signals), int(late), int(bad)], procs)
        stop = votes[0] > 0
        save = last or max(votes) > 0
    epoch, into_epoch = divmod(step, every["steps_per_epoch"])
    epoch_end = into_epoch == 0 and not stop
    grid = epoch_end and every["grid"] > 0 and epoch % every["grid"] == 0
    fid = epoch_end and every["fid"] > 0 and epoch % every["fid"] == 0
    return dict(epoch=epoch, log=log, save=save, stop=stop, grid=grid, fid=fid)


def log_line(file, wandb, row, total_steps, batch_size):
    """A log.csv row (a dict by column), its console line with the time left, and W&B's points."""
    write_row(file, LOG, row)
    minutes_left = (total_steps - row["step"]) * batch_size / max(row["images_per_s"], 1e-9) / 60
    line = f"step {row['step']}/{total_steps} | epoch {row['epoch']} | loss {row['loss']:.4f}"
    line += f" | {row['images_per_s']:,.0f} img/s | lr {row['lr']:.3e} | ETA {minutes_left:.1f} min"
    print(line, flush=True)
    if wandb:
        points = {key: row[key] for key in ("loss", "lr", "grad_norm", "images_per_s")}
        wandb.log(points, step=row["step"])


def log_fid(file, wandb, row):
    """A fid.csv row (a dict by column), its console line and W&B's points."""
    write_row(file, FID_LOG, row)
    score = f"IS {row['inception_score']:.2f} ± {row['inception_score_std']:.2f}"
    seen = f"{row['images_seen']:,} images seen; {row['seconds']:.0f} s"
    print(f"FID {row['fid']:.2f}, {score} at step {row['step']} ({seen})", flush=True)
    if wandb:
        wandb.log({"fid": row["fid"], "inception_score": row["inception_score"]}, step=row["step"])


def run_draws(draw, auto, T):
    """{"grid", "fid"}: a run's draws (auto's FID: DDIM, eta 1, 100 steps, tracked ddpm's best)."""
    grid = dataclasses.replace(draw, label="all") if draw.num_classes else draw
    fid = dataclasses.replace(draw, sampler="ddim", steps=min(100, T), eta=1.0) if auto else draw
    return dict(grid=grid, fid=fid)


def print_start(config, parameters, where, steps):
    """The run's first line; on a CPU, with a network that takes days there, a note."""
    size = f"{config['channels']}x{config['image_size']}x{config['image_size']}"
    what = f"{config['model']} ({parameters:,} parameters) on {config['dataset']} {size}"
    print(f"training {what}, {where}; step {steps}")
    if where.startswith("cpu") and parameters > 10_000_000:  # a CPU trains it at a few images/s
        print(f"note: {parameters:,} parameters is a GPU recipe; on a CPU try README's quick start")


def train(args):
    """train: Algorithm 1 into --out-dir; under torchrun, in every process, rank 0 writing."""
    # --- Set up: the processes, the device, the run's configuration, folder and data
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, amp = setup_device(args.device, args.amp)
    procs = dict(rank=rank, world=world, device=device)  # the processes, as the helpers take them
    B = args.batch_size
    if B % world:
        raise UserError(f"--batch-size {B} must divide among the {world} processes")
    out_dir = Path(args.out_dir or f"runs/{args.model or PAPER['model']}")
    ckpt_path = out_dir / "ckpt.pt"
    ckpt, config = open_run(ckpt_path, args.resume, {key: getattr(args, key) for key in PAPER})
    wandb = optional("wandb", "wandb", "--wandb") if args.wandb and rank == 0 else None
    if rank == 0:
        prepare_out_dir(out_dir)
    # the images, and their classes for a class-conditional run (guidance: not in the paper)
    data, labels, classes = training_data(config, args.cond_drop, device)
    N, C, H, W = data.shape
    steps_per_epoch = N // B  # NOTE(paper): full batches only
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {B} is more than the {N} images there are")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    flip = config["dataset"] in ("cifar10", "folder") and not config["no_flip"]  # natural images

    # --- The network, Part III's Training of it, and how its pictures and FID samples are drawn
    config = dict(vars(args), **config, channels=C, num_classes=classes)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)  # the same initial weights on every process
    recipe = {key: getattr(args, key) for key in ("lr", "warmup", "grad_clip", "ema_decay")}
    training, diffusion, model = build_training(config, device, amp, args.compile, world=world, **recipe)
    draw = make_draw(args, config, device, amp)
    draws = run_draws(draw, auto=args.sampler == "auto", T=config["timesteps"])
    config.update(sampler=str(draws["grid"]), fid_sampler=str(draws["fid"]))
    scoring = None  # rank 0's: the network and the reference first, their errors too
    if args.fid_every and rank == 0:
        scoring = fid_scoring(config["dataset"], config["data_dir"], args.ref_stats, size=H, device=device)
    every = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log=args.log_every)
    every.update(ckpt_minutes=args.ckpt_minutes, grid=args.sample_every, fid=args.fid_every)
    step, elapsed = restore(training, ckpt, args.seed, procs)

    # --- The loop: Part III's iteration, then what is due (kept out of images/s)
    loss_sum = torch.zeros((), device=device)  # the losses since the last log row
    logged_step = step  # the step of the last log row
    logged_at = time.time()  # when it was written
    saved_step = step  # the step that ckpt.pt holds
    saved_at = logged_at  # when it was written
    started = logged_at  # when this process started training
    away = 0.0  # the seconds since the last log row spent on checkpoints, grids and FID
    due = dict(stop=False)  # what is due after the step, decided by what_is_due
    with contextlib.ExitStack() as held, stop_on_signals() as signals:  # released however it ends
        if world > 1:
            held.callback(dist.destroy_process_group)
        if rank == 0:  # one process writes a run at a time; log.csv's rows up to the step kept
            held.enter_context(locked(out_dir))
            log = held.enter_context(open_csv(out_dir / "log.csv", LOG, step, bool(ckpt)))
            if args.fid_every:
                fid_log = held.enter_context(open_csv(out_dir / "fid.csv", FID_LOG, step, bool(ckpt)))
            if wandb:  # a resumed run continues its page
                wandb.init(project="ddpm.py", config=config, dir=str(out_dir), resume="allow")
            where = f"{device}, amp {amp}"
            print_start(config, count_parameters(training.net), where, f"{step}/{total_steps}")
        while step < total_steps and not due["stop"]:
            idx = batch_indices(N, B, step, args.seed).tensor_split(world)[rank]  # its share
            x_0 = get_batch(data, idx, flip)  # Alg. 1, line 2
            step_model = model
            if labels is not None:  # the batch's classes, some dropped to "no label"
                y = drop_labels(labels[idx.to(device)], classes, args.cond_drop)
                step_model = functools.partial(model, y=y)
            loss, grad_norm = train_iteration(training, diffusion, x_0, step, model=step_model)
            step += 1
            loss_sum += loss

            due = what_is_due(step, every, signals, loss_sum, saved_at=saved_at, procs=procs)
            now = time.time()
            # a log row first, then the save: a kill between the two loses no row
            if rank == 0 and (due["log"] or due["save"] or now - logged_at >= 10):
                row = dict(step=step, epoch=due["epoch"], loss=loss_sum.item() / (step - logged_step))
                row.update(lr=training.scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
                row.update(images_per_s=(step - logged_step) * B / max(now - logged_at - away, 1e-9))
                row.update(elapsed_s=elapsed + now - started)
                log_line(log, wandb, row, total_steps, batch_size=B)
                loss_sum.zero_()
                logged_step = step
                logged_at = now
                away = 0.0
            if due["save"]:
                state = dict(config=config, step=step, elapsed=elapsed + now - started)
                checkpoint(ckpt_path, training, state, saved_step=saved_step, procs=procs)
                saved_step = step
                saved_at = time.time()
            if due["grid"] and rank == 0:
                (out_dir / "grids").mkdir(exist_ok=True)
                grid_path = out_dir / "grids" / f"epoch_{due['epoch']:04d}.png"
                draw_pictures(training.ema, diffusion, draws["grid"], grid_path)
            if due["fid"]:  # a share of the samples each
                scores = sample_fid(
                    scoring, training.ema, diffusion, draws["fid"], n=args.fid_samples, procs=procs
                )
                if rank == 0:
                    fid_row = dict(step=step, images_seen=step * B, **scores, samples=args.fid_samples)
                    fid_row.update(sampler=config["fid_sampler"], seconds=time.time() - now)
                    log_fid(fid_log, wandb, fid_row)
            away += time.time() - now  # checkpoints, grids and FID

    # --- Finish: a stopped run says how to go on; a finished one draws its final pictures
    path = out_dir / "samples.png"
    if rank == 0 and due["stop"]:
        print(f"\nstopped at step {step}: saved {ckpt_path}; go on with --resume", file=sys.stderr)
    elif rank == 0:
        draw_pictures(training.ema, diffusion, draws["grid"], path, reverse_process=True)
        minutes = (elapsed + time.time() - started) / 60
        print(f"done: {step} steps in {minutes:.1f} min; {ckpt_path}, {path}")
        if wandb:
            wandb.log({"samples": wandb.Image(str(path))}, step=step)
            wandb.finish()
    return 130 if due["stop"] else 0


# --- sample, fid, nll, compare: the other commands ---------------------------------------------
def load_sampler(path, device, compile_mode=None):
    """(model, diffusion, config) of a checkpoint: its EMA weights, in eval() mode."""
    ckpt = load_checkpoint(path)
    config = dict(ckpt["config"], step=ckpt["step"])
    model = build_model(config, device)
    try:
        model.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path} holds no EMA weights that fit its network ({first_line(e)})")
    return compile_model(model.eval(), compile_mode), build_diffusion(config, device), config


def write_samples(args):
    """sample: images from a checkpoint as PNG files, a grid.png and sample.json."""
    device, amp = setup_device(args.device, args.amp)
    model, diffusion, config = load_sampler(args.ckpt, device, args.compile)
    draw = make_draw(args, config, device, amp)
    n = args.num_samples
    shown = 64  # the grid: the first 64 images
    if args.label == "all":  # a row of 8 for each class, 16 classes at most in the grid
        shown = 8 * min(draw.num_classes, 16)
        n = max(n, shown)
    out_dir = Path(args.out_dir or Path(args.ckpt).parent / "samples")
    folder = out_dir / "images"
    stale = [p for p in folder.glob("*.png") if not p.stem.isdigit() or int(p.stem) >= n]
    if stale:  # an earlier, larger run's images: FID would read them
        what = f"{len(stale)} PNG file(s) that this run would not replace, e.g. {stale[0].name}"
        raise UserError(f"{folder} holds {what} (FID reads them too); use another --out-dir")
    prepare_out_dir(folder)
    images = generate(model, diffusion, draw, n)  # (n, C, H, W) uint8
    save_grid(images[:shown].float() / 127.5 - 1, out_dir / "grid.png")
    from PIL import Image  # Pillow: installed with torchvision

    progress = Progress(f"writing {folder}", n)
    for k, image in enumerate(images):  # one PNG file per image: what FID programs read
        Image.fromarray(image.permute(1, 2, 0).squeeze(2).numpy()).save(folder / f"{k:06d}.png")
        progress.tick()
    record = dict(images=n, checkpoint=str(args.ckpt), step=config["step"], sampler=str(draw))
    record.update(seed=args.seed, label=args.label)
    add_record(out_dir / "sample.json", record)
    print(f"wrote {n} images ({draw}) to {folder}, a grid.png and sample.json beside it")


def measure_fid(args):
    """fid: the FID and IS of the images in a folder (sample's), added to fid.json beside it."""
    device, _ = setup_device(args.device, "none")
    folder = Path(args.images)  # sample's images, and not the grid of them it writes beside them
    images, _, _ = load_image_folder(folder, size=None, flag="--images", leave_out=["grid.png"])
    scoring = fid_scoring(args.dataset, args.data_dir, args.ref_stats, size=images.shape[-1], device=device)
    started = time.time()
    scores = fid_and_is(scoring, images, device, f"--images {folder}")
    record = dict(fid=round(scores["fid"], 4), images=str(folder), samples=len(images))
    record.update(inception_score=round(scores["inception_score"], 4))
    record.update(inception_score_std=round(scores["inception_score_std"], 4))
    record.update(reference=scoring["where"], network=FID_NETWORK)
    record.update(seconds=round(time.time() - started, 1))  # after the reference
    score = f"IS {record['inception_score']:.2f} ± {record['inception_score_std']:.2f}"
    print(f"FID {record['fid']:.2f}, {score}")
    print(*[f"  {key:<19} {value}" for key, value in record.items()], sep="\n")
    if len(images) < 50_000:
        print(f"note: FID from {len(images):,} images reads higher than from the 50,000 of papers")
    add_record(folder.parent / "fid.json", record)
    print(f"added to {folder.parent / 'fid.json'}")


def measure_nll(args):
    """nll: the variational bound L [Eq. 5] in bits/dim of a checkpoint's EMA weights on the test
    images, split as the paper's Sec. 4.3 splits it; added to nll.json beside the checkpoint."""
    device, _ = setup_device(args.device, "none")  # float32: the bound's small terms need it
    model, diffusion, config = load_sampler(args.ckpt, device, args.compile)
    dataset = args.dataset or config["dataset"]
    if dataset == "folder" and not args.data_dir:
        raise UserError("nll of a folder dataset: name its test images with --data-dir DIR")
    data_dir = args.data_dir or config["data_dir"]
    images, _, _ = load_dataset(dataset, data_dir, config["image_size"], args.num_images, train=False)
    if images.shape[1] != config["channels"]:
        what = f"{images.shape[1]} channel(s), the model {config['channels']}"
        raise UserError(f"--data-dir {data_dir}: {what}")
    n = len(images)
    T = diffusion.num_timesteps
    batches = math.ceil(n / args.batch_size)
    progress = Progress(f"nll of {n:,} images, {T} network calls each", batches * T, n / batches / T)
    generator = torch.Generator(device).manual_seed(args.seed)  # one fresh x_t per image and t
    started = time.time()
    per_batch = []  # per image: L_0, L_1, ..., L_{T-1}, then L_T, in bits/dim
    for batch in images.split(args.batch_size):
        x_0 = batch.to(device).float() / 127.5 - 1  # no dequantisation noise, as the paper's
        watched = Watched(model, progress)  # T calls on the batch [Eq. 5]: L_0 .. L_{T-1}, (B, T)
        vb = diffusion.vb_terms(watched, x_0, variance=args.variance, generator=generator)
        prior = diffusion.prior_bpd(x_0)  # (B,): L_T
        per_batch.append(torch.cat([vb, prior[:, None]], dim=1).double().cpu())  # (B, T + 1)
    terms = torch.cat(per_batch)  # (n, T + 1)
    total = terms.sum(1)  # (n,): each image's bound
    if not total.isfinite().all():
        raise UserError(f"the bound of {args.ckpt} is not finite: are its weights finite?")
    stderr = float(total.std() / math.sqrt(n)) if n > 1 else 0.0
    record = dict(bits_per_dim=round(float(total.mean()), 5), stderr=round(stderr, 5), images=n)
    record.update(split="test", dataset=dataset, data_dir=str(data_dir), variance=args.variance)
    record.update(step=config["step"], seed=args.seed, checkpoint=str(args.ckpt))
    record.update(L_0=round(float(terms[:, 0].mean()), 5), L_T=round(float(terms[:, T].mean()), 6))
    record.update(L_1_to_L_T=round(float(terms[:, 1:].sum(1).mean()), 5))  # the rate [Sec. 4.3]
    record.update(seconds=round(time.time() - started, 1))
    print(f"NLL <= {record['bits_per_dim']:.4f} bits/dim (standard error {stderr:.4f}, {n:,} test images)")
    print(f"  distortion L_0: {record['L_0']:.4f}; rate L_1 + ... + L_T: {record['L_1_to_L_T']:.4f}")
    add_record(Path(args.ckpt).parent / "nll.json", record)
    print(f"added to {Path(args.ckpt).parent / 'nll.json'}")


def read_run(folder):
    """{"seen", "loss", "fid_seen", "fid"}: a run's curves by training images seen."""
    if not (folder / "log.csv").is_file():
        raise UserError(f"{folder / 'log.csv'} does not exist")
    if not (folder / "ckpt.pt").is_file():  # the run's batch size, to count the images seen
        raise UserError(f"{folder} holds no ckpt.pt, whose batch size compare needs")
    batch_size = load_checkpoint(folder / "ckpt.pt", mmap=True)["config"]["batch_size"]
    rows = {"log.csv": [], "fid.csv": []}
    try:
        for name in rows:
            if (folder / name).exists():
                with open(folder / name, newline="") as f:
                    rows[name] = list(csv.DictReader(f))
        loss = {int(r["step"]) * batch_size: float(r["loss"]) for r in rows["log.csv"]}
        fid = {int(r["images_seen"]): float(r["fid"]) for r in rows["fid.csv"]}
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{folder}: a log.csv or fid.csv not written by ddpm.py ({e})")
    if not loss:
        raise UserError(f"{folder / 'log.csv'} has no rows")
    curves = dict(seen=np.array(list(loss)), loss=np.array(list(loss.values())))
    curves.update(fid_seen=list(fid), fid=list(fid.values()))
    return curves


def compare_runs(args):
    """compare: runs' mean losses over 8 stretches of images seen, their FIDs; --plot: curves."""
    # matplotlib before any output: without it, its one line alone
    plt = optional("matplotlib.pyplot", "matplotlib", "--plot") if args.plot else None
    runs = {Path(folder): read_run(Path(folder)) for folder in args.runs}
    last = min(int(run["seen"].max()) for run in runs.values())
    stretches = min(8, min(len(run["seen"]) for run in runs.values()))  # no more than log rows
    edges = [round(last * k / stretches) for k in range(stretches + 1)]
    print(f"{'images seen':>21} " + " ".join(f"{folder.name:>10}" for folder in runs))
    for lo, hi in zip(edges, edges[1:]):
        cells = []
        for run in runs.values():
            inside = run["loss"][(run["seen"] > lo) & (run["seen"] <= hi)]
            cells.append(f"{inside.mean():>10.4f}" if len(inside) else f"{'-':>10}")
        print(f"{lo:>10}-{hi:<10} " + " ".join(cells))
    for folder, run in runs.items():
        for seen, fid in zip(run["fid_seen"], run["fid"]):
            print(f"{folder.name}: FID {fid:.2f} after {seen:,} images (fid.csv, while training)")
    if plt:
        plot_runs(plt, runs, args.plot)


def plot_runs(plt, runs, path):
    """compare --plot: loss and FID (fid.csv) against training images seen, one line per run."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for folder, run in runs.items():
        left.plot(run["seen"], run["loss"], label=folder.name)
        if run["fid"]:
            right.plot(run["fid_seen"], run["fid"], "o-", label=folder.name)
    left.set(xlabel="training images seen", ylabel="loss (mean per log.csv row)", yscale="log")
    right.set(xlabel="training images seen", ylabel="FID (fid.csv)")
    left.legend()
    if any(run["fid"] for run in runs.values()):
        right.legend()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


# --- import: the paper's released weights, from diffusers' format --------------------------------
# Our names from diffusers' UNet2DModel's, rule by rule: the same network, weight for weight
TO_DIFFUSERS = [
    (r"^temb\.0\.", "time_embedding.linear_1."),
    (r"^temb\.2\.", "time_embedding.linear_2."),
    (r"^(down|up)\.(\d+)\.(\d+)\.0\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)\.(\d+)\.(\d+)\.1\.", r"\1_blocks.\2.attentions.\3."),
    (r"^(down|up)sample\.(\d+)\.1\.", r"\1_blocks.\2.\1samplers.0.conv."),
    (r"^mid_block1\.", "mid_block.resnets.0."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^mid_block2\.", "mid_block.resnets.1."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.temb_proj\.", ".time_emb_proj."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"\.proj_out\.", ".to_out.0."),
]
# what diffusers' UNet2DModel and its scheduler must be set to for them to be the paper's
PAPER_UNET = dict(act_fn="silu", attention_head_dim=None, center_input_sample=False)
PAPER_UNET.update(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
PAPER_UNET.update(mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32)
PAPER_UNET.update(time_embedding_type="positional", resnet_time_scale_shift="default")
PAPER_UNET.update(downsample_type="conv", upsample_type="conv")
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")


def read_json(path):
    """A JSON file, or one line saying it is not one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a diffusers configuration ({first_line(e)})")


def diffusers_config(folder):
    """(our config, weights file) of a diffusers UNet2DModel or pipeline folder."""
    unet = folder / "unet" if (folder / "unet").is_dir() else folder  # a pipeline's, or the folder
    unet_config = read_json(unet / "config.json")
    schedulers = [folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"]
    schedule = next((read_json(p) for p in schedulers if p.is_file()), {})  # none: the paper's
    wrong = [(k, unet_config.get(k)) for k, v in PAPER_UNET.items() if unet_config.get(k, v) != v]
    wrong += [(k, schedule[k]) for k, v in LINEAR.items() if schedule.get(k, v) != v]
    if unet_config.get("_class_name") != "UNet2DModel":
        wrong.insert(0, ("_class_name", unet_config.get("_class_name")))
    if wrong:
        key, value = wrong[0]  # the first that differs
        raise UserError(f"{unet}: not the paper's network and schedule ({key} = {value})")
    try:
        widths = unet_config["block_out_channels"]
        size = int(unet_config["sample_size"])
        kinds = unet_config["down_block_types"]
        attention_at = [size // 2**k for k, kind in enumerate(kinds) if "Attn" in kind]
        config = dict(PAPER, image_size=size, channels=unet_config["in_channels"])
        config.update(model="res_att" if attention_at else "res", attn_resolutions=attention_at)
        config.update(base_channels=widths[0], channel_mult=[w // widths[0] for w in widths])
        config.update(num_res_blocks=unet_config["layers_per_block"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{unet}/config.json: not a UNet2DModel's configuration ({e!r})")
    config.update(timesteps=schedule.get("num_train_timesteps", 1000))
    files = [unet / f"diffusion_pytorch_model.{kind}" for kind in ("safetensors", "bin")]
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(f"{unet} holds no diffusion_pytorch_model.safetensors or .bin")
    return config, files[0]


def read_weights(path):
    """The tensors of a .bin (torch.load, weights_only) or a .safetensors file."""
    if path.suffix == ".safetensors":
        return optional("safetensors.torch", "safetensors", str(path)).load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {path} ({first_line(e)})")


def download(name):
    """The folder of a Hub model (e.g. google/ddpm-cifar10-32): its configurations and weights."""
    hub = optional("huggingface_hub", "huggingface_hub", f"import {name} (not a folder here)")
    files = ["*.json", "*.safetensors", "*.bin"]
    print(f"{name} is not a folder here: downloading it from the Hugging Face Hub")
    try:
        return Path(hub.snapshot_download(name, allow_patterns=files))
    except Exception as e:  # offline, no such model, a proxy: all end the same way
        fix = "check the name and the network, or give a folder that holds the model"
        raise UserError(f"could not download {name} ({first_line(e)}); {fix}")


def import_weights(args):
    """import: a ckpt.pt from diffusers' format, every weight mapped and checked."""
    folder = Path(args.folder)
    if not folder.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", args.folder):  # owner/name
        folder = download(args.folder)
    config, path = diffusers_config(folder)
    config.update(dataset=args.dataset, data_dir=args.data_dir, num_classes=0, batch_size=128)
    theirs = read_weights(path)
    weights = {}  # ours, by our names
    net = build_model(config)
    for name, ours in net.state_dict().items():
        source = name
        for pattern, replacement in TO_DIFFUSERS:
            source = re.sub(pattern, replacement, source)
        if name.endswith(("qkv.weight", "qkv.bias")):  # q, k and v: one (3C, C, 1, 1) kernel
            names = [source.replace("qkv", kind) for kind in ("to_q", "to_k", "to_v")]
            tensor = torch.cat([theirs.pop(n) for n in names if n in theirs])
        else:
            tensor = theirs.pop(source, None)
        if tensor is None or tensor.shape not in (ours.shape, ours.shape[:2]):
            shape = tuple(ours.shape)
            raise UserError(f"{path}: {source} is missing, or does not fit our {name} {shape}")
        weights[name] = tensor.reshape(ours.shape)  # a linear layer's (C, C) as a 1x1 conv's
    if theirs:
        raise UserError(f"{path}: {next(iter(theirs))} has no place in the paper's network")
    net.load_state_dict(weights)
    out_dir = Path(args.out_dir)
    prepare_out_dir(out_dir)
    state = dict(config=dict(config, imported_from=str(path)), step=0, elapsed=0.0)
    alone = dict(rank=0, world=1, device=torch.device("cpu"))  # the processes: this one
    checkpoint(out_dir / "ckpt.pt", make_training(net), state, saved_step=0, procs=alone)
    print(f"wrote {out_dir / 'ckpt.pt'}: {count_parameters(net):,} parameters from {path}")


# --- Command line --------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line)."""

    def error(self, message):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def bounded(kind, lo, hi):
    """An argparse type: kind(text), refused unless lo <= value <= hi (NaN always is)."""

    def number(text):
        value = kind(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text}: must be from {lo:,} to {hi:,}")
        return value

    number.__name__ = kind.__name__  # argparse's message when kind(text) fails: invalid int value
    return number


def int_list(hi):
    """An argparse type: '1,2,2,2' -> [1, 2, 2, 2], 1 to 16 integers, each from 1 to hi."""

    def integers(text):
        values = [bounded(int, 1, hi)(v) for v in text.split(",")]
        if len(values) > 16:
            raise argparse.ArgumentTypeError(f"{text}: must be at most 16 integers")
        return values

    return integers


def class_label(text):
    """--class: a class number, or all."""
    if text == "all":
        return text
    return bounded(int, 0, 10**6)(text)


@dataclasses.dataclass(frozen=True)
class Flag:
    """A flag. type: a list gives choices, bool a switch; more: other argparse keywords."""

    name: str
    type: object
    help: str
    default: object = None  # a switch's: False
    more: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self):
        """The name of its value: --image-size -> image_size."""
        return self.name[2:].replace("-", "_")


def pick(flags, keys):
    """The flags of a table with these keys (a list), in the table's order."""
    return [flag for flag in flags if flag.key in keys]


COUNT = bounded(int, 0, 10**9)
MANY = bounded(int, 1, 10**9)
BATCH = bounded(int, 1, 2**20)
FRACTION = bounded(float, 0, 1)
STEPS = bounded(int, 2, 100_000)
SEED = bounded(int, 0, 2**32 - 1)
SIZE = bounded(int, 1, 4096)
RUN_FLAGS = [  # the network, its schedule and its data: on --resume, the checkpoint's
    Flag("--model", list(MODELS), "conv, res or res_att; paper: res_att", default="res_att"),
    Flag("--image-size", SIZE, "image side in pixels", default=32),
    Flag("--base-channels", SIZE, "channels at full size, a multiple of 32", default=128),
    Flag("--channel-mult", int_list(64), "channel multiplier per level", default=[1, 2, 2, 2]),
    Flag("--num-res-blocks", bounded(int, 1, 64), "residual blocks per level going down", default=2),
    Flag("--attn-resolutions", int_list(4096), "resolutions with self-attention", default=[16]),
    Flag("--dropout", FRACTION, "dropout in every block", default=0.1),
    Flag("--timesteps", STEPS, "diffusion steps T of the linear beta schedule", default=1000),
    Flag("--dataset", [*TORCHVISION_DATASETS, "folder"], "the training images", default="cifar10"),
    Flag("--data-dir", str, "the dataset's folder; folder: any tree of .png/.jpg", default="data"),
    Flag("--no-flip", bool, "no random horizontal flips (they are for cifar10 and folder)"),
    Flag("--class-cond", bool, "train on the dataset's labels, for --guidance (not paper)"),
]
PAPER = {flag.key: flag.default for flag in RUN_FLAGS}  # the defaults of a new run
COMPILE_MODES = ["auto", "default", "reduce-overhead", "max-autotune"]
COMPILE_HELP = "torch.compile the network in mode MODE (a slow first step, faster after); auto: "
COMPILE_HELP += "reduce-overhead (CUDA graphs) when training on one GPU, else default"
RUNTIME_FLAGS = [
    Flag("--device", ["auto", "cpu", "cuda"], "auto: cuda if there is one", default="auto"),
    Flag("--amp", ["auto", "bf16", "none"], "auto: bf16 on CUDA, else none (float32)", default="auto"),
    Flag("--seed", SEED, "random seed", default=0),
    Flag("--compile", COMPILE_MODES, COMPILE_HELP, more=dict(nargs="?", const="auto", metavar="MODE")),
]
GUIDANCE_HELP = "classifier-free guidance w, for class-conditional models: eps = (1 + w) "
GUIDANCE_HELP += "eps(x, y) - w eps(x); diffusers' guidance_scale is 1 + w"
SAMPLERS = ["auto", "ddpm", "ddim"]
SAMPLER_FLAGS = [
    Flag("--sampler", SAMPLERS, "auto: ddpm on CUDA, else ddim eta 1", default="auto"),
    Flag("--sample-steps", STEPS, "ddim's steps; None: 100"),
    Flag("--eta", FRACTION, "DDIM noise: 0 deterministic, 1 DDPM-like", default=0.0),
    Flag("--variance", ["fixedlarge", "fixedsmall"], "sigma_t^2: beta or beta~", default="fixedlarge"),
    Flag("--guidance", bounded(float, 0, 100), GUIDANCE_HELP, default=0.5),
]
REF_STATS = Flag("--ref-stats", str, "FID reference: an npz of mu and sigma; None: the data's")
TRAIN_FLAGS = [
    Flag("--epochs", MANY, "passes over the data; paper: 800k steps, about 2000", default=100),
    Flag("--max-steps", COUNT, "stop after this many steps if sooner; 0: no limit", default=0),
    Flag("--batch-size", BATCH, "global batch; paper: 128", default=128),
    Flag("--lr", bounded(float, 1e-12, 1), "Adam learning rate; paper: 2e-4", default=2e-4),
    Flag("--warmup", COUNT, "linear learning-rate warm-up steps; paper: 5000", default=5000),
    Flag("--grad-clip", bounded(float, 1e-9, math.inf), "gradient norm clip; inf: none", default=1.0),
    Flag("--ema-decay", FRACTION, "EMA decay, warmed up; paper: 0.9999", default=0.9999),
    Flag("--cond-drop", FRACTION, "with --class-cond, the labels dropped to 'no label'", default=0.1),
    Flag("--out-dir", str, "where ckpt.pt, log.csv and pictures go; None: runs/<model>"),
    Flag("--resume", bool, "continue the run in --out-dir (type its other flags again)"),
    Flag("--ckpt-minutes", bounded(float, 0, 1e6), "save ckpt.pt so often and at the end", default=5),
    Flag("--sample-every", COUNT, "a grid of samples every N epochs; 0: never", default=10),
    Flag("--log-every", MANY, "a log.csv row every N steps", default=100),
    Flag("--wandb", bool, "log to Weights & Biases (pip install wandb)"),
    Flag("--fid-every", COUNT, "FID and IS every N epochs, in fid.csv (pytorch-fid); 0: off", default=0),
    Flag("--fid-samples", bounded(int, 2, 10**7), "samples per FID; paper: 50000", default=10_000),
    Flag("--fid-batch-size", BATCH, "images per sampler batch of a --fid-every FID", default=500),
    REF_STATS,
]
SAMPLE_FLAGS = [
    Flag("--ckpt", str, "a ckpt.pt written by train", more=dict(required=True)),
    Flag("--num-samples", bounded(int, 1, 10**7), "how many images; FID: 50000", default=64),
    Flag("--batch-size", BATCH, "images per sampler batch", default=500),
    Flag("--class", class_label, "K, or all; None: each in turn", more=dict(dest="label")),
    Flag("--out-dir", str, "where they go; None: a samples/ folder beside the checkpoint"),
]
FID_FLAGS = [
    Flag("--images", str, "a folder of images, e.g. sample's", more=dict(required=True)),
    Flag("--dataset", [*TORCHVISION_DATASETS, "folder"], "the reference set", default="cifar10"),
    Flag("--data-dir", str, "its folder", default="data"),
    REF_STATS,
    *pick(RUNTIME_FLAGS, ["device"]),
]
NLL_FLAGS = [
    Flag("--ckpt", str, "a ckpt.pt written by train or import", more=dict(required=True)),
    Flag("--dataset", [*TORCHVISION_DATASETS, "folder"], "whose test images; None: the run's"),
    Flag("--data-dir", str, "its folder (folder: of the test images); None: the run's"),
    Flag("--num-images", bounded(int, 1, 10**7), "this many test images, evenly spread; None: all"),
    Flag("--batch-size", BATCH, "images per batch, each taking T network calls", default=100),
    *pick(SAMPLER_FLAGS, ["variance"]),
]
IMPORT_FLAGS = [
    Flag("--out-dir", str, "where ckpt.pt goes", default="runs/imported"),
    *pick(RUN_FLAGS, ["dataset", "data_dir"]),
]


def add_flags(parser, title, flags, decided=""):
    """Add a group of flags (a list of Flag); decided: who decides the flags not typed."""
    group = parser.add_argument_group(title)
    for flag in flags:
        kwargs = dict(flag.more, type=flag.type)
        if isinstance(flag.type, list):
            kwargs = dict(flag.more, choices=flag.type)
        if flag.type is bool:
            kwargs = dict(flag.more, action="store_true")
        shown = ",".join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
        text = flag.help if flag.type is bool else f"{flag.help} (default: {shown}{decided})"
        default = False if flag.type is bool else flag.default
        group.add_argument(flag.name, default=None if decided else default, help=text, **kwargs)


def build_parser():
    """The commands and their flags."""
    description = "Denoising Diffusion Probabilistic Models (Ho et al. 2020); no command: train"
    parser = Parser(prog="ddpm.py", allow_abbrev=False, description=description)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    commands = {}
    for name, command in COMMANDS.items():
        commands[name] = sub.add_parser(
            name, allow_abbrev=False, help=command["help"], description=command["help"]
        )
    add_flags(commands["train"], "the run", RUN_FLAGS, decided="; --resume: the run's")
    for name, flags in (("train", TRAIN_FLAGS), ("sample", SAMPLE_FLAGS)):
        add_flags(commands[name], "runtime", RUNTIME_FLAGS)
        add_flags(commands[name], "sampler", SAMPLER_FLAGS)
        add_flags(commands[name], name, flags)
    add_flags(commands["fid"], "fid", FID_FLAGS)
    add_flags(commands["nll"], "runtime", pick(RUNTIME_FLAGS, ["device", "seed", "compile"]))
    add_flags(commands["nll"], "nll", NLL_FLAGS)
    commands["import"].add_argument("folder", help="diffusers' UNet2DModel or pipeline folder, or a Hub name")
    add_flags(commands["import"], "import", IMPORT_FLAGS)
    commands["compare"].add_argument("runs", nargs="+", help="run folders, each with its log.csv")
    commands["compare"].add_argument(
        "--plot", metavar="FILE.png", help="draw the curves there (default: none)"
    )
    return parser


COMMANDS = {  # name: its function and its help
    "train": dict(run=train, help="train a model (Algorithm 1)"),
    "sample": dict(run=write_samples, help="generate images from a checkpoint"),
    "fid": dict(run=measure_fid, help="the FID and IS of sample's images"),
    "nll": dict(run=measure_nll, help="the variational bound in bits/dim on the test images"),
    "compare": dict(run=compare_runs, help="compare the loss and FID curves of runs"),
    "import": dict(run=import_weights, help="the paper's released weights, from diffusers' format"),
}


def parse_args(argv):
    """Parse a command line; train when it names no command."""
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
    return build_parser().parse_args(argv)


def main(argv=None):
    """Run a command: 0, 2 for bad input (one line; rank 0's) or 130 for Ctrl-C."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command]["run"](args) or 0
    except UserError as e:
        message = f"error: {e}"
    except torch.cuda.OutOfMemoryError:  # training keeps its last checkpoint: it was saved whole
        message = "error: out of GPU memory; use a smaller --batch-size"
    # torch has no public class for a failed compile (torch.compiler exposes none): this one is
    # what a missing Triton or C compiler raises, at the first call of the compiled network
    except torch._dynamo.exc.BackendCompilerFailed as e:
        cause = first_line(getattr(e, "inner_exception", e))
        message = f"error: --compile failed ({cause}); run without --compile, which computes the same"
    except KeyboardInterrupt:  # Ctrl-C outside the training loop
        if os.environ.get("RANK", "0") == "0":
            print("ddpm.py: interrupted", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"ddpm.py: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
