"""
ddpm.py: Denoising Diffusion Probabilistic Models in one file.

A faithful, readable PyTorch implementation of Ho, Jain & Abbeel, "Denoising Diffusion
Probabilistic Models" (arXiv:2006.11239, 2020), checked against the paper's official code.
Read it top to bottom: Part I is the math, Part II the networks, Part III the script.

Commands
    pip install -r requirements.txt && python ddpm.py --model res_att --epochs 100
    python ddpm.py train --resume --out-dir runs/res_att        # continue a stopped run
    python ddpm.py sample --ckpt runs/res_att/ckpt.pt --num-samples 64
    python ddpm.py forward                                      # the forward-process picture
    python ddpm.py bench --model res_att --compile              # training and sampling speed
    python ddpm.py compare runs/conv runs/res runs/res_att      # loss curves side by side
    pip install -r requirements.txt pytest && python -m pytest -q

Paper symbols and their names here
    T                       num_timesteps (--timesteps)
    beta_t                  betas
    alpha_t = 1 - beta_t    alphas
    alpha_bar_t             alphas_cumprod              (product of alpha_s for s <= t)
    alpha_bar_{t-1}         alphas_cumprod_prev
    beta_tilde_t            posterior_variance          [Eq. 7]
    mu_tilde_t(x_t, x_0)    q_posterior(...)[0]          [Eq. 7]
    eps, eps_theta          noise, eps_pred = model(x_t, t)
    x_0, x_t, z             x_0, x_t, noise              (tensors in [-1, 1] for images)
    sigma_t^2               beta_t ("fixedlarge") or beta_tilde_t ("fixedsmall")   [Sec. 3.2]

The time-index rule (the one place off-by-one bugs live)
    Code t in {0, ..., T-1} stands for paper step t+1. Training draws t = randint(0, T); the
    sampler runs t = T-1, ..., 0 and adds no noise at t = 0. The network always sees the code t.

Shape letters
    B batch, C channels, H height, W width, N = H*W positions, K kept sampler steps.

Deliberate deviations from the paper (each marked NOTE(paper) where it happens)
    1. Sampling clips the predicted x_0 to [-1, 1] and takes the posterior mean, as the official
       code does; with clip_denoised=False it is Algorithm 2 exactly.
    2. The EMA decay warms up as min(0.9999, (1 + n) / (10 + n)), so that a short run's EMA is
       not pure noise; the paper uses a flat 0.9999.
    3. An epoch is floor(50000 / 128) = 390 full batches (the last partial batch is dropped, so
       that every step has one shape).
    4. Mixed precision (bf16 autocast) on CUDA by default; --amp none for float32.
    5. Extras the paper does not have, all off by default: the cosine schedule (Nichol &
       Dhariwal 2021) and the DDIM sampler (Song et al. 2021).

Section map
    Part I   the diffusion process: schedules, extract, GaussianDiffusion (q_sample, p_losses,
             p_sample, p_sample_loop, ddim_sample_loop)
    Part II  the noise-prediction networks: timestep embedding, blocks, ConvUNet, ResUNet,
             ResAttUNet (the paper's 35.7M-parameter network), MODELS
    Part III the script: data, checkpoints, train (Alg. 1), sample (Alg. 2), forward, bench,
             compare, the command line
"""

import argparse
import copy
import csv
import math
import os
import signal
import sys
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

# -----------------------------------------------------------------------------
# Noise schedules  [Sec. 4; App. B]
# -----------------------------------------------------------------------------


def make_beta_schedule(kind, timesteps, beta_start=1e-4, beta_end=0.02):
    """The forward-process variances beta_1..beta_T as a float64 tensor of shape (T,).

    "linear": the paper's schedule, evenly spaced from beta_start to beta_end [Sec. 4].
    "cosine": Nichol & Dhariwal (2021), Eq. 17: alpha_bar(t) = f(t) / f(0) with
              f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, betas clipped at 0.999.
    """
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ValueError(f"timesteps must be an integer >= 2, got {timesteps!r}")
    if kind == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        # float64 so that alpha_bar, a product of 1000 factors, keeps its digits
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":
        # NOTE(paper): not in the paper (Nichol & Dhariwal 2021); --schedule cosine, off by default
        s = 0.008
        # t/T for t = 0..T: the T+1 grid points on which alpha_bar is defined
        frac = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        # f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)
        f = torch.cos((frac + s) / (1 + s) * math.pi / 2) ** 2
        # alpha_bar_t = f(t) / f(0)
        alpha_bar = f / f[0]
        # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped to avoid a singular last step
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {kind!r}: choose 'linear' or 'cosine'")


def ddim_timesteps(num_timesteps, steps):
    """The DDIM sub-sequence tau [Song et al., Sec. 4.2]: `steps` code steps, evenly spaced,
    strictly decreasing from T-1 to 0 (so the first step starts from pure noise and the last
    one lands on x_0). Integer arithmetic: floor(i * (T-1) / (steps-1)) for i = steps-1..0."""
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"DDIM needs 2 <= steps <= T = {num_timesteps}, got {steps}")
    # spacing (T-1)/(steps-1) >= 1, so the floors are distinct
    return [i * (num_timesteps - 1) // (steps - 1) for i in reversed(range(steps))]


# -----------------------------------------------------------------------------
# extract: one coefficient per sample, ready to broadcast  [the per-t scalars of Eq. 4-15]
# -----------------------------------------------------------------------------
# Time-index rule: code t in {0..T-1} is paper step t+1, so a[t] is the paper's a_{t+1}.


def extract(a, t, x_shape):
    """Gather a[t] for each sample of the batch and shape it (B, 1, 1, 1) to broadcast over
    x of shape x_shape. Works on a's device (t is moved there)."""
    B = t.shape[0]
    out = a.gather(0, t.to(a.device))  # (B,)
    return out.reshape(B, *((1,) * (len(x_shape) - 1)))  # (B, 1, 1, 1)


# -----------------------------------------------------------------------------
# The forward process q and the reverse process p_theta  [Sec. 2, Eq. 1-15; Alg. 1-2]
# -----------------------------------------------------------------------------


class GaussianDiffusion(nn.Module):
    """The fixed forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and the
    learned reverse process p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) [Eq. 1-2].

    It has no learned parameters: it holds the schedule as float32 buffers (computed in float64),
    so `.to(device)` moves them. `model` arguments are any callable model(x_t, t) -> eps_pred
    with t a LongTensor of shape (B,) of code steps; the device comes from these buffers, never
    from the model. Uses: extract, ddim_timesteps.
    """

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
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t  [Eq. 7]; 0 at t = 1
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            # beta_t; used by p_sample (sigma_t^2 = beta_t, "fixedlarge")
            "betas": betas,
            # alpha_bar_t; used by ddim_sample_loop
            "alphas_cumprod": alphas_cumprod,
            # alpha_bar_{t-1}; kept for readers cross-referencing the official code
            "alphas_cumprod_prev": alphas_cumprod_prev,
            # sqrt(alpha_bar_t); used by q_sample
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            # sqrt(1 - alpha_bar_t); used by q_sample
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # sqrt(1 / alpha_bar_t); used by predict_x0_from_eps
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            # sqrt(1 / alpha_bar_t - 1); used by predict_x0_from_eps
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            # beta_tilde_t; used by q_posterior
            "posterior_variance": posterior_variance,
            # log beta_tilde_t with the 0 at t = 1 replaced by beta_tilde_2; used by p_sample
            "posterior_log_variance_clipped": torch.cat(
                [posterior_variance[1:2], posterior_variance[1:]]
            ).log(),
            # beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t): weight of x_0 in mu_tilde [Eq. 7]
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            # (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t): weight of x_t in mu_tilde
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * alphas.sqrt()
            / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            # float32 on the module's device; not saved in state_dicts (rebuilt from the config)
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
        """L_simple [Eq. 14], one step of Algorithm 1: the mean squared error between the true
        noise and the network's prediction of it from x_t."""
        B = x_0.shape[0]
        if t is None:
            # Alg. 1, line 3: t ~ Uniform({1, ..., T}), i.e. code t in {0..T-1}
            t = torch.randint(0, self.num_timesteps, (B,), device=self.betas.device)
        if noise is None:
            # Alg. 1, line 4: eps ~ N(0, I)
            noise = torch.randn_like(x_0)
        # the argument of eps_theta in Alg. 1, line 5: sqrt(alpha_bar_t) x_0 + sqrt(1-alpha_bar_t) eps
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
        """The forward-process posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) [Eq. 6-7].
        Returns (mean, variance), the variance shaped (B, 1, 1, 1)."""
        # mu_tilde_t = coef1 * x_0 + coef2 * x_t  [Eq. 7]
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return mean, extract(self.posterior_variance, t, x_t.shape)  # beta_tilde_t  [Eq. 7]

    def p_sample(self, model, x_t, t, noise=None, clip_denoised=True, variance="fixedlarge"):
        """One reverse step x_t -> x_{t-1}  [Alg. 2, lines 3-4]. `t` is a Python int shared by
        the batch; `noise` fixes z (drawn when None).

        mu_theta is computed as the official code does: predict x_0 from eps [Eq. 15], clip it to
        [-1, 1], and take the posterior mean mu_tilde(x_t, x_0) [Eq. 7]. Without clipping this
        is exactly Eq. 11: (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t).
        """
        if variance not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"variance must be 'fixedlarge' or 'fixedsmall', got {variance!r}")
        B = x_t.shape[0]
        t_batch = torch.full((B,), t, device=self.betas.device, dtype=torch.long)  # (B,)
        eps_pred = model(x_t, t_batch)  # eps_theta(x_t, t)
        x_0_pred = self.predict_x0_from_eps(x_t, t_batch, eps_pred)  # [Eq. 15]
        if clip_denoised:
            # NOTE(paper): the official code clips x_0; Alg. 2 does not. Data lives in [-1, 1].
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x_0_pred, x_t, t_batch)  # mu_theta(x_t, t)  [Eq. 7 = Eq. 11]
        if t == 0:
            # Alg. 2, line 3: z = 0 at the last step, so x_0 is the mean
            return mean
        if noise is None:
            noise = torch.randn_like(x_t)  # Alg. 2, line 3: z ~ N(0, I)
        if variance == "fixedlarge":
            sigma = self.betas[t].sqrt()  # sigma_t^2 = beta_t, the paper's CIFAR-10 setting
        else:
            sigma = (0.5 * self.posterior_log_variance_clipped[t]).exp()  # sigma_t^2 = beta_tilde_t
        # Alg. 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z
        return mean + sigma * noise

    @torch.inference_mode()
    def p_sample_loop(
        self, model, shape, clip_denoised=True, variance="fixedlarge", x_T=None, generator=None,
        keep=None,
    ):
        """Algorithm 2: draw x_T ~ N(0, I) and apply p_sample for t = T-1, ..., 0.

        Returns x_0; when `keep` (a collection of code steps) is given, returns (x_0, xs) where
        xs (K, B, C, H, W) holds x_t, the input of step t, for each kept t in sampling order.
        `generator` makes the draws reproducible; the model must be in eval() mode.
        """
        _check_eval(model)
        device = self.betas.device
        # Alg. 2, line 1: x_T ~ N(0, I)
        x_t = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
        kept, keep = [], set(keep or ())
        # Alg. 2, line 2: for t = T, ..., 1 (code T-1, ..., 0)
        for t in reversed(range(self.num_timesteps)):
            if t in keep:
                kept.append(x_t)
            # Alg. 2, line 3: z ~ N(0, I) if t > 1 (code t > 0), else z = 0
            noise = torch.randn(shape, generator=generator, device=device) if t > 0 else None
            # Alg. 2, line 4
            x_t = self.p_sample(model, x_t, t, noise, clip_denoised, variance)
        # Alg. 2, line 6: return x_0
        return (x_t, torch.stack(kept)) if keep else x_t  # (B, C, H, W), (K, B, C, H, W)

    @torch.inference_mode()
    def ddim_sample_loop(
        self, model, shape, steps, eta=0.0, clip_denoised=True, x_T=None, generator=None,
        keep=None,
    ):
        """DDIM sampling [Song et al. 2021, Eq. 12] over `steps` steps of ddim_timesteps.

        With a = alpha_bar_t and a' = alpha_bar of the next (smaller) step, each step is
            x_0_pred = (x_t - sqrt(1 - a) eps) / sqrt(a)
            x_prev   = sqrt(a') x_0_pred + sqrt(1 - a' - sigma^2) eps + sigma z,
            sigma    = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')           [Eq. 16]
        eta = 0 is deterministic; eta = 1 with steps = T is the DDPM sampler with sigma^2 =
        beta_tilde. When x_0_pred is clipped, eps is recomputed from the clipped x_0_pred so that
        the step stays on the DDIM path. Returns like p_sample_loop (keep: code steps kept).
        """
        # NOTE(paper): DDIM is not in the paper (Song et al. 2021); --sampler ddim, off by default
        _check_eval(model)
        device = self.betas.device
        timesteps = ddim_timesteps(self.num_timesteps, steps)
        x_t = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
        kept, keep = [], set(keep or ())
        one = torch.ones((), device=device)
        for i, t in enumerate(timesteps):
            if t in keep:
                kept.append(x_t)
            last = i == len(timesteps) - 1
            a = self.alphas_cumprod[t]  # alpha_bar_t
            a_prev = one if last else self.alphas_cumprod[timesteps[i + 1]]  # alpha_bar_{tau_{i-1}}
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)  # (B,)
            eps = model(x_t, t_batch)
            x_0_pred = self.predict_x0_from_eps(x_t, t_batch, eps)  # "predicted x_0" in Eq. 12
            if clip_denoised:
                x_0_pred = x_0_pred.clamp(-1.0, 1.0)  # NOTE(paper): as in p_sample
                eps = (x_t - a.sqrt() * x_0_pred) / (1 - a).sqrt()  # the eps that x_0_pred implies
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # [Eq. 16]
            # Eq. 12: "predicted x_0" + "direction pointing to x_t" (+ random noise below)
            x_t = a_prev.sqrt() * x_0_pred + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and not last:
                x_t = x_t + sigma * torch.randn(shape, generator=generator, device=device)
        return (x_t, torch.stack(kept)) if keep else x_t


def _check_eval(model):
    """Sampling with dropout on is a classic bug: refuse a module that is still in train()."""
    if getattr(model, "training", False):
        raise ValueError("call model.eval() before sampling: dropout is still active")


# =============================================================================
# Part II. The noise-prediction networks eps_theta(x_t, t)  [Sec. 4; App. B]
# =============================================================================

# -----------------------------------------------------------------------------
# Building blocks  [App. B: "a U-Net backbone similar to an unmasked PixelCNN++"]
# -----------------------------------------------------------------------------


def timestep_embedding(t, dim):
    """The Transformer sinusoidal embedding of the step index [Sec. 4; Vaswani et al.]:
    (B,) -> (B, dim), sin for the first half of the channels and cos for the second."""
    half = dim // 2
    # frequencies 10000^(-i / (half - 1)) for i = 0..half-1
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


def init_(layer, scale=1.0):
    """The official initialisation: weights ~ variance_scaling(scale, "fan_avg", "uniform"),
    which is xavier_uniform with gain sqrt(scale); biases 0. scale=0 gives zeros."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer


def Normalize(channels):
    """GroupNorm with 32 groups, the paper's replacement for weight normalisation [App. B]."""
    return GroupNorm(32, channels, eps=1e-6)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose compiled form keeps a channels_last input channels_last. CUDA's
    group_norm first copies its input to NCHW. In a compiled channels_last step, that mixed the two
    layouts, and the step spent a fifth of its GPU time converting tensors back for cuDNN's
    backward. Compiled, a channels_last input takes forward_keep_layout: the same function built
    from per-channel statistics (sums over H and W, which read either layout in order), and
    inductor fuses it. Eager, and an NCHW input (the CPU), keep PyTorch's GroupNorm."""

    def forward(self, x):
        if not torch.compiler.is_compiling() or x.is_contiguous():
            return super().forward(x)
        return self.forward_keep_layout(x)

    def forward_keep_layout(self, x):  # Wu & He (2018), Eq. 1-3 with S_i = one group of channels
        B, C, H, W = x.shape
        G = self.num_groups
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, as autocast runs GroupNorm
        var_c, mean_c = torch.var_mean(x, dim=(2, 3), unbiased=False)  # per channel: (B, C)
        var_c, mean_c = var_c.view(B, G, C // G), mean_c.view(B, G, C // G)
        mean = mean_c.mean(2, keepdim=True)  # mu of each group: (B, G, 1)
        # sigma^2 by the law of total variance: the mean variance within the group's channels plus
        # the variance of their means (the channels are equally large)
        var = (var_c + (mean_c - mean) ** 2).mean(2, keepdim=True)  # (B, G, 1)
        # gamma (x - mu) / sigma + beta as one affine map per sample and channel, as PyTorch's
        # kernels compute it: its backward then needs only sum(dy) and sum(dy * x) per channel
        scale = self.weight.view(G, C // G) * torch.rsqrt(var + self.eps)  # (B, G, C/G)
        shift = self.bias.view(G, C // G) - mean * scale  # (B, G, C/G)
        return x * scale.view(B, C, 1, 1) + shift.view(B, C, 1, 1)  # (B, C, H, W)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, GroupNorm -> SiLU before each, the time embedding added after the
    first and dropout before the second [App. B]. No shortcut: the plain block of ConvUNet."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = init_(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = init_(nn.Linear(temb_ch, out_ch))  # per-channel bias from the time step
        self.norm2 = Normalize(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = init_(nn.Conv2d(out_ch, out_ch, 3, padding=1))

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # + (B, out_ch, 1, 1)
        return self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out_ch, H, W)


class ResBlock(ConvBlock):
    """A ConvBlock plus a shortcut: x + F(x) (He et al. 2016), a 1x1 conv when the channel count
    changes. The last conv starts at zero, so every block starts as the identity [official code]."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__(in_ch, out_ch, temb_ch, dropout)
        nn.init.zeros_(self.conv2.weight)
        self.shortcut = init_(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        return self.shortcut(x) + super().forward(x, temb)  # (B, out_ch, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the N = H*W positions, with a residual connection
    [App. B]. The softmax runs over the keys, through F.scaled_dot_product_attention."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.qkv = init_(nn.Conv2d(ch, 3 * ch, 1))  # q, k and v: three 1x1 convs in one
        self.proj_out = init_(nn.Conv2d(ch, ch, 1), scale=0.0)  # zero: starts as the identity

    def forward(self, x, temb=None):  # temb unused: the signature every stage layer shares
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W)  # (B, 3, C, N)
        q, k, v = qkv.transpose(2, 3)[:, :, None].unbind(1)  # 3 x (B, 1, N, C): one head
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: (B, 1, N, C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv [App. B]."""

    def __init__(self, ch):
        super().__init__()
        self.conv = init_(nn.Conv2d(ch, ch, 3, stride=2))

    def forward(self, x, temb=None):
        # pad right and bottom only: TensorFlow's "SAME" padding for a stride-2 conv, as the paper
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv [App. B]."""

    def __init__(self, ch):
        super().__init__()
        self.conv = init_(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Stage(nn.ModuleList):
    """A block and, at attention resolutions, the attention layers after it: one skip output."""

    def forward(self, h, temb):
        for layer in self:
            h = layer(h, temb)
        return h


# -----------------------------------------------------------------------------
# The three UNets, from the plainest to the paper's network  [App. B]
# -----------------------------------------------------------------------------


class ConvUNet(nn.Module):
    """The UNet skeleton with plain convolutional blocks: 32,866,947 parameters at the defaults.

    Going down, each level runs num_res_blocks blocks and a stride-2 conv; going up, each level
    runs num_res_blocks + 1 blocks, each fed the concatenation of the running features and one
    saved skip, then upsamples. The time step enters every block through its embedding.
    What it lacks: no block has a shortcut, so the signal and the gradient must pass through
    some 40 convolutions in a row; this is the network that failed in the original experiment.
    Subclasses change the block (Block) and switch attention on (attention).
    """

    Block = ConvBlock
    attention = False

    def __init__(
        self, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1, image_size=32,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]  # channels at each level
        levels = len(widths)
        if levels < 1 or num_res_blocks < 1 or in_channels < 1 or not 0 <= dropout < 1:
            raise ValueError("need channel_mult, num_res_blocks >= 1, in_channels >= 1, 0 <= dropout < 1")
        if image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1) = "
                f"{2 ** (levels - 1)} so that each of the {levels} levels can halve it"
            )
        if base_channels < 32 or any(w % 32 for w in widths):
            raise ValueError(
                f"channel widths {widths} (base_channels x channel_mult) must be multiples of 32 "
                "so that GroupNorm(32) can split them"
            )
        self.base_channels = base_channels
        temb_ch = 4 * base_channels
        # timestep embedding: sinusoid (base) -> Linear (4 base) -> SiLU -> Linear (4 base)
        self.temb = nn.Sequential(
            init_(nn.Linear(base_channels, temb_ch)), nn.SiLU(), init_(nn.Linear(temb_ch, temb_ch))
        )
        self.conv_in = init_(nn.Conv2d(in_channels, base_channels, 3, padding=1))

        def stage(in_ch, out_ch, res):  # a block, then attention if this resolution has it
            attend = self.attention and res in attn_resolutions
            return Stage([self.Block(in_ch, out_ch, temb_ch, dropout)] + ([AttnBlock(out_ch)] if attend else []))

        # Down path: record the channels of every skip output the up path will consume
        self.down = nn.ModuleList()
        skips, ch, res = [base_channels], base_channels, image_size
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, width, res))
                ch = width
                skips.append(ch)
            if level != levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        # Middle: block, attention (in ResAttUNet), block at the lowest resolution
        middle = [self.Block(ch, ch, temb_ch, dropout), self.Block(ch, ch, temb_ch, dropout)]
        if self.attention:
            middle.insert(1, AttnBlock(ch))
        self.mid = Stage(middle)
        # Up path: num_res_blocks + 1 blocks per level, each concatenating one skip
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(ch + skips.pop(), width, res))
                ch = width
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        assert not skips, "every skip is consumed exactly once"
        self.norm_out = Normalize(ch)
        self.conv_out = init_(nn.Conv2d(ch, in_channels, 3, padding=1), scale=0.0)  # zero init

    def forward(self, x, t):
        """x: (B, C, H, W) noisy images x_t, t: (B,) code steps -> eps_pred (B, C, H, W)."""
        temb = self.temb(timestep_embedding(t, self.base_channels))  # (B, 4 * base)
        hs = [self.conv_in(x)]  # (B, base, H, W)
        for layer in self.down:
            hs.append(layer(hs[-1], temb))  # (B, C_level, H_level, W_level)
        h = self.mid(hs[-1], temb)  # (B, C_last, H_min, W_min)
        for layer in self.up:
            if not isinstance(layer, Upsample):
                h = torch.cat([h, hs.pop()], dim=1)  # (B, C + C_skip, H_level, W_level)
            h = layer(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class ResUNet(ConvUNet):
    """ConvUNet with residual blocks: 34,164,227 parameters at the defaults.

    What it adds: a shortcut around every block (x + F(x)) with the block's last conv started at
    zero, so the whole network starts close to the identity and gradients reach every layer.
    This is what made deep networks trainable, and it is the difference between ConvUNet failing
    and this one learning in the original experiment. Attention is still off.
    """

    Block = ResBlock


class ResAttUNet(ResUNet):
    """The paper's CIFAR-10 network, block for block: 35,746,307 parameters at the defaults.

    What it adds over ResUNet: single-head self-attention after every block at the resolutions in
    attn_resolutions (16x16 by default) and one in the middle between the two blocks [App. B].
    Convolutions only see a 3x3 neighbourhood; attention lets every position look at the whole
    image, which helps global structure (the original experiment's best samples).
    """

    attention = True


# the names accepted by --model
MODELS = {"conv": ConvUNet, "res": ResUNet, "res_att": ResAttUNet}


def count_parameters(model):
    """The number of trainable numbers in a model."""
    return sum(p.numel() for p in model.parameters())


# =============================================================================
# Part III. The script: data, training [Alg. 1], sampling [Alg. 2], pictures, CLI
# =============================================================================


class UserError(Exception):
    """A mistake in the command line or its files: main() prints it on one line and exits 2."""


def first_line(e):
    """An exception's message cut to its first line (its type's name when it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


# -----------------------------------------------------------------------------
# Data: the whole training set decoded once into one uint8 tensor on the device  [Sec. 4]
# -----------------------------------------------------------------------------

TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
DATASETS = [*TORCHVISION_DATASETS, "folder"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def evenly_spaced(n, k):
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    return torch.linspace(0, n - 1, min(k, n)).round().long()


def load_dataset(name, data_dir, image_size, max_images=None):
    """The training set as one uint8 tensor (N, C, H, W), H = W = image_size.

    cifar10, mnist and fashion_mnist come from torchvision (downloaded on first use); the 28x28
    digits are padded to 32x32. "folder" reads every .png/.jpg under data_dir, resized and
    centre-cropped; channels follow the first image (grey or RGB). max_images picks that many
    images spread over the set (the forward picture needs only a few).
    """
    if name == "folder":
        return load_image_folder(Path(data_dir), image_size, max_images)
    try:
        ds = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])(data_dir, train=True, download=True)
    except Exception as e:  # no internet, a proxy, a full disk: all end the same way
        raise UserError(
            f"could not get {name} into --data-dir {data_dir} ({first_line(e)}); without internet, put "
            f"torchvision's {name} files there, or train on any images with --dataset folder --data-dir DIR"
        )
    x = torch.as_tensor(np.asarray(ds.data))  # CIFAR-10: (N, 32, 32, 3); MNIST: (N, 28, 28)
    if max_images:
        x = x[evenly_spaced(len(x), max_images)]
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else F.pad(x[:, None], (2, 2, 2, 2))  # (N, C, 32, 32)
    if x.shape[-1] != image_size:
        x = TF.resize(x, [image_size, image_size], antialias=True)  # (N, C, H, W)
    return x.contiguous()


def load_image_folder(root, image_size, max_images=None):
    """Decode every image under root (threads: decoding releases the GIL) into (N, C, H, W)."""
    if not root.is_dir():
        raise UserError(f"--data-dir {root} is not a folder (with --dataset folder it must hold images)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"--data-dir {root} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
    if max_images:
        files = [files[i] for i in evenly_spaced(len(files), max_images)]
    from PIL import Image  # Pillow: installed with torchvision

    def read(path, mode=None):
        try:
            with Image.open(path) as im:
                mode = mode or ("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
                x = torch.from_numpy(np.array(im.convert(mode)))  # (h, w) or (h, w, 3) uint8
        except OSError as e:
            raise UserError(f"cannot decode image {path}: {e}")
        x = x.reshape(*x.shape[:2], -1).permute(2, 0, 1)  # (C, h, w)
        x = TF.resize(x, image_size, antialias=True)  # shorter side -> image_size
        return TF.center_crop(x, image_size)  # (C, image_size, image_size)

    mode = "L" if read(files[0]).shape[0] == 1 else "RGB"  # the first image decides the channels
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        return torch.stack(list(pool.map(lambda p: read(p, mode), files)))  # (N, C, H, W)


def get_batch(data, idx, flip, memory_format=torch.contiguous_format):
    """Images data[idx] as floats in [-1, 1] [Sec. 4], each mirrored with probability 1/2 when
    flip is set (the paper's random horizontal flips for CIFAR-10) [App. B]."""
    x_0 = data[idx].float() / 127.5 - 1.0  # (B, C, H, W), {0..255} -> [-1, 1]
    if flip:
        mirror = torch.rand(x_0.shape[0], 1, 1, 1, device=x_0.device) < 0.5  # (B, 1, 1, 1)
        x_0 = torch.where(mirror, x_0.flip(3), x_0)
    return x_0.contiguous(memory_format=memory_format)


# -----------------------------------------------------------------------------
# Models from configurations, devices, checkpoints, pictures
# -----------------------------------------------------------------------------


def build_model(cfg):
    """The network a run's configuration describes (the parsed flags, or a checkpoint's config)."""
    try:
        return MODELS[cfg["model"]](
            in_channels=cfg["channels"], base_channels=cfg["base_channels"],
            channel_mult=tuple(cfg["channel_mult"]), num_res_blocks=cfg["num_res_blocks"],
            attn_resolutions=tuple(cfg["attn_resolutions"]), dropout=cfg["dropout"],
            image_size=cfg["image_size"],
        )
    except ValueError as e:
        raise UserError(f"{e} (flags --image-size, --base-channels, --channel-mult, --num-res-blocks)")


def setup_device(args):
    """Resolve --device and --amp into a torch.device and an autocast dtype (None: float32)."""
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no Apple GPU support; use --device cpu")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per torchrun process
        torch.cuda.set_device(name)
        torch.backends.cudnn.benchmark = True  # shapes never change: let cuDNN pick the fastest convs
        torch.set_float32_matmul_precision("high")  # float32 matmuls may use TF32 tensor cores
    device = torch.device(name)
    # NOTE(paper): bf16 autocast on CUDA by default (float32 master weights); --amp none for float32
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs --device cuda; use --amp bf16 or --amp none")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device, dtype):
    """Mixed precision for the network's forward pass (a no-op when dtype is None)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


CKPT_FORMAT = "ddpm.py checkpoint 1"


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-write leaves the old checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as e:  # a full disk (torch's zip writer raises RuntimeError)
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({first_line(e)}); the checkpoint already there, if any, is "
                        "intact: free some disk space, then continue with --resume")
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path):
    """Load a checkpoint with weights_only=True: tensors and plain values only, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (check --ckpt / --out-dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {path}: truncated, or not a checkpoint written by ddpm.py ({first_line(e)})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is a torch file but not a ddpm.py checkpoint")
    return ckpt


def prepare_out_dir(path):
    """Create the output folder and make sure we can write to it, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".ddpm_write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out-dir {path} is not writable ({e.strerror or e})")


def to_uint8(x):
    """[-1, 1] floats -> {0..255} bytes, rounding to nearest (what PNG and npz files hold)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(x, path, nrow):
    """Save images in [-1, 1] as one PNG grid with nrow images per row."""
    save_image((x.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


def run_sampler(diffusion, model, x_T, args, dtype, generator, trajectory=0):
    """Sample from x_T with --sampler (ddpm: Alg. 2; ddim: --sample-steps steps, --eta). With
    trajectory=k, also return the states x_t at k evenly spaced steps of the run (K, B, C, H, W)."""
    T = diffusion.num_timesteps
    steps = list(reversed(range(T))) if args.sampler == "ddpm" else ddim_timesteps(T, args.sample_steps)
    keep = [steps[i * len(steps) // trajectory] for i in range(trajectory)] if trajectory else None
    with autocast(x_T.device, dtype):
        if args.sampler == "ddpm":
            return diffusion.p_sample_loop(model, x_T.shape, x_T=x_T, generator=generator, keep=keep)
        return diffusion.ddim_sample_loop(
            model, x_T.shape, args.sample_steps, args.eta, x_T=x_T, generator=generator, keep=keep
        )


def save_samples_and_trajectory(diffusion, model, x_T, args, dtype, out_dir):
    """The sample grid from a fixed x_T, and the progressive-generation picture: for the first
    8 images a row each, x_t at 9 evenly spaced steps from pure noise, then the final x_0."""
    generator = torch.Generator(x_T.device).manual_seed(args.seed)  # the same z every time
    x_0, xs = run_sampler(diffusion, model, x_T, args, dtype, generator, trajectory=9)
    save_grid(x_0, out_dir / "samples.png", nrow=8)
    rows = torch.cat([xs[:, :8], x_0[None, :8]]).transpose(0, 1)  # (8, 10, C, H, W)
    save_grid(rows.flatten(0, 1), out_dir / "reverse_process.png", nrow=rows.shape[1])
    return out_dir / "samples.png"


# -----------------------------------------------------------------------------
# Training  [Alg. 1; App. B: Adam 2e-4, warm-up, grad clip 1, EMA 0.9999, dropout 0.1]
# -----------------------------------------------------------------------------


def maybe_compile(module, args, cuda_graphs=False):
    """torch.compile with the mode of --compile (the module itself when it is off). Inductor fuses
    GroupNorm + SiLU, bias + add, etc. "auto" adds CUDA graphs ("reduce-overhead") where
    cuda_graphs allows: a training step at batch 128 is a thousand short kernels, and replaying
    them as a graph removes most launch overhead. Big sampling batches gain little from it."""
    if not args.compile:
        return module
    mode = args.compile
    if mode == "auto":
        mode = "reduce-overhead" if cuda_graphs else "default"
    return torch.compile(module, mode=mode)


def build_training(args, channels, device, world=1):
    """Everything a training step needs: the network (net), the module the step calls (model:
    net, wrapped by DDP and/or torch.compile), its EMA copy, the diffusion, optimiser, LR
    warm-up and gradient scaler."""
    net = build_model({**vars(args), "channels": channels}).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # NHWC: what the tensor cores want
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # EMA weights: what we sample from
    diffusion = GaussianDiffusion(make_beta_schedule(args.schedule, args.timesteps)).to(device)
    # Adam, default betas, no weight decay; fused: one kernel for all parameters on CUDA
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, fused=device.type == "cuda")
    # lr = 2e-4 * min(step / 5000, 1): the official code's linear warm-up
    warmup = lambda step: min(1.0, step / args.warmup) if args.warmup > 0 else 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # fp16 only
    model = net
    if world > 1:
        # gradients averaged over the ranks during backward; the EMA and optimiser see them on every rank
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # CUDA graphs on one GPU only: DDP's gradient hooks rule them out
    model = maybe_compile(model, args, cuda_graphs=device.type == "cuda" and world == 1)
    return net, model, ema, diffusion, optimizer, scheduler, scaler


def train_step(model, net, ema, diffusion, optimizer, scheduler, scaler, x_0, step, args, dtype):
    """One iteration of Algorithm 1 with the official code's gradient clipping and EMA.
    Returns (loss, grad_norm) as device tensors: nothing here waits for the GPU."""
    if args.compile:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: CUDA-graph buffers may be reused
    with autocast(x_0.device, dtype):
        loss = diffusion.p_losses(model, x_0)  # Alg. 1, lines 2-5: L_simple on a fresh t and eps
    scaler.scale(loss).backward()  # Alg. 1, line 5: the gradient step's gradient
    scaler.unscale_(optimizer)  # true gradients before measuring them (no-op unless fp16)
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)  # global norm <= 1
    scaler.step(optimizer)  # Adam; fp16's scaler skips it when a gradient overflowed
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # NOTE(paper): the decay warms up as (1 + n) / (10 + n) before reaching 0.9999, so that a
    # short run's EMA is not an average over mostly random initial weights
    decay = min(args.ema_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)  # ema += (1-d)(net-ema)
    return loss.detach(), grad_norm


# flags a resumed run may change; the others (network, data, recipe) must match the checkpoint
RESUME_MAY_CHANGE = {
    "epochs", "max_steps", "data_dir", "device", "amp", "compile", "ckpt_every", "sample_every",
    "log_every", "wandb", "sampler", "sample_steps", "eta",
}


def train(args):
    """Train eps_theta with Algorithm 1 and write ckpt.pt, log.csv and pictures to --out-dir.
    Returns the trained network (the plain module, on its device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun
    rank = int(os.environ.get("RANK", "0"))  # this process; rank 0 writes every file
    device, dtype = setup_device(args)  # --device, --amp
    out_dir = Path(args.out_dir or f"runs/{args.model}")
    ckpt_path, ckpt = out_dir / "ckpt.pt", None
    if args.resume:  # continue: the configuration comes from the checkpoint
        ckpt = load_checkpoint(ckpt_path)
        for key, saved in ckpt["config"].items():
            if key in ("resume", "out_dir") or not hasattr(args, key):
                continue
            if key not in args.explicit:  # what was not typed comes from the checkpoint
                setattr(args, key, saved)
            elif key not in RESUME_MAY_CHANGE and getattr(args, key) != saved:
                raise UserError(
                    f"--resume: --{key.replace('_', '-')} {getattr(args, key)} contradicts the "
                    f"checkpoint's {saved}; drop the flag, or start a new run in another --out-dir"
                )
    elif ckpt_path.exists():
        raise UserError(f"{ckpt_path} exists: add --resume to continue it, or choose another --out-dir")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    if args.sampler == "ddim" and not 2 <= args.sample_steps <= args.timesteps:
        raise UserError(f"--sample-steps must be between 2 and --timesteps {args.timesteps}")
    if args.wandb and rank == 0:
        try:
            import wandb  # optional extra, imported only when asked for
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb")
    if rank == 0:
        prepare_out_dir(out_dir)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # setup -------------------------------------------------------------------
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    data = load_dataset(args.dataset, args.data_dir, args.image_size).to(device)  # (N, C, H, W) uint8
    N, C, H, W = data.shape
    B, b = args.batch_size, args.batch_size // world  # global batch, this rank's share
    steps_per_epoch = N // B  # NOTE(paper): full batches only, so every step has one shape
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {B} is larger than the dataset ({N} images)")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    flip = args.dataset in ("cifar10", "folder") and not args.no_flip  # natural images only
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net, model, ema, diffusion, optimizer, scheduler, scaler = build_training(args, C, device, world)
    config = {k: v for k, v in vars(args).items() if k not in ("explicit", "command")}
    config.update(channels=C, out_dir=str(out_dir))
    step, elapsed_before = 0, 0.0
    torch.manual_seed(args.seed + rank)  # a different t, eps, flip and dropout stream per rank
    if ckpt:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, elapsed_before = ckpt["step"], ckpt["elapsed"]
        if rank == 0:  # rank 0 continues its random stream exactly; others start a fresh one
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        else:
            torch.manual_seed(args.seed + rank + world * step)
    # a fixed x_T for every grid, so that grids are comparable; eager: 64 images are not worth a compile
    grid_x_T = torch.randn((64, C, H, W), generator=torch.Generator().manual_seed(args.seed)).to(device)
    if rank == 0:
        log_file = open(out_dir / "log.csv", "a" if ckpt else "w", newline="")
        log = csv.writer(log_file)
        if not ckpt:
            log.writerow(["step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"])
        if args.wandb:
            wandb.init(project="ddpm.py", config=config, dir=str(out_dir), resume="allow")
        print(f"training {args.model} ({count_parameters(net):,} parameters) on {args.dataset} "
              f"{N}x{C}x{H}x{W}, {device}, amp {dtype}, compile {args.compile}; step {step}/{total_steps}")

    loss_sum = torch.zeros((), device=device)  # summed between log lines, read only there
    bad_step = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
    saved_step, perm_epoch, t_start = step, None, time.time()
    last = {"step": step, "time": t_start, "print": 0.0, "speed": (step, t_start)}

    def elapsed():
        return elapsed_before + time.time() - t_start

    def check_finite():
        """Stop, saving nothing, if a loss went NaN or infinite (waits for the GPU: log and save points)."""
        if int(bad_step) >= 0:
            raise UserError(
                f"the loss became NaN or infinite at step {int(bad_step)}; stopped without saving, "
                f"so {ckpt_path} still holds step {saved_step} (try --amp none or a lower --lr)"
            )

    def checkpoint():
        nonlocal saved_step
        check_finite()
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "format": CKPT_FORMAT, "config": config, "step": step, "epoch": step // steps_per_epoch,
                "elapsed": elapsed(), "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
            })
        saved_step = step

    def write_log(grad_norm):
        """One log.csv row (and a console line every few seconds), from tensors read here only."""
        check_finite()
        now = time.time()
        loss = loss_sum.item() / (step - last["step"])
        loss_sum.zero_()
        speed = (step - last["speed"][0]) * B / max(now - last["speed"][1], 1e-9)  # images/s
        row = [step, step // steps_per_epoch, f"{loss:.6f}", f"{scheduler.get_last_lr()[0]:.3e}",
               f"{float(grad_norm):.4f}", f"{speed:.1f}", f"{elapsed():.1f}"]
        last.update(step=step, time=now, speed=(step, now))
        if rank != 0:
            return
        log.writerow(row)
        log_file.flush()
        if args.wandb:
            wandb.log({"loss": loss, "lr": float(row[3]), "grad_norm": float(row[4]),
                       "images_per_s": speed}, step=step)
        if now - last["print"] >= 5 or step == total_steps:
            eta = (total_steps - step) * B / max(speed, 1e-9)
            print(f"step {step}/{total_steps} | epoch {row[1]} | loss {loss:.4f} | {speed:,.0f} img/s | "
                  f"lr {row[3]} | ETA {eta / 60:.1f} min", flush=True)
            last["print"] = now

    # Ctrl-C and SIGTERM only raise a flag; the loop stops between two steps and saves
    stop_requested, previous_handlers = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous_handlers[sig] = signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
        except ValueError:  # not the main thread: keep the default handlers
            pass

    # the loop ------------------------------------------------------------------
    try:
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            if perm_epoch != epoch:  # this epoch's order: a function of (seed, epoch), same on all ranks
                perm = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed + epoch)).to(device)
                perm_epoch = epoch
            idx = perm[i * B + rank * b: i * B + (rank + 1) * b]  # this rank's share of the batch
            x_0 = get_batch(data, idx, flip, memory_format)  # Alg. 1, line 2: x_0 ~ q(x_0)
            loss, grad_norm = train_step(model, net, ema, diffusion, optimizer, scheduler, scaler,
                                         x_0, step, args, dtype)
            step += 1
            loss_sum += loss
            bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step, step)
            if stop_requested:
                raise KeyboardInterrupt
            if step % args.log_every == 0 or step == total_steps or time.time() - last["time"] >= 10:
                write_log(grad_norm)
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch or step == total_steps or (args.ckpt_every and step % args.ckpt_every == 0):
                checkpoint()
            epochs_done = step // steps_per_epoch
            if end_of_epoch and args.sample_every and epochs_done % args.sample_every == 0 and rank == 0:
                (out_dir / "grids").mkdir(exist_ok=True)
                path = out_dir / "grids" / f"epoch_{epochs_done:04d}.png"
                save_grid(run_sampler(diffusion, ema, grid_x_T, args, dtype,
                                      torch.Generator(device).manual_seed(args.seed)), path, nrow=8)
                if args.wandb:
                    wandb.log({"samples": wandb.Image(str(path))}, step=step)
            if end_of_epoch:
                last["speed"] = (step, time.time())  # keep saving and sampling out of images/s
    except KeyboardInterrupt:
        checkpoint()
        print(f"\nstopped at step {step}: saved {ckpt_path}; continue with --resume --out-dir {out_dir}",
              file=sys.stderr)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if rank == 0:
            log_file.close()

    if rank == 0:  # the final pictures, from the EMA weights and the fixed x_T
        path = save_samples_and_trajectory(diffusion, ema, grid_x_T, args, dtype, out_dir)
        print(f"done: {step} steps in {elapsed() / 60:.1f} min; {ckpt_path}, {path}, "
              f"{out_dir / 'reverse_process.png'}")
        if args.wandb:
            wandb.log({"samples": wandb.Image(str(path))}, step=step)
            wandb.finish()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return net


# -----------------------------------------------------------------------------
# Sampling from a checkpoint  [Alg. 2; DDIM]
# -----------------------------------------------------------------------------


def sample(args):
    """Generate --num-samples images from a checkpoint alone, from its EMA weights by default."""
    device, dtype = setup_device(args)
    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    if args.sampler == "ddim" and not 2 <= args.sample_steps <= cfg["timesteps"]:
        raise UserError(f"--sample-steps must be between 2 and the model's T = {cfg['timesteps']}")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt[args.weights])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{args.ckpt} does not hold {args.weights} weights for its configuration: {e}")
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    diffusion = GaussianDiffusion(make_beta_schedule(cfg["schedule"], cfg["timesteps"])).to(device)
    sampler_model = maybe_compile(model, args)
    out_dir = Path(args.out_dir or Path(args.ckpt).parent / "samples")
    prepare_out_dir(out_dir)
    if args.format == "png":  # images of an earlier, larger run would stay beside these, and FID would read both
        ours = {f"{k:06d}.png" for k in range(args.num_samples)}
        stale = [p for p in (out_dir / "images").glob("*.png") if p.name not in ours]
        if stale:
            raise UserError(f"{out_dir / 'images'} holds {len(stale)} PNG file(s) that this run would not replace, "
                            f"e.g. {stale[0].name} (FID would read them too); choose another --out-dir")
    C, S = cfg["channels"], cfg["image_size"]
    n, B = args.num_samples, min(args.batch_size, args.num_samples)
    noise_gen = torch.Generator().manual_seed(args.seed)  # x_T, drawn on the CPU: device-independent
    z_gen = torch.Generator(device).manual_seed(args.seed)  # the z of each step
    images, t0 = [], time.time()
    for start in range(0, n, B):  # whole batches only (one compiled shape); extras are dropped
        x_T = torch.randn((B, C, S, S), generator=noise_gen).to(device)
        images.append(to_uint8(run_sampler(diffusion, sampler_model, x_T, args, dtype, z_gen)).cpu())
        done = min(start + B, n)
        print(f"{done}/{n} images, {done / (time.time() - t0):.1f} images/s", flush=True)
    images = torch.cat(images)[:n]  # (N, C, H, W) uint8
    save_grid(images[:64].float() / 127.5 - 1, out_dir / "grid.png", nrow=8)
    if args.format == "png":  # one file per image: what pytorch-fid and clean-fid read
        from PIL import Image  # Pillow: installed with torchvision

        (out_dir / "images").mkdir(exist_ok=True)
        for k, img in enumerate(images.permute(0, 2, 3, 1).squeeze(3).numpy()):  # (H, W[, C])
            Image.fromarray(img).save(out_dir / "images" / f"{k:06d}.png")
        print(f"wrote {n} images to {out_dir / 'images'} and a grid to {out_dir / 'grid.png'}")
    else:  # one uint8 array (N, H, W, C), stored under the default key arr_0
        np.savez(out_dir / "samples.npz", images.permute(0, 2, 3, 1).numpy())
        print(f"wrote {out_dir / 'samples.npz'} ({n}, {S}, {S}, {C}) and {out_dir / 'grid.png'}")


# -----------------------------------------------------------------------------
# The forward-process picture  [Eq. 4]
# -----------------------------------------------------------------------------


def forward(args):
    """Real images noised by q(x_t | x_0) at t = T/10, 2T/10, ..., T, a row per image, one eps
    per image so that each row shows the same noise growing."""
    x_0 = load_dataset(args.dataset, args.data_dir, args.image_size, args.num_images).float() / 127.5 - 1
    diffusion = GaussianDiffusion(make_beta_schedule(args.schedule, args.timesteps))
    T, n = diffusion.num_timesteps, x_0.shape[0]
    steps = [max(0, T * k // 10 - 1) for k in range(1, 11)]  # code t: paper t = T/10, ..., T
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(args.seed))  # (n, C, H, W)
    cols = [x_0] + [diffusion.q_sample(x_0, torch.full((n,), t), noise) for t in steps]
    out_dir = Path(args.out_dir)
    prepare_out_dir(out_dir)
    save_grid(torch.stack(cols, dim=1).flatten(0, 1), out_dir / "forward_process.png", nrow=len(cols))
    print(f"wrote {out_dir / 'forward_process.png'}: {n} images, columns x_0 then t = "
          + ", ".join(str(t + 1) for t in steps))


# -----------------------------------------------------------------------------
# bench: training and sampling speed of one configuration
# -----------------------------------------------------------------------------


def kernel_family(name):
    """Which part of a training step a GPU kernel (or, on a CPU, an operator) belongs to."""
    name = name.lower()
    if name.startswith("triton") or "compiledfxgraph" in name:  # code that torch.compile generated
        return "fused by inductor"
    if any(k in name for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if "nchwtonhwc" in name or "nhwctonchw" in name:  # cuDNN's layout transposes: copies, not convolutions
        return "other"
    if any(k in name for k in ("conv", "gemm", "xmma", "cudnn", "cutlass", "aten::mm", "aten::addmm", "aten::bmm")):
        return "convolution/matmul"
    return "other"  # eager elementwise kernels, GroupNorm, the optimiser, copies


def bench(args):
    """Time --steps training steps (Alg. 1, everything included) and network evaluations as the
    sampler makes them, on random data, after --warmup-steps of each (which include compiling);
    with --profile N, then profile N more training steps."""
    device, dtype = setup_device(args)
    torch.manual_seed(args.seed)
    C, S, B = 3, args.image_size, args.batch_size
    net, model, ema, diffusion, optimizer, scheduler, scaler = build_training(args, C, device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    data = torch.randint(0, 256, (4 * B, C, S, S), dtype=torch.uint8, device=device)

    def timed(fn, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(n):
            fn(k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def train_fn(k):
        x_0 = get_batch(data, torch.arange(k % 4 * B, (k % 4 + 1) * B, device=device), True, memory_format)
        train_step(model, net, ema, diffusion, optimizer, scheduler, scaler, x_0, k, args, dtype)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"bench: {args.model}, {count_parameters(net):,} parameters, {S}x{S}, amp {dtype}, "
          f"compile {args.compile}, {where}, torch {torch.__version__}")
    print(f"{'':8} {'batch':>6} {'images/s':>10} {'ms/call':>9} {'warm-up s':>10}", flush=True)

    def report(name, batch, warm, seconds):  # each row as soon as it is measured
        print(f"{name:8} {batch:>6} {args.steps * batch / seconds:>10,.1f} "
              f"{1e3 * seconds / args.steps:>9.2f} {warm:>10.1f}", flush=True)

    warm = timed(train_fn, args.warmup_steps)
    report("train", B, warm, timed(train_fn, args.steps))
    train_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    sampler_model = maybe_compile(ema, args)  # as in sample
    x_t = torch.randn(args.sample_batch_size, C, S, S, device=device).contiguous(memory_format=memory_format)
    t = torch.randint(0, args.timesteps, (args.sample_batch_size,), device=device)

    def sample_fn(k):  # one network evaluation of a sampler step, as in p_sample
        with torch.inference_mode(), autocast(device, dtype):
            sampler_model(x_t, t)

    warm = timed(sample_fn, args.warmup_steps)
    report("sample", args.sample_batch_size, warm, timed(sample_fn, args.steps))
    if device.type == "cuda":
        peak = f"{train_peak / 2**30:.2f} GiB of GPU memory while training"
    else:
        import resource  # Unix only, and only needed here

        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"
    print(f"peak memory: {peak}; sample = one network evaluation per image (one sampler step)")
    if args.profile:  # where a step's time goes: the operators (and, on a GPU, kernels) that took longest
        on_gpu = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if on_gpu:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            seconds = timed(train_fn, args.profile)
        events = prof.key_averages()
        print(events.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total",
                           row_limit=25, max_name_column_width=70))
        # the verdict: the self time of each GPU kernel (on a CPU, each operator) by family, per step
        kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
        ms = dict.fromkeys(["convolution/matmul", "attention", "fused by inductor", "other"], 0.0)
        for e in (e for e in events if e.device_type == kind):
            # a kernel's time is self_device_time_total from torch 2.4 on, self_cuda_time_total before
            us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) if on_gpu else e.self_cpu_time_total
            ms[kernel_family(e.key)] += us / 1e3 / args.profile
        print(f"profiled {args.profile} training steps: {1e3 * seconds / args.profile:.2f} ms per step "
              f"(wall clock, profiler on), of which {'GPU' if on_gpu else 'CPU'} time: {sum(ms.values()):.2f} ms = "
              + ", ".join(f"{name} {v:.2f}" for name, v in ms.items()), flush=True)


# -----------------------------------------------------------------------------
# compare: the loss curves of several runs, the original project's model comparison
# -----------------------------------------------------------------------------


def compare(args):
    """Print the mean loss of each run over 8 equal stretches of steps, read from each log.csv:
    the loss curves of several runs side by side, as a table."""
    runs = {}
    for folder in map(Path, args.runs):
        try:
            with open(folder / "log.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            runs[folder.name] = (np.array([int(r["step"]) for r in rows]), np.array([float(r["loss"]) for r in rows]))
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{folder / 'log.csv'}: not a log written by train ({e})")
        if not rows:
            raise UserError(f"{folder / 'log.csv'} has no rows yet")
    last = min(int(steps[-1]) for steps, _ in runs.values())  # the steps every run has reached
    edges = [round(last * k / 8) for k in range(9)]
    print(f"{'steps':>13} " + " ".join(f"{name:>10}" for name in runs))
    for lo, hi in zip(edges, edges[1:]):
        means = [loss[(steps > lo) & (steps <= hi)].mean() for steps, loss in runs.values()]
        print(f"{lo:>6}-{hi:<6} " + " ".join(f"{m:>10.4f}" for m in means))


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError, i.e. one line and exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def int_list(text):
    """'1,2,2,2' -> [1, 2, 2, 2]; '' -> []. Every value must be a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [0]  # not integers: the same error below
    if min(values, default=1) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_parser():
    """The five commands and their flags; returns (parser, {command: subparser})."""
    net = Parser(add_help=False)
    g = net.add_argument_group("network")
    g.add_argument("--model", choices=MODELS, default="res_att",
                   help="conv, res or res_att (default: %(default)s; paper: res_att)")
    g.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    g.add_argument("--base-channels", type=int, default=128, help="channels at full resolution, a multiple of 32 (default: %(default)s)")
    g.add_argument("--channel-mult", type=int_list, default=[1, 2, 2, 2], help="channel multiplier per level, comma-separated (default: 1,2,2,2)")
    g.add_argument("--num-res-blocks", type=int, default=2, help="blocks per level going down (default: %(default)s)")
    g.add_argument("--attn-resolutions", type=int_list, default=[16], help="resolutions with self-attention, res_att only (default: 16)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in every block (default: %(default)s)")
    g.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T (default: %(default)s)")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="beta schedule (default: %(default)s; paper: linear 1e-4 to 0.02)")

    run = Parser(add_help=False)
    g = run.add_argument_group("runtime")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu (default: %(default)s)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto", help="mixed precision; auto: bf16 on CUDA, none elsewhere (default: %(default)s; paper: TPU bfloat16)")
    g.add_argument("--compile", nargs="?", const="auto", default=None, metavar="MODE",
                   choices=["auto", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the network: slow first step, faster after; auto = reduce-overhead "
                        "(CUDA graphs) when training on one GPU, default otherwise (default: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    sampling = Parser(add_help=False)
    g = sampling.add_argument_group("sampler")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ddpm: Algorithm 2, T steps; ddim: Song et al. (default: %(default)s; paper: ddpm)")
    g.add_argument("--sample-steps", type=int, default=100, help="DDIM steps (default: %(default)s)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: %(default)s)")

    data = Parser(add_help=False)
    g = data.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="cifar10", help="(default: %(default)s; paper: cifar10)")
    g.add_argument("--data-dir", default="data", help="dataset folder; for 'folder', any tree of .png/.jpg images (default: %(default)s)")

    parser = Parser(prog="ddpm.py", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020). "
                    "With no command, trains.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,forward,bench,compare}")
    commands = {}

    p = commands["train"] = sub.add_parser("train", parents=[net, run, data, sampling], allow_abbrev=False,
                                           help="train a model (Algorithm 1)", description="Train eps_theta with Algorithm 1.")
    g = p.add_argument_group("training")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips (default: flips for cifar10 and folder)")
    g.add_argument("--epochs", type=int, default=100, help="passes over the data (default: %(default)s; paper: 800k steps, ~2000 epochs)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps if sooner; 0: no limit (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch (default: %(default)s; paper: 128)")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: %(default)s; paper: 2e-4)")
    g.add_argument("--warmup", type=int, default=5000, help="linear LR warm-up steps (default: %(default)s; paper: 5000)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; inf: no clipping (default: %(default)s; paper: 1.0)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay, warmed up (default: %(default)s; paper: 0.9999)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="where ckpt.pt, log.csv and pictures go (default: runs/<model>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its ckpt.pt")
    g.add_argument("--ckpt-every", type=int, default=5000, help="also save every N steps; 0: at epoch ends only (default: %(default)s)")
    g.add_argument("--sample-every", type=int, default=10, help="a sample grid every N epochs; 0: never (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=100, help="a log.csv row every N steps (default: %(default)s)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (needs: pip install wandb)")

    p = commands["sample"] = sub.add_parser("sample", parents=[run, sampling], allow_abbrev=False,
                                            help="generate images from a checkpoint", description="Generate images from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="a ckpt.pt written by train")
    p.add_argument("--num-samples", type=int, default=64, help="(default: %(default)s; FID: 50000)")
    p.add_argument("--batch-size", type=int, default=500, help="images per sampler batch (default: %(default)s)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="(default: %(default)s; paper: ema)")
    p.add_argument("--format", choices=["png", "npz"], default="png", help="png: a grid and one file per image; npz: one uint8 (N, H, W, C) array (default: %(default)s)")
    p.add_argument("--out-dir", default=None, help="(default: a samples/ folder beside the checkpoint)")

    p = commands["forward"] = sub.add_parser("forward", parents=[data], allow_abbrev=False,
                                             help="picture of the forward (noising) process", description="Picture of q(x_t | x_0) on real images.")
    p.add_argument("--image-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--timesteps", type=int, default=1000, help="T (default: %(default)s)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="(default: %(default)s)")
    p.add_argument("--num-images", type=int, default=8, help="rows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out-dir", default="runs", help="writes forward_process.png there (default: %(default)s)")

    p = commands["compare"] = sub.add_parser("compare", allow_abbrev=False, help="compare the loss curves of runs",
                                             description="Mean loss per stretch of steps for each run, as a table.")
    p.add_argument("runs", nargs="+", help="run folders (each with the log.csv that train wrote)")

    p = commands["bench"] = sub.add_parser("bench", parents=[net, run], allow_abbrev=False,
                                           help="measure training and sampling speed", description="Training and sampling images/s on random data.")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default: %(default)s)")
    p.add_argument("--sample-batch-size", type=int, default=500, help="sampling batch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed calls of each (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed calls first, compiling included (default: %(default)s)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N training steps and print the slowest operators/kernels (default: %(default)s, off)")
    for name in ("lr", "grad_clip", "ema_decay", "warmup"):  # the training step reads these
        p.set_defaults(**{name: commands["train"].get_default(name)})
    return parser, commands


def parse_args(argv):
    """Parse a command line (train when no command is named); records which flags were typed."""
    argv = list(argv)
    parser, commands = build_parser()
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv.insert(0, "train")
    args = parser.parse_args(argv)
    # the flags typed on the command line (a resumed run may not contradict its checkpoint)
    args.explicit = {a.dest for a in commands[args.command]._actions
                     if any(tok.split("=")[0] in a.option_strings for tok in argv)}
    # the ranges argparse cannot check: (flags, the test each value must pass, what it must be)
    ranges = [
        (("batch_size", "sample_batch_size", "epochs", "image_size", "num_samples", "num_images", "steps",
          "log_every"), lambda v: v >= 1, "at least 1"),
        (("timesteps",), lambda v: v >= 2, "at least 2"),
        (("max_steps", "warmup", "ckpt_every", "sample_every", "eta", "warmup_steps", "profile"),
         lambda v: v >= 0, "0 or more"),
        (("lr", "grad_clip"), lambda v: v > 0, "more than 0"),  # --grad-clip inf: no clipping
        (("dropout", "ema_decay"), lambda v: 0 <= v < 1, "at least 0 and below 1"),
    ]
    for names, ok, must in ranges:
        for name in names:
            if hasattr(args, name) and not ok(getattr(args, name)):  # not ok: NaN fails every test
                raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {must}")
    return args


def main(argv=None):
    """Run a command; returns the exit status: 0, 2 for bad input (one line on stderr), 130 for Ctrl-C."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        {"train": train, "sample": sample, "forward": forward, "bench": bench, "compare": compare}[args.command](args)
    except UserError as e:
        print(f"ddpm.py: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:  # training keeps its last checkpoint: it was saved whole
        print("ddpm.py: error: out of GPU memory; use a smaller --batch-size "
              "(bench: and --sample-batch-size)", file=sys.stderr)
        return 2
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no Triton or no C compiler here
        reason = first_line(getattr(e, "inner_exception", e))  # what the compiler itself raised
        print(f"ddpm.py: error: --compile failed ({reason}); run without --compile, "
              "which computes the same", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: training has saved its checkpoint by now
        print("ddpm.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
