"""
ddpm.py: Denoising Diffusion Probabilistic Models in one file.

A faithful, readable PyTorch implementation of Ho, Jain & Abbeel, "Denoising Diffusion
Probabilistic Models" (arXiv:2006.11239, 2020), checked against the paper's official code.
Parts I-III are the method: read them with the paper open, or paste them alone into a notebook,
where they train and sample. After the banner that ends Part III come the extras (another
schedule, two fast samplers) and the engineering (progress lines, checkpoints, FID, signals, DDP,
the command line). README.md has the commands; the main one:
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
    5. Extras the paper does not have, after the banner: the cosine schedule (Nichol & Dhariwal
       2021), DDIM (Song et al. 2021), DPM-Solver++(2M) (Lu et al. 2022; the CPU's sampler), and
       classifier-free guidance (Ho & Salimans 2022; the network's optional label input).

Section map
    Part I   the diffusion process: linear_beta_schedule, extract, GaussianDiffusion
    Part II  the networks: the blocks, ResAttUNet (the paper's network), ResUNet, ConvUNet
    Part III training (Alg. 1: train_step, train_iteration, train_loop), sampling (Alg. 2)
    Extras   cosine_beta_schedule, ddim_sample_loop, dpm_solver_sample_loop, Guided
    Engineering: progress lines, data, checkpoints, FID, the commands, the command line
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import os
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


# --- The forward process q and one step of the reverse process p_theta  [Sec. 2-3, Eq. 1-15] -----
class GaussianDiffusion(nn.Module):
    """The fixed forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and the
    learned reverse process p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) [Eq. 1-2]. No
    learned parameters: the schedule as float32 buffers (computed in float64), which `.to(device)`
    moves. `model` is any callable model(x_t, t) -> eps_pred, t a (B,) LongTensor. Uses: extract."""

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
        ac, ac_prev = alphas_cumprod, alphas_cumprod_prev  # short names for the formulas below
        buffers = {  # each glossed with its symbol and the code that reads it
            "betas": betas,  # beta_t; p_sample (Eq. 11, and sigma_t^2 = beta_t)
            "alphas_cumprod": ac,  # alpha_bar_t; the fast samplers after the banner
            "sqrt_alphas_cumprod": ac.sqrt(),  # sqrt(alpha_bar_t); q_sample
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),  # sqrt(1 - alpha_bar_t); q_sample
            "sqrt_recip_alphas": alphas.rsqrt(),  # 1 / sqrt(alpha_t); p_sample (Eq. 11)
            "sqrt_recip_alphas_cumprod": ac.rsqrt(),  # sqrt(1 / alpha_bar_t); predict_x0_from_eps
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),  # sqrt(1 / alpha_bar_t - 1)
            # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t [Eq. 7], 0 at t = 1;
            # q_posterior, p_sample
            "posterior_variance": betas * (1.0 - ac_prev) / (1.0 - ac),
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

    def p_losses(self, model, x_0, t=None, noise=None, y=None):
        """L_simple [Eq. 14], Algorithm 1, lines 3-5: the mean squared error between the true
        noise and the network's prediction of it from x_t (and class labels y, if any: not in the
        paper, classifier-free guidance after the banner)."""
        B = x_0.shape[0]
        if t is None:
            # Alg. 1, line 3: t ~ Uniform({1, ..., T}), i.e. code t in {0..T-1}
            t = torch.randint(0, self.num_timesteps, (B,), device=self.betas.device)
        if noise is None:
            noise = torch.randn_like(x_0)  # Alg. 1, line 4: eps ~ N(0, I)
        # the argument of eps_theta in Alg. 1, line 5:
        # sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        x_t = self.q_sample(x_0, t, noise)
        eps_pred = model(x_t, t) if y is None else model(x_t, t, y)
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
        B, shape = x_t.shape[0], x_t.shape
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
        self.base_channels, temb_ch = base_channels, 4 * base_channels
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
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch, res = [base_channels], base_channels, image_size
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
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
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
        """x: (B, C, H, W) noisy images x_t, t: (B,) code steps, y: (B,) class labels or None
        -> eps_pred (B, C, H, W)."""
        temb = self.temb(timestep_embedding(t, self.base_channels))  # (B, 4 base)
        if y is not None:  # as the conditional DDPM and ADM networks do: added to the time's
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
    warm_up = lambda n: min(1.0, n / warmup) if warmup else 1.0  # noqa: E731
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


def train_step(model, diffusion, optimizer, scaler, x_0, grad_clip=1.0, amp=None, y=None):
    """Algorithm 1, lines 3-5 on the batch x_0, with the official code's gradient clipping. scaler:
    a torch.amp.GradScaler (a pass-through unless enabled, for float16); amp: the autocast dtype
    (None: float32). Returns (loss, grad_norm), tensors that nothing here waits for."""
    with torch.autocast(x_0.device.type, dtype=amp, enabled=amp is not None):
        loss = diffusion.p_losses(model, x_0, y=y)  # Alg. 1, lines 3-5: t, eps and L_simple
    scaler.scale(loss).backward()  # Alg. 1, line 5: the gradient of L_simple
    scaler.unscale_(optimizer)  # the true gradients, before measuring them (no-op unless fp16)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # global norm <= 1
    scaler.step(optimizer)  # Alg. 1, line 5: the gradient step (Adam)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@dataclasses.dataclass
class Training:
    """What Algorithm 1 updates from one step to the next, and the recipe it follows [App. B]."""

    net: nn.Module  # eps_theta: the weights that Adam updates
    ema: nn.Module  # their moving average: what samples are drawn from
    optimizer: torch.optim.Optimizer  # Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR  # the learning-rate warm-up
    scaler: torch.amp.GradScaler  # float16's loss scaling; a pass-through otherwise
    model: nn.Module  # what the step calls: net (after the banner: net compiled, or in DDP)
    batch_size: int = 128
    flip: bool = True  # random horizontal flips
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0  # of the data order
    amp: torch.dtype = None  # autocast's dtype; None: float32
    labels: object = None  # idx -> the batch's class labels y (after the banner); None: the paper


def make_training(net, lr=2e-4, warmup=5000, amp=None, **recipe):
    """A Training for net: an EMA copy of it, Adam with its warm-up, and a gradient scaler that
    is enabled for float16 only."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer, scheduler = make_optimizer(net, lr, warmup)
    device = next(net.parameters()).device.type
    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
    return Training(net, ema, optimizer, scheduler, scaler, net, amp=amp, **recipe)


def train_iteration(run, diffusion, data, step, rank=0, world=1):
    """One iteration of Algorithm 1 at training step `step` (from 0): the batch, the gradient step,
    the warm-up and the EMA. data: the uint8 training images (N, C, H, W). With world > 1 processes
    (after the banner), each takes its rank's share of the batch. Returns (loss, grad_norm)."""
    idx = batch_indices(len(data), run.batch_size, step, run.seed).tensor_split(world)[rank]
    x_0 = get_batch(data, idx, run.flip)  # Alg. 1, line 2
    y = run.labels(idx) if run.labels else None  # class labels, for guidance (not in the paper)
    loss, grad_norm = train_step(  # Alg. 1, lines 3-5
        run.model, diffusion, run.optimizer, run.scaler, x_0, run.grad_clip, run.amp, y
    )
    run.scheduler.step()
    ema_update(run.ema, run.net, step, run.ema_decay)
    return loss, grad_norm


def train_loop(net, diffusion, data, steps, lr=2e-4, warmup=5000, **recipe):
    """Algorithm 1 repeated: train net on data (uint8 images (N, C, H, W)) for `steps` steps, with
    the recipe of Training; returns the EMA copy of its weights, to sample from. The command line
    runs the same iterations, with its operations (checkpoints, logs) between them."""
    run = make_training(net, lr, warmup, **recipe)
    net.train()
    for step in range(steps):  # Alg. 1, line 1: repeat
        train_iteration(run, diffusion, data, step)  # Alg. 1, lines 2-5
    return run.ema  # until converged: 800k steps for the paper's CIFAR-10 result


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
        noise = torch.randn(shape, generator=generator, device=device) if t > 0 else None
        # Alg. 2, line 4
        x_t = diffusion.p_sample(model, x_t, t, noise, clip_denoised, variance)
    # Alg. 2, line 6: return x_0
    return x_t


# #############################################################################
#   The end of the method. Parts I-III above are a complete DDPM:
#       net = ResAttUNet(); diffusion = GaussianDiffusion(linear_beta_schedule(1000))
#       ema = train_loop(net, diffusion, data, steps=800_000)
#       x_0 = p_sample_loop(diffusion, ema, (64, 3, 32, 32))
#   Below: the extras (another schedule, two fast samplers), then the engineering.
# #############################################################################


# =============================================================================
# Extras: another schedule and two fast samplers  [not in the paper]
# =============================================================================
def cosine_beta_schedule(timesteps, s=0.008):
    """Nichol & Dhariwal (2021), Eq. 17: alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas clipped at 0.999. float64, shape (T,)."""
    # NOTE(paper): not in the paper; --schedule cosine, off by default
    frac = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # t/T for t = 0..T
    f = torch.cos((frac + s) / (1 + s) * math.pi / 2) ** 2  # f(t)
    alpha_bar = f / f[0]
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped to avoid a singular last step
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}  # --schedule


def ddim_timesteps(num_timesteps, steps):
    """The DDIM sub-sequence tau [Song et al., Sec. 4.2]: `steps` code steps
    floor(i * (T-1) / (steps-1)), i = steps-1..0, strictly decreasing (their spacing is at least 1)
    from T-1 (pure noise) to 0 (the last lands on x_0)."""
    T = num_timesteps
    if not 2 <= steps <= T:
        raise ValueError(f"need 2 <= steps <= T = {T}, got {steps}")
    return [i * (T - 1) // (steps - 1) for i in reversed(range(steps))]


@torch.inference_mode()
def ddim_sample_loop(
    diffusion, model, shape, steps, eta=0.0, clip_denoised=True, x_T=None, generator=None
):
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


def dpm_solver_timesteps(alphas_cumprod, steps):
    """`steps` code steps from T-1 down to 0, evenly spaced in the log-SNR lambda_t =
    log(sqrt(alpha_bar_t / (1 - alpha_bar_t))): each the step nearest its target, pushed apart where
    two coincide (near t = 0)."""
    T = len(alphas_cumprod)
    if not 2 <= steps <= T:
        raise ValueError(f"need 2 <= steps <= T = {T}, got {steps}")
    ac = alphas_cumprod.double().cpu()
    lam = 0.5 * (ac.log() - (1 - ac).log())  # lambda_t, decreasing in t
    targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # the nearest code steps
    for i in reversed(range(steps - 1)):  # distinct from below: ts[i] > ts[i + 1] >= 0
        ts[i] = max(ts[i], ts[i + 1] + 1)
    for i in range(steps):  # and from above: T-1 first
        ts[i] = min(ts[i], T - 1 if i == 0 else ts[i - 1] - 1)
    return ts


@torch.inference_mode()
def dpm_solver_sample_loop(
    diffusion, model, shape, steps, clip_denoised=True, x_T=None, generator=None
):
    """DPM-Solver++(2M) [Lu et al. 2022, arXiv:2211.01095, Alg. 2]: a second-order multistep
    solver of the probability-flow ODE in the log-SNR lambda, one network evaluation per step. With
    a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), h = lambda_next - lambda and x_0_pred predicted
    from eps [Eq. 15], each step is
        x_next = (s_next / s) x - a_next (exp(-h) - 1) D,
        D = x_0_pred + (h / (2 h_prev)) (x_0_pred - x_0_pred_prev)    (D = x_0_pred at first),
    and the last lands on its x_0_pred, as DDIM's does. D = x_0_pred throughout would be DDIM.
    Returns x_0."""
    # NOTE(paper): not in the paper (Lu et al. 2022); --sampler dpm++
    check_eval(model)
    device = diffusion.betas.device
    ts = dpm_solver_timesteps(diffusion.alphas_cumprod, steps)
    ac = diffusion.alphas_cumprod.double().cpu()  # the coefficients as Python floats, read once
    a, s = ac.sqrt(), (1 - ac).sqrt()  # alpha_t and sigma_t of the paper
    lam = (a / s).log()  # lambda_t
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
    x_0_prev = h_prev = None
    for i, t in enumerate(ts):
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)  # (B,)
        x_0_pred = diffusion.predict_x0_from_eps(x, t_batch, model(x, t_batch))  # [Eq. 15]
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)  # NOTE(paper): as in p_sample
        if i == len(ts) - 1:
            return x_0_pred
        nxt = ts[i + 1]
        h = (lam[nxt] - lam[t]).item()
        D = x_0_pred if x_0_prev is None else x_0_pred + h / (2 * h_prev) * (x_0_pred - x_0_prev)
        x = (s[nxt] / s[t]).item() * x - a[nxt].item() * math.expm1(-h) * D
        x_0_prev, h_prev = x_0_pred, h


# --- Classifier-free guidance  [Ho & Salimans 2022, arXiv:2207.12598] -------------------------
# NOTE(paper): not in the paper; --class-cond trains on the labels, --guidance W samples with them
def label_dropout(y, num_classes, drop):
    """idx -> y[idx], each replaced by "no label" (num_classes) with probability drop, so that one
    network learns eps(x_t, t, y) and eps(x_t, t) [Ho & Salimans, Alg. 1]."""

    def labels(idx):
        y_batch = y[idx.to(y.device)]  # (B,)
        dropped = torch.rand(y_batch.shape, device=y.device) < drop  # (B,)
        return torch.where(dropped, num_classes, y_batch)

    return labels


class Guided:
    """A class-conditional network as the samplers call it, model(x_t, t), with classifier-free
    guidance of weight w toward the classes y, from one batched evaluation [Ho & Salimans, Eq. 6]:
        eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t, no label)."""

    def __init__(self, model, y, w, num_classes):
        self.model, self.w, self.training = model, w, model.training
        self.y = torch.cat([y, torch.full_like(y, num_classes)])  # (2B,): y, then "no label"

    def __call__(self, x_t, t):
        if self.w == 0:  # the conditional model alone: half the work
            return self.model(x_t, t, self.y[: len(x_t)])
        eps = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), self.y)  # (2B, C, H, W)
        eps_y, eps_none = eps.chunk(2)  # 2 x (B, C, H, W)
        return (1 + self.w) * eps_y - self.w * eps_none


# =============================================================================
# Engineering: progress lines, data, devices and compile, checkpoints, FID, the commands, the CLI
# =============================================================================
class UserError(Exception):
    """A mistake in the command line or its files: main() prints it on one line and exits 2."""


def first_line(e):
    """An exception's message cut to its first line (its type's name when it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


# --- Progress lines: no phase that takes more than a few seconds is silent ---------------------
class Progress:
    """A phase's status line (what, how far, images/s, ETA), updated in place in a terminal."""

    def __init__(self, what, total, images_per_tick=1.0, where=None):
        self.what, self.total, self.per = what, total, images_per_tick
        self.where = where or (lambda k: f"{k}/{total}")
        self.done, self.printed, self.tty = 0, False, sys.stdout.isatty()
        self.start = self.shown = time.time()

    def tick(self):
        self.done += 1
        now, finished = time.time(), self.done >= self.total
        if now - self.shown < (0.5 if self.tty else 5.0) and not (finished and self.printed):
            return
        speed = self.done * self.per / max(now - self.start, 1e-9)  # images/s
        left = now - self.start if finished else (self.total - self.done) * self.per / speed
        when = f"{left:.0f} s" if left < 90 else f"{left / 60:.1f} min"
        line = f"{self.what}: {self.where(self.done)} | {speed:,.1f} images/s | "
        line += f"{'took' if finished else 'ETA'} {when}"
        end = "\n" if finished or not self.tty else ""
        print(f"\r{line}\x1b[K" if self.tty else line, end=end, flush=True)
        self.shown, self.printed = now, True


class Watched:
    """The network as a sampler calls it: ticks progress; keeps x_t at the calls in keep."""

    def __init__(self, model, progress, keep=()):
        self.model, self.progress, self.keep = model, progress, list(keep)
        self.kept, self.calls = [], 0
        self.training = model.training  # what check_eval reads

    def __call__(self, x_t, t):
        self.kept += [x_t] * self.keep.count(self.calls)
        self.calls += 1
        self.progress.tick()
        return self.model(x_t, t)


# --- Data: the whole training set decoded once into one uint8 tensor on the device  [Sec. 4] ---
TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def evenly_spaced(n, k=None):
    """k indices spread evenly over range(n); all of them when k is None or at least n."""
    return torch.linspace(0, n - 1, min(k or n, n)).round().long()


def load_dataset(name, data_dir, image_size, max_images=None):
    """The training set as one uint8 tensor (N, C, H, W), H = W = image_size. cifar10, mnist and
    fashion_mnist come from torchvision (downloaded on first use), the 28x28 ones padded to 32x32;
    "folder" reads the images under data_dir. max_images: that many, spread over the set."""
    if name == "folder":
        return load_image_folder(Path(data_dir), image_size, max_images)
    ds = torchvision_dataset(name, data_dir)
    x = torch.as_tensor(np.asarray(ds.data))  # CIFAR-10: (N, 32, 32, 3); MNIST: (N, 28, 28)
    x = x[evenly_spaced(len(x), max_images)]
    if x.ndim == 4:
        x = x.permute(0, 3, 1, 2)  # (N, 3, 32, 32)
    else:
        x = F.pad(x[:, None], (2, 2, 2, 2))  # (N, 1, 32, 32): 2 black pixels on every side
    if x.shape[-1] != image_size:
        x = TF.resize(x, [image_size, image_size], antialias=True)  # (N, C, H, W)
    return x.contiguous()


def torchvision_dataset(name, data_dir):
    """A torchvision training set, downloaded into data_dir on first use."""
    try:
        dataset = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
        return dataset(data_dir, train=True, download=True)
    except Exception as e:  # no internet, a proxy, a full disk: all end the same way
        fix = f"put torchvision's {name} files there, or use --dataset folder --data-dir DIR"
        raise UserError(f"could not get {name} into --data-dir {data_dir} ({first_line(e)}); {fix}")


def image_files(root, max_images=None, flag="--data-dir"):
    """The .png/.jpg files under root, in a fixed order; max_images: that many, spread over them."""
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UserError(f"{flag} {root} holds no .png/.jpg/.jpeg images")
    return [files[i] for i in evenly_spaced(len(files), max_images)]


def load_labels(name, data_dir, max_images=None):
    """(y, num_classes): the class of each image of load_dataset (folder: its subfolder)."""
    if name != "folder":
        ds = torchvision_dataset(name, data_dir)
        y = torch.as_tensor(ds.targets)
        return y[evenly_spaced(len(y), max_images)], len(ds.classes)
    root = Path(data_dir)
    folders = [f.relative_to(root).parts[:-1][:1] for f in image_files(root, max_images)]
    if () in folders:
        raise UserError(f"--class-cond: --data-dir {root} has images outside class subfolders")
    classes = sorted(set(folders))
    if len(classes) < 2:
        raise UserError(f"--class-cond needs two or more class subfolders in --data-dir {root}")
    return torch.tensor([classes.index(f) for f in folders]), len(classes)


def load_image_folder(root, image_size, max_images=None):
    """Every .png/.jpg under root, resized and centre-cropped: (N, C, H, W), grey or RGB."""
    files = image_files(root, max_images)
    from PIL import Image  # Pillow: installed with torchvision

    def read(path, mode=None):
        try:
            with Image.open(path) as im:
                mode = mode or ("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
                x = torch.from_numpy(np.array(im.convert(mode)))  # (h, w) or (h, w, 3) uint8
        except OSError as e:
            raise UserError(f"cannot decode image {path}: {e}")
        x = x.reshape(*x.shape[:2], -1).permute(2, 0, 1)  # (C, h, w)
        x = TF.resize(x, image_size, antialias=True)  # the shorter side becomes image_size
        return TF.center_crop(x, image_size)  # (C, image_size, image_size)

    mode = "L" if read(files[0]).shape[0] == 1 else "RGB"  # the first image decides the channels
    progress, images = Progress(f"decoding {root}", len(files)), []
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        for x in pool.map(lambda p: read(p, mode), files):
            images.append(x)
            progress.tick()
    return torch.stack(images)  # (N, C, H, W)


# --- The network on its device, and torch.compile ---------------------------------------------
def build_model(cfg):
    """The network a config describes, its size checked first on the meta device."""
    names = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")
    kwargs = {k: cfg[k] for k in (*names, "image_size")}
    kwargs.update(in_channels=cfg["channels"], num_classes=cfg.get("num_classes", 0))
    flags = "--image-size, --base-channels, --channel-mult or --num-res-blocks"
    try:
        with torch.device("meta"):
            size = count_parameters(MODELS[cfg["model"]](**kwargs))
    except ValueError as e:
        raise UserError(f"{e} (flags {flags})")
    if size > 2**32:  # 16 GiB of float32 weights, and three times that with Adam's state
        raise UserError(f"that network would have {size:,} parameters, too many: lower {flags}")
    return MODELS[cfg["model"]](**kwargs)


def setup_device(args):
    """Resolve --device and --amp into a torch.device and an autocast dtype (None: float32)."""
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        name = "mps" if name == "cpu" and torch.backends.mps.is_available() else name
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no Apple GPU support; use --device cpu")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per torchrun process
        torch.cuda.set_device(name)
        torch.backends.cudnn.benchmark = True  # shapes never change: cuDNN picks the fastest conv
        torch.set_float32_matmul_precision("high")  # float32 matmuls may use TF32 tensor cores
    device = torch.device(name)
    # NOTE(paper): bf16 autocast on CUDA by default (float32 master weights); --amp none: float32
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs --device cuda; use --amp bf16 or --amp none")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def prepare_network(net, device):
    """A network on its device; on CUDA channels_last (NHWC), as tensor cores want."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def maybe_compile(module, args, cuda_graphs=False):
    """torch.compile in --compile's mode (None: off); auto adds CUDA graphs where they may run."""
    if not args.compile:
        return module
    auto = "reduce-overhead" if cuda_graphs else "default"  # graphs replay a step's many kernels
    return torch.compile(module, mode=auto if args.compile == "auto" else args.compile)


# --- Checkpoints, samplers and pictures -------------------------------------------------------
CKPT_FORMAT = "ddpm.py checkpoint 2"  # 2: the network's levels nested, every rank's random state


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
    """Load a checkpoint with weights_only=True: tensors and plain values only, never code. mmap:
    its tensors are read only when used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (check --ckpt / --out-dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"cannot load {path}: truncated, or not from ddpm.py ({first_line(e)})")
    if isinstance(ckpt, dict) and ckpt.get("format") == "ddpm.py checkpoint 1":
        fix = "sample or resume it with the ddpm.py that wrote it (the README says which)"
        raise UserError(f"{path} is a format-1 checkpoint, whose layers had other names; {fix}")
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


def save_grid(x, path, nrow):
    """Save images in [-1, 1] as one PNG grid with nrow images per row."""
    save_image((x.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


def sampler_plan(args, num_timesteps, device):
    """(sampler, network evaluations); auto: Algorithm 2 on a GPU, DPM-Solver++ elsewhere."""
    name = args.sampler if args.sampler != "auto" else "ddpm" if device.type == "cuda" else "dpm++"
    fast = args.sample_steps or {"ddim": 100, "dpm++": 20}.get(name)  # their default steps
    return name, num_timesteps if name == "ddpm" else fast


def sampling_progress(what, args, num_timesteps, device, batch, batches=1):
    """A Progress over every network evaluation of `batches` sampler runs of `batch` images."""
    name, K = sampler_plan(args, num_timesteps, device)
    where = lambda k: f"batch {(k - 1) // K + 1}/{batches}, step {(k - 1) % K + 1}/{K}"  # noqa: E731
    return Progress(f"{what} ({name}, {K} steps)", batches * K, batch / K, where)


def sampler_name(args, num_timesteps, device):
    """The sampler in words, as fid.csv and fid.json record it: e.g. "ddim 100 steps eta 1"."""
    name, steps = sampler_plan(args, num_timesteps, device)
    return f"{name} {steps} steps" + {"ddim": f" eta {args.eta:g}"}.get(name, "")


def run_sampler(diffusion, model, x_T, args, dtype, generator, progress=None, keep=()):
    """Sample from x_T with --sampler, the network under autocast(dtype); progress ticks once per
    network evaluation; keep (evaluation numbers): also return the x_t they saw, (K, B, C, H, W)."""
    name, steps = sampler_plan(args, diffusion.num_timesteps, x_T.device)
    T, shape = diffusion.num_timesteps, x_T.shape
    progress = progress or sampling_progress("sampling", args, T, x_T.device, len(x_T))
    net = Watched(model, progress, keep)
    with torch.autocast(x_T.device.type, dtype=dtype, enabled=dtype is not None):
        if name == "ddpm":
            x_0 = p_sample_loop(diffusion, net, shape, True, args.variance, x_T, generator)
        elif name == "ddim":
            x_0 = ddim_sample_loop(diffusion, net, shape, steps, args.eta, True, x_T, generator)
        else:
            x_0 = dpm_solver_sample_loop(diffusion, net, shape, steps, x_T=x_T)
    return (x_0, torch.stack(net.kept)) if keep else x_0


def save_samples_and_trajectory(diffusion, model, x_T, args, dtype, out_dir, rows=range(8)):
    """The sample grid from a fixed x_T, and the progressive-generation picture: a row for each
    image in rows, x_t at 9 evenly spaced sampler steps from pure noise, then x_0."""
    T, device = diffusion.num_timesteps, x_T.device
    K = sampler_plan(args, T, device)[1]
    progress = sampling_progress("final pictures", args, T, device, len(x_T))
    generator = torch.Generator(device).manual_seed(args.seed)  # the same z every time
    keep = [i * K // 9 for i in range(9)]
    x_0, xs = run_sampler(diffusion, model, x_T, args, dtype, generator, progress, keep)
    save_grid(x_0, out_dir / "samples.png", nrow=8)
    rows = torch.cat([xs[:, list(rows)], x_0[None, list(rows)]]).transpose(0, 1)  # (8, 10, C, H, W)
    save_grid(rows.flatten(0, 1), out_dir / "reverse_process.png", nrow=rows.shape[1])
    return out_dir / "samples.png"


# --- FID  [Heusel et al. 2017]: Inception features of samples against the training set's --------
FID_NETWORK = "pytorch-fid's InceptionV3 (TF FID weights): pool3, 2048 features; it resizes to 299"
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # where pytorch-fid looks for its weights


def inception(device):
    """The network papers report FID with, from pytorch-fid (an optional extra): images (B, 3, H, W)
    in [0, 1] -> pool3 features (B, 2048). It resizes to 299x299 and rescales them itself."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        raise UserError("FID needs the pytorch-fid package: pip install pytorch-fid")
    try:
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
    except OSError as e:  # it downloads its weights on first use
        where = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
        fix = f"put {FID_WEIGHTS} (pytorch-fid's GitHub releases) at {where}"
        raise UserError(f"pytorch-fid could not get its Inception weights ({first_line(e)}); {fix}")
    return lambda x: net(x)[0].flatten(1)


@torch.no_grad()
def feature_statistics(features, images, device, what):
    """(mu, sigma): the mean and covariance, in float64, of the features of uint8 images (N, C, H,
    W), which reach the network as a PNG file reaches pytorch-fid: RGB floats in [0, 1]."""
    progress, batches = Progress(f"features of {what}", math.ceil(len(images) / 250), 250), []
    for batch in images.split(250):
        x = batch.to(device).float().div(255).expand(-1, 3, -1, -1)  # grey: 3 equal channels
        batches.append(features(x).double().cpu())
        progress.tick()
    f = torch.cat(batches)  # (N, D)
    return f.mean(0), f.T.cov()  # cov: unbiased, as numpy's


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): FID, from two Gaussians.
    The trace of the square root is the sum of the square roots of sigma1 sigma2's eigenvalues."""
    root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root)


def reference_statistics(args, size, features, device):
    """(mu, sigma, where from): --ref-stats, or those of the training set at size x size, computed
    once and cached beside it in --data-dir (the paper's reference: all 50,000 CIFAR-10 images)."""
    path = Path(args.ref_stats or Path(args.data_dir) / f"fid_stats_{args.dataset}_{size}px.npz")
    if args.ref_stats or path.is_file():
        try:
            with np.load(path) as f:
                mu, sigma, saved = f["mu"], f["sigma"], int(f.get("image_size", size))
                n = f"{int(f['images']):,} images' statistics" if "images" in f else "statistics"
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"--ref-stats {path}: not an npz of mu and sigma ({first_line(e)})")
        if saved != size:
            raise UserError(f"{path} holds statistics of {saved}x{saved} images; these are {size}")
        return torch.from_numpy(mu).double(), torch.from_numpy(sigma).double(), f"{n} in {path}"
    images = load_dataset(args.dataset, args.data_dir, size)
    mu, sigma = feature_statistics(features, images, device, f"the {args.dataset} training set")
    with contextlib.suppress(OSError):  # whole or not at all; a read-only --data-dir: not cached
        stats = dict(mu=mu.numpy(), sigma=sigma.numpy(), image_size=size, images=len(images))
        np.savez(tmp := path.with_suffix(".tmp.npz"), **stats)
        os.replace(tmp, path)
    return mu, sigma, f"{len(images):,} {args.dataset} training images, cached in {path}"


# --- train: Algorithm 1 with checkpoints, resume, logs, signals, NaN guards and DDP around it ---
def build_training(args, channels, device, amp=None, world=1, flip=True):
    """(run, diffusion): Part III's Training of the flags' network, DDP and compile."""
    net = prepare_network(build_model({**vars(args), "channels": channels}), device)
    recipe = dict(grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed, flip=flip)
    run = make_training(net, args.lr, args.warmup, amp, batch_size=args.batch_size, **recipe)
    if world > 1:  # gradients averaged over the processes during backward
        ids = [device.index] if device.type == "cuda" else None
        run.model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    cuda_graphs = device.type == "cuda" and world == 1  # DDP's hooks rule CUDA graphs out
    run.model = maybe_compile(run.model, args, cuda_graphs)
    diffusion = GaussianDiffusion(SCHEDULES[args.schedule](args.timesteps)).to(device)
    return run, diffusion


RESUME_MAY_CHANGE = {  # the flags a --resume may change; the others come from the checkpoint
    *"epochs max_steps data_dir device amp compile wandb ckpt_every ckpt_minutes".split(),
    *"sample_every log_every sampler sample_steps eta variance guidance".split(),
    *"fid_every fid_samples ref_stats".split(),
}


def resume_config(args, ckpt):
    """Fill the flags not typed from the checkpoint; refuse a typed one that contradicts it."""
    for key, saved in ckpt["config"].items():
        if key in ("resume", "out_dir") or not hasattr(args, key):
            continue
        if key not in args.explicit:
            setattr(args, key, saved)
        elif key not in RESUME_MAY_CHANGE and getattr(args, key) != saved:
            flag = f"--{key.replace('_', '-')} {getattr(args, key)}"
            fix = "drop it, or use another --out-dir"
            raise UserError(f"--resume: {flag} contradicts the checkpoint's {saved}; {fix}")


def open_run(args, out_dir, world, rank):
    """Check the flags against the folder before any work. Returns the checkpoint to resume (None
    for a new run), whose configuration then fills the flags not typed, and wandb (None if off)."""
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt:
        resume_config(args, ckpt)
    elif ckpt_path.exists():
        raise UserError(f"{ckpt_path} exists: add --resume to continue it, or another --out-dir")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must divide among the {world} processes")
    if args.sample_steps and not 2 <= args.sample_steps <= args.timesteps:
        raise UserError(f"--sample-steps must be between 2 and --timesteps {args.timesteps}")
    if rank == 0 and args.wandb:
        try:
            import wandb  # optional extra, imported only when asked for
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb")
    if rank == 0:
        prepare_out_dir(out_dir)
    return ckpt, wandb if rank == 0 and args.wandb else None


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM only note themselves in the list it yields; an ignored SIGINT stays so."""
    requested, previous = [], {}
    if threading.current_thread() is threading.main_thread():  # where signals are delivered
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, lambda signum, frame: requested.append(signum))
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def reopen_csv(path, columns, step, resumed):
    """A CSV file opened to write: its columns and, when resumed, its old rows up to step."""
    rows = [columns]
    if resumed and path.exists():
        with open(path, newline="") as f:
            rows += [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= step]
    file = open(path, "w", newline="")
    csv.writer(file).writerows(rows)
    return file


class Run:
    """A training run between two steps: its state, its files, clocks and processes."""

    def __init__(self, args, data, device, amp, out_dir, world, rank, wandb=None, labels=None):
        self.args, self.device, self.amp, self.world, self.rank = args, device, amp, world, rank
        self.wandb, self.data_shape = wandb, tuple(data.shape)
        self.ckpt_path, self.out_dir = out_dir / "ckpt.pt", out_dir
        N, C, H, W = data.shape
        self.steps_per_epoch = N // args.batch_size  # NOTE(paper): full batches only
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {args.batch_size} is more than the {N} images there are")
        self.total_steps = min(args.epochs * self.steps_per_epoch, args.max_steps or math.inf)
        flip = args.dataset in ("cifar10", "folder") and not args.no_flip  # natural images only
        self.training, self.diffusion = build_training(args, C, device, amp, world, flip)
        K = args.num_classes  # class-conditional: one row of 8 per class in every grid
        self.training.labels = label_dropout(labels.to(device), K, args.cond_drop) if K else None
        self.grid_y = torch.arange(8 * K, device=device) // 8 if K else None
        self.config = {k: v for k, v in vars(args).items() if k not in ("explicit", "command")}
        self.config.update(channels=C, out_dir=str(out_dir))
        self.fid = None  # --fid-every: the network and the reference now, so errors come first
        if args.fid_every and rank == 0:
            features = inception(device)
            self.fid = (features, *reference_statistics(args, H, features, device)[:2])
            auto = dict(sampler="ddim", eta=1.0, sample_steps=min(100, args.timesteps))  # measured
            more = dict(auto if args.sampler == "auto" else {}, batch_size=500, label=None)
            self.fid_args = argparse.Namespace(**{**vars(args), **more})
        self.step = self.saved_step = self.speed_step = self.logged_step = 0
        self.elapsed_before, self.started = 0.0, time.time()
        self.saved_at = self.logged_at = self.speed_from = self.started
        self.loss_sum = torch.zeros((), device=device)  # summed between log rows, read there only
        self.bad_step = torch.full((), -1, device=device)  # the first step with a non-finite loss
        # a fixed x_T for every grid, so that grids are comparable
        generator = torch.Generator().manual_seed(args.seed)
        self.grid_x_T = torch.randn((8 * K or 64, C, H, W), generator=generator).to(device)
        # the processes agree over Gloo, on the CPU, so that an agreement never waits for a GPU
        gloo = world > 1 and device.type == "cuda"
        self.control = dist.new_group(backend="gloo") if gloo else None

    def restore(self, ckpt):
        """Continue from a checkpoint (or, new, seed each process's random streams)."""
        torch.manual_seed(self.args.seed + self.rank)  # a different t, eps, flip, dropout per rank
        if not ckpt:
            return
        for key, part in self.parts().items():
            if ckpt[key]:  # an empty scaler state (saved without fp16): fp16 starts a fresh scale
                part.load_state_dict(ckpt[key])
        self.step = self.saved_step = self.speed_step = self.logged_step = ckpt["step"]
        self.elapsed_before, rng = ckpt["elapsed"], ckpt["rng"]
        if len(rng["torch"]) == self.world:  # each rank continues its own random streams exactly
            torch.set_rng_state(rng["torch"][self.rank])
            if self.device.type == "cuda" and rng["cuda"][self.rank] is not None:
                torch.cuda.set_rng_state(rng["cuda"][self.rank], self.device)
        else:
            torch.manual_seed(self.args.seed + self.rank + self.world * self.step)
            if self.rank == 0:
                note = f"saved by {len(rng['torch'])} processes, resumed by {self.world}"
                print(f"note: {note}: new random streams")

    def open_log(self, resumed):
        """log.csv, with the rows up to the checkpoint's step; and the first lines."""
        args, step, total = self.args, self.step, self.total_steps
        columns = ["step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"]
        self.log_file = reopen_csv(self.out_dir / "log.csv", columns, step, resumed)
        columns = ["step", "images_seen", "fid", "samples", "sampler", "seconds"]
        self.fid_file = self.fid and reopen_csv(self.out_dir / "fid.csv", columns, step, resumed)
        if self.wandb:
            where = dict(dir=str(self.out_dir), resume="allow")  # a resumed run continues its page
            self.wandb.init(project="ddpm.py", config=self.config, **where)
        what = f"{args.model} ({count_parameters(self.training.net):,} parameters)"
        size = "x".join(map(str, self.data_shape))  # N x C x H x W
        how = f"{self.device}, amp {self.amp}, compile {args.compile}"
        print(f"training {what} on {args.dataset} {size}, {how}; step {step}/{total}")
        if args.warmup > total / 2:
            late = "never reaches" if args.warmup > total else "is late to reach"
            tip = f"a short run trains better with a short one, e.g. --warmup {max(1, total // 10)}"
            note = f"the learning-rate warm-up (--warmup {args.warmup}) is more than half of"
            print(f"note: {note} this run's {total} steps, so lr {late} --lr {args.lr:g}; {tip}")

    def agree(self, *flags):
        """Each flag as its maximum over the processes: all take the same decision."""
        if self.world == 1:
            return flags
        flags = torch.tensor([int(f) for f in flags])
        dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.control)
        return flags.tolist()

    def after_step(self, loss, grad_norm):
        """Count the step, its loss, and whether it went bad, without waiting for the GPU."""
        self.step += 1
        self.loss_sum += loss
        fp16 = self.training.scaler.is_enabled()  # whose scaler skips a non-finite gradient
        finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | fp16)
        self.bad_step = torch.where(finite | (self.bad_step >= 0), self.bad_step, self.step)

    def decide(self, stop_requested, log_row):
        """(stop, save), the same on every process: they agree every 10 steps and at log rows.
        A bad step seen at a log row saves, that is, refuses to save and says why."""
        args, step = self.args, self.step
        every = args.ckpt_every and step % args.ckpt_every == 0
        scheduled = bool(every) or step == self.total_steps
        if self.world > 1 and not log_row and step % 10:
            return False, scheduled
        minutes = (time.time() - self.saved_at) / 60
        due = self.rank == 0 and args.ckpt_minutes and minutes >= args.ckpt_minutes
        bad = log_row and int(self.bad_step) >= 0  # reads the GPU, as log rows do anyway
        stop, due, bad = self.agree(bool(stop_requested), due, bad)
        return stop, bool(due or bad or scheduled)

    def due(self, every):
        """At the end of every every-th epoch (never if every is 0): --sample-every, --fid-every."""
        epoch, into_epoch = divmod(self.step, self.steps_per_epoch)
        return every and not into_epoch and epoch % every == 0

    def checkpoint(self):
        """Save on rank 0, once all ranks checked that no loss or gradient went non-finite."""
        bad = self.agree(int(self.bad_step))[0]  # reads the GPU, as only log rows do besides
        if bad >= 0:
            what = f"the loss or its gradient became NaN or infinite at step {bad}; stopped"
            kept = f"{self.ckpt_path} still holds step {self.saved_step}"
            raise UserError(f"{what} without saving, so {kept} (try --amp none or a lower --lr)")
        cuda = self.device.type == "cuda"
        states = [torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None]
        ranks = [states] * self.world
        if self.world > 1:  # every rank's random states: a resumed run is the uninterrupted one
            dist.all_gather_object(ranks, states, group=self.control)
        error = ""  # rank 0's message: an exception kept here would keep this frame (and DDP) alive
        try:
            if self.rank == 0:
                save_checkpoint(self.ckpt_path, self.state(ranks))
        except UserError as e:  # a full disk: every rank stops, rank 0 says why
            error = str(e)
        if self.agree(bool(error))[0]:
            raise UserError(error or "rank 0 could not write the checkpoint")
        self.saved_step, self.saved_at = self.step, time.time()

    def parts(self):
        """What a checkpoint saves the state_dict() of, by its key there."""
        run, keys = self.training, ("model", "ema", "optimizer", "scheduler", "scaler")
        return dict(zip(keys, (run.net, run.ema, run.optimizer, run.scheduler, run.scaler)))

    def state(self, ranks):
        """What ckpt.pt holds: tensors and plain values only (it loads with weights_only=True)."""
        elapsed = self.elapsed_before + time.time() - self.started
        state = dict(format=CKPT_FORMAT, config=self.config, step=self.step, elapsed=elapsed)
        state.update({key: part.state_dict() for key, part in self.parts().items()})
        rng = {"torch": [r[0] for r in ranks], "cuda": [r[1] for r in ranks]}
        return dict(state, epoch=self.step // self.steps_per_epoch, rng=rng)

    def write_log(self, grad_norm):
        """A log.csv row and a console line, from tensors read here only."""
        now, step, wandb = time.time(), self.step, self.wandb
        loss = self.loss_sum.item() / max(step - self.logged_step, 1)
        self.loss_sum.zero_()
        speed = (step - self.speed_step) * self.args.batch_size / max(now - self.speed_from, 1e-9)
        lr = self.training.scheduler.get_last_lr()[0]
        elapsed = self.elapsed_before + now - self.started
        row = [step, step // self.steps_per_epoch, f"{loss:.6f}", f"{lr:.3e}"]
        row += [f"{float(grad_norm):.4f}", f"{speed:.1f}", f"{elapsed:.1f}"]
        csv.writer(self.log_file).writerow(row)
        self.log_file.flush()
        self.logged_step, self.logged_at, self.speed_step, self.speed_from = step, now, step, now
        if wandb:
            metrics = dict(loss=loss, lr=lr, grad_norm=float(row[4]), images_per_s=speed)
            wandb.log(metrics, step=step)
        eta = (self.total_steps - step) * self.args.batch_size / max(speed, 1e-9) / 60
        line = f"step {step}/{self.total_steps} | epoch {row[1]} | loss {loss:.4f} | "
        print(line + f"{speed:,.0f} img/s | lr {row[3]} | ETA {eta:.1f} min", flush=True)

    def save_grid(self):
        """A grid of samples from the EMA weights and the fixed x_T, kept out of images/s."""
        epoch = self.step // self.steps_per_epoch
        (self.out_dir / "grids").mkdir(exist_ok=True)
        path = self.out_dir / "grids" / f"epoch_{epoch:04d}.png"
        T, x_T, model = self.diffusion.num_timesteps, self.grid_x_T, self.guided(self.training.ema)
        progress = sampling_progress(f"grid for epoch {epoch}", self.args, T, self.device, len(x_T))
        generator = torch.Generator(self.device).manual_seed(self.args.seed)
        x_0 = run_sampler(self.diffusion, model, x_T, self.args, self.amp, generator, progress)
        save_grid(x_0, path, nrow=8)
        if self.wandb:
            self.wandb.log({"samples": self.wandb.Image(str(path))}, step=self.step)
        self.speed_step, self.speed_from = self.step, time.time()

    def measure_fid(self):
        """FID of --fid-samples images from the EMA weights: a fid.csv row, a line, a W&B point;
        its time is kept out of images/s."""
        args, t0, (features, mu, sigma) = self.fid_args, time.time(), self.fid
        n, device, seen = args.fid_samples, self.device, self.step * self.args.batch_size
        images = generate(self.training.ema, self.diffusion, self.config, args, device, self.amp, n)
        fid = frechet_distance(*feature_statistics(features, images, device, "samples"), mu, sigma)
        sampler = sampler_name(args, self.diffusion.num_timesteps, device)
        row = [self.step, seen, f"{fid:.4f}", n, sampler, f"{time.time() - t0:.1f}"]
        csv.writer(self.fid_file).writerow(row)
        self.fid_file.flush()
        what = f"{n:,} samples, {sampler}, {row[-1]} s"
        print(f"FID {fid:.2f} at step {self.step} ({seen:,} images seen; {what})", flush=True)
        if self.wandb:
            self.wandb.log({"fid": fid}, step=self.step)
        self.speed_step, self.speed_from = self.step, time.time()

    def guided(self, model):
        """The EMA network as the grids sample it: one class per row, if class-conditional."""
        K, y = self.args.num_classes, self.grid_y
        return model if y is None else Guided(model, y, self.args.guidance, K)

    def finish(self):
        """The final pictures, from the EMA weights and the fixed x_T, and the last line."""
        diffusion, model, x_T = self.diffusion, self.guided(self.training.ema), self.grid_x_T
        rows = range(0, len(x_T), 8) if self.grid_y is not None else range(8)  # one per class
        args = (self.args, self.amp, self.out_dir, rows)
        path = save_samples_and_trajectory(diffusion, model, x_T, *args)
        minutes = (self.elapsed_before + time.time() - self.started) / 60
        files = f"{self.ckpt_path}, {path}, {self.out_dir / 'reverse_process.png'}"
        print(f"done: {self.step} steps in {minutes:.1f} min; {files}")
        if self.wandb:
            self.wandb.log({"samples": self.wandb.Image(str(path))}, step=self.step)
            self.wandb.finish()


def train(args):
    """Train eps_theta with Algorithm 1 into --out-dir (ckpt.pt, log.csv, pictures). Under torchrun
    every process (rank) runs it: rank 0 writes the files; all stop and save together."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device, amp = setup_device(args)  # --device, --amp
    out_dir = Path(args.out_dir or f"runs/{args.model}")
    ckpt, wandb = open_run(args, out_dir, world, rank)  # ckpt: None for a new run
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    data = load_dataset(args.dataset, args.data_dir, args.image_size).to(device)  # (N, C, H, W)
    labels, args.num_classes = None, 0  # the classes, for guidance (not in the paper)
    if args.class_cond:
        labels, args.num_classes = load_labels(args.dataset, args.data_dir)
    run = Run(args, data, device, amp, out_dir, world, rank, wandb, labels)
    run.restore(ckpt)
    if rank == 0:
        run.open_log(resumed=ckpt is not None)
    with stop_on_signals() as stop_requested:
        try:
            while run.step < run.total_steps:
                training, step = run.training, run.step
                loss, grad_norm = train_iteration(training, run.diffusion, data, step, rank, world)
                run.after_step(loss, grad_norm)
                log_row = run.step % args.log_every == 0 or run.step == run.total_steps
                stop, save = run.decide(stop_requested, log_row)
                if stop:
                    raise KeyboardInterrupt
                if save:
                    run.checkpoint()
                if rank == 0 and (log_row or time.time() - run.logged_at >= 10):
                    run.write_log(grad_norm)
                if rank == 0 and run.due(args.sample_every):
                    run.save_grid()
                if rank == 0 and run.fid and run.due(args.fid_every):  # the others wait
                    run.measure_fid()
        except KeyboardInterrupt:
            run.checkpoint()
            if rank == 0:
                how = f"saved {run.ckpt_path}; continue with --resume --out-dir {out_dir}"
                print(f"\nstopped at step {run.step}: {how}", file=sys.stderr)
            raise
        finally:
            if rank == 0:
                run.log_file.close()
                if run.fid_file:
                    run.fid_file.close()
            if world > 1:
                dist.destroy_process_group()
    if rank == 0:
        run.finish()
    return run.training.net


# --- sample, forward, bench, compare: the other commands -------------------------------------
def load_sampler(args, device):
    """(model, diffusion, config) of a checkpoint, --weights in eval() mode on device."""
    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    if args.sample_steps and not 2 <= args.sample_steps <= cfg["timesteps"]:
        raise UserError(f"--sample-steps must be between 2 and the model's T = {cfg['timesteps']}")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt[args.weights])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{args.ckpt} holds no {args.weights} weights that fit ({first_line(e)})")
    model = prepare_network(model, device).eval()
    diffusion = GaussianDiffusion(SCHEDULES[cfg["schedule"]](cfg["timesteps"])).to(device)
    return model, diffusion, dict(cfg, step=ckpt["step"])


def class_labels(args, cfg, n):
    """The class of each of n images: --class K, all (a row of 8 each), or each in turn."""
    K, label = cfg.get("num_classes", 0), args.label
    if label is not None and not K:
        raise UserError(f"--class: {args.ckpt} is not class-conditional (train with --class-cond)")
    if label not in (None, "all") and label >= K:
        raise UserError(f"--class {label}: the model knows classes 0 to {K - 1}")
    if not K:
        return None
    k = torch.arange(n)
    return k % K if label is None else k // 8 % K if label == "all" else torch.full((n,), label)


def generate(model, diffusion, cfg, args, device, amp, n):
    """n images (n, C, H, W) uint8 from --sampler in batches of --batch-size, all from --seed: x_T
    drawn on the CPU (the same on every device), each step's z on the device; from a
    class-conditional model, of the classes of class_labels, with --guidance."""
    C, S, batch = cfg["channels"], cfg["image_size"], min(args.batch_size, n)
    x_T_generator = torch.Generator().manual_seed(args.seed)
    z_generator = torch.Generator(device).manual_seed(args.seed)
    batches = math.ceil(n / batch)
    T = diffusion.num_timesteps
    progress = sampling_progress(f"sampling {n} images", args, T, device, batch, batches)
    model, images = maybe_compile(model, args), []
    labels = class_labels(args, cfg, batches * batch)  # (batches * batch,), or None
    for start in range(0, batches * batch, batch):  # whole batches only (one compiled shape)
        x_T = torch.randn((batch, C, S, S), generator=x_T_generator).to(device)
        y = None if labels is None else labels[start : start + batch].to(device)  # (batch,)
        eps_model = model if y is None else Guided(model, y, args.guidance, cfg["num_classes"])
        x_0 = run_sampler(diffusion, eps_model, x_T, args, amp, z_generator, progress)
        images.append(((x_0.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(images)[:n]  # (n, C, H, W), [-1, 1] -> {0..255}


def write_samples(args):
    """sample: --num-samples images from a checkpoint alone, as PNG files or one npz."""
    device, amp = setup_device(args)
    model, diffusion, cfg = load_sampler(args, device)
    out_dir = Path(args.out_dir or Path(args.ckpt).parent / "samples")
    prepare_out_dir(out_dir)
    n, folder = args.num_samples, out_dir / "images"
    if args.format == "png":  # an earlier, larger run's images would stay, and FID read them too
        ours = {f"{k:06d}.png" for k in range(n)}
        stale = [p for p in folder.glob("*.png") if p.name not in ours]
        if stale:
            what = f"{len(stale)} PNG file(s) that this run would not replace, e.g. {stale[0].name}"
            raise UserError(f"{folder} holds {what} (FID reads them too); use another --out-dir")
    images = generate(model, diffusion, cfg, args, device, amp, n)  # (n, C, H, W) uint8
    shown = 8 * cfg["num_classes"] if args.label == "all" else 64  # "all": a row per class
    save_grid(images[:shown].float() / 127.5 - 1, out_dir / "grid.png", nrow=8)
    if args.format == "png":  # one file per image: what pytorch-fid and clean-fid read
        folder.mkdir(exist_ok=True)
        progress = Progress(f"writing {folder}", n)
        for k, img in enumerate(images):
            save_image(img / 255.0, folder / f"{k:06d}.png")  # 8-bit values, exactly
            progress.tick()
        print(f"wrote {n} images to {folder} and a grid to {out_dir / 'grid.png'}")
    else:  # one uint8 array (N, H, W, C), stored under the default key arr_0
        array = images.permute(0, 2, 3, 1).numpy()
        np.savez(out_dir / "samples.npz", array)
        print(f"wrote {out_dir / 'samples.npz'} {array.shape} and {out_dir / 'grid.png'}")


def read_images(path):
    """fid --images: an npz written by sample (uint8 (N, H, W, C)), or the images under a folder."""
    if path.suffix != ".npz":
        from PIL import Image  # Pillow: installed with torchvision

        with Image.open(image_files(path, flag="--images")[0]) as im:  # all at the first's size
            return load_image_folder(path, min(im.size))
    try:
        with np.load(path) as f:
            x = torch.from_numpy(f["arr_0"])
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"--images {path}: not an npz written by sample ({first_line(e)})")
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"--images {path}: arr_0 {tuple(x.shape)} is not uint8 (N, H, W, C)")
    return x.permute(0, 3, 1, 2)  # (N, C, H, W)


def measure_fid(args):
    """fid: the FID of --num-samples images from a checkpoint (or of --images) against the training
    set's statistics; prints it with its protocol, and adds both to fid.json beside them."""
    if bool(args.ckpt) == bool(args.images):
        raise UserError("fid takes one of --ckpt CKPT (to sample from) and --images DIR|FILE.npz")
    device, amp = setup_device(args)
    model, diffusion, cfg = load_sampler(args, device) if args.ckpt else (None, None, {})
    images = None if args.ckpt else read_images(Path(args.images))  # (N, C, H, W) uint8
    args.dataset = args.dataset or cfg.get("dataset", "cifar10")  # the run's training set
    args.data_dir = args.data_dir or cfg.get("data_dir", "data")
    size = cfg.get("image_size") or images.shape[-1]
    features = inception(device)  # before the long work: a missing package or file stops here
    mu, sigma, reference = reference_statistics(args, size, features, device)
    t0, record = time.time(), dict(images=args.images, sampler=None, step=None)
    if args.ckpt:
        images = generate(model, diffusion, cfg, args, device, amp, args.num_samples)
        sampler = f"{sampler_name(args, cfg['timesteps'], device)}, seed {args.seed}"
        sampler += f", guidance {args.guidance:g}" if cfg.get("num_classes") else ""
        record = dict(images=f"the {args.weights} weights of {args.ckpt}", sampler=sampler)
        record.update(step=cfg["step"], images_seen=cfg["step"] * cfg["batch_size"])
    stats = feature_statistics(features, images, device, f"{len(images):,} images")
    fid = round(frechet_distance(*stats, mu, sigma), 4)
    record = dict(fid=fid, samples=len(images), **record, reference=reference)
    record.update(network=FID_NETWORK, seconds=round(time.time() - t0, 1))  # after the reference
    print(f"FID {fid:.2f}", *[f"  {k:<11} {v}" for k, v in list(record.items())[1:]], sep="\n")
    if len(images) < 50_000:
        print(f"note: FID from {len(images):,} images reads higher than from the 50,000 of papers")
    path = Path(args.ckpt or args.images).parent / "fid.json"  # beside the checkpoint or images
    records = json.loads(path.read_text()) if path.is_file() else []
    path.with_name("fid.json.tmp").write_text(json.dumps(records + [record], indent=1))
    os.replace(path.with_name("fid.json.tmp"), path)  # whole, or the old file untouched
    print(f"added to {path}")


def draw_forward_process(args):
    """forward: the forward-process picture [Eq. 4]. A row per image, x_0 then q_sample at
    t = T/10, ..., T, with one eps per row so that each row shows one noise growing."""
    images = load_dataset(args.dataset, args.data_dir, args.image_size, args.num_images)
    x_0 = images.float() / 127.5 - 1  # (n, C, H, W)
    diffusion = GaussianDiffusion(SCHEDULES[args.schedule](args.timesteps))
    T, n = diffusion.num_timesteps, x_0.shape[0]
    steps = [max(0, T * k // 10 - 1) for k in range(1, 11)]  # code t of paper t = T/10, ..., T
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(args.seed))
    columns = [x_0] + [diffusion.q_sample(x_0, torch.full((n,), t), noise) for t in steps]
    prepare_out_dir(out_dir := Path(args.out_dir))
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # (n * 11, C, H, W), row by row
    save_grid(grid, out_dir / "forward_process.png", nrow=len(columns))
    columns = ", ".join(str(t + 1) for t in steps)
    print(f"wrote {out_dir / 'forward_process.png'}: {n} images, columns x_0 then t = {columns}")


BENCH_CPU = {  # the quick start's network, and few steps: a CPU bench ends within a minute
    **dict(image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1),
    **dict(attn_resolutions=[8], batch_size=32, sample_batch_size=32, steps=20, warmup_steps=3),
}


def benchmark(args):
    """bench: time --steps training iterations (all of Alg. 1) and sampler network evaluations on
    random data, after --warmup-steps of each; --profile N: then profile N iterations."""
    device, amp = setup_device(args)
    if device.type == "cpu":  # the GPU defaults (the paper's network at batch 128) take hours here
        vars(args).update(cpu := {k: v for k, v in BENCH_CPU.items() if k not in args.explicit})
        text = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        flags = " ".join(f"--{k.replace('_', '-')} {text(v)}" for k, v in cpu.items())
        print(f"bench on a CPU, with its CPU defaults for the flags not typed: {flags}")
    torch.manual_seed(args.seed)
    C, S, B, sample_batch = 3, args.image_size, args.batch_size, args.sample_batch_size
    run, diffusion = build_training(args, C, device, amp)
    data = torch.randint(0, 256, (4 * B, C, S, S), dtype=torch.uint8, device=device)
    x_t = torch.randn(sample_batch, C, S, S, device=device)
    t = torch.randint(0, args.timesteps, (sample_batch,), device=device)
    sampler_model = maybe_compile(run.ema, args)  # as in sample
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    what = f"{args.model}, {count_parameters(run.net):,} parameters, {S}x{S}, amp {amp}"
    print(f"bench: {what}, compile {args.compile}, {where}, torch {torch.__version__}")
    print(f"{'':8} {'batch':>6} {'images/s':>10} {'ms/call':>9} {'warm-up s':>10}")

    train_fn = lambda k: train_iteration(run, diffusion, data, k)  # noqa: E731 (all of Alg. 1)

    def sample_fn(k):  # one network evaluation of a sampler step, as in p_sample
        with torch.inference_mode(), torch.autocast(device.type, amp, enabled=amp is not None):
            sampler_model(x_t, t)

    def timed(name, fn, n, batch):
        progress = Progress(f"bench: {name}", n, batch)
        sync = torch.cuda.synchronize if cuda else int
        sync()
        t0 = time.perf_counter()
        for k in range(n):
            fn(k)
            progress.tick()
        sync()
        return time.perf_counter() - t0

    for name, fn, batch in (("train", train_fn, B), ("sample", sample_fn, sample_batch)):
        warm = timed(f"{name} warm-up", fn, args.warmup_steps, batch)
        seconds = timed(name, fn, args.steps, batch)
        rate, ms = args.steps * batch / seconds, 1e3 * seconds / args.steps
        print(f"{name:8} {batch:>6} {rate:>10,.1f} {ms:>9.2f} {warm:>10.1f}", flush=True)
        if name == "train" and cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"peak GPU memory while training: {peak:.2f} GiB")
    print("sample = one network evaluation per image, what one step of a sampler costs")
    if args.profile:  # where a step's time goes: the operators (kernels) that took longest
        activities = [torch.profiler.ProfilerActivity.CPU]
        activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
        with torch.profiler.profile(activities=activities) as prof:
            seconds = timed("profile", train_fn, args.profile, B)
        by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=70))
        ms = 1e3 * seconds / args.profile
        print(f"profiled {args.profile} training steps: {ms:.2f} ms per step (profiler on)")


def read_run(folder):
    """A run's curves: log.csv's loss by step, fid.csv's FIDs by images seen, fid.json's records."""
    rows = {}
    try:
        for name in ("log.csv", "fid.csv"):
            with contextlib.suppress(FileNotFoundError), open(folder / name, newline="") as f:
                rows[name] = list(csv.DictReader(f))
        loss = {int(r["step"]): float(r["loss"]) for r in rows.get("log.csv", [])}  # last wins
        fids = [(int(r["images_seen"]), float(r["fid"])) for r in rows.get("fid.csv", [])]
        scored = json.loads(path.read_text()) if (path := folder / "fid.json").exists() else []
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{folder}: a log.csv, fid.csv or fid.json not written by ddpm.py ({e})")
    if not loss:
        raise UserError(f"{folder / 'log.csv'} has no rows, or does not exist")
    return np.array(list(loss)), np.array(list(loss.values())), fids, scored


def compare_runs(args):
    """compare: each run's mean loss (its log.csv) over 8 stretches of the steps all reached, then
    its FIDs (fid.csv from --fid-every, fid.json from fid); --plot: both against images seen."""
    runs = {Path(folder): read_run(Path(folder)) for folder in args.runs}
    last = min(int(steps.max()) for steps, *_ in runs.values())
    edges = [round(last * k / 8) for k in range(9)]
    print(f"{'steps':>13} " + " ".join(f"{folder.name:>10}" for folder in runs))
    for lo, hi in zip(edges, edges[1:]):
        means = [loss[(steps > lo) & (steps <= hi)].mean() for steps, loss, *_ in runs.values()]
        print(f"{lo:>6}-{hi:<6} " + " ".join(f"{m:>10.4f}" for m in means))
    for folder, (*_, fids, scored) in runs.items():
        for seen, fid in fids:
            print(f"{folder.name}: FID {fid:.2f} after {seen:,} images (fid.csv, while training)")
        for r in scored:
            how = f"{r['samples']:,} images, {r['sampler']}"
            print(f"{folder.name}: FID {r['fid']:.2f} at step {r['step']} ({how}; fid.json)")
    if args.plot:
        plot_runs(runs, args.plot)


def plot_runs(runs, path):
    """compare --plot: loss and FID (fid.csv) against training images seen, one line per run."""
    try:
        import matplotlib.pyplot as plt  # an optional extra, imported only here
    except ImportError:
        raise UserError("--plot needs the matplotlib package: pip install matplotlib")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for folder, (steps, loss, fids, _) in runs.items():
        config = load_checkpoint(folder / "ckpt.pt", mmap=True)["config"]  # its batch size
        left.plot(steps * config["batch_size"], loss, label=folder.name)
        if fids:
            right.plot(*zip(*fids), "o-", label=folder.name)
    left.set(xlabel="training images seen", ylabel="loss (mean per log.csv row)", yscale="log")
    right.set(xlabel="training images seen", ylabel="FID (fid.csv)")
    left.legend()
    if any(fids for _, _, fids, _ in runs.values()):
        right.legend()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


# --- Command line --------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError, and shows every flag's default."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def checked(kind, ok, must):
    """An argparse type: kind(text), refused with "must be {must}" unless ok(value)."""

    def number(text):
        if not ok(value := kind(text)):  # NaN fails every comparison, so ok() refuses it
            raise argparse.ArgumentTypeError(f"{text}: must be {must}")
        return value

    return number


def whole(lo, hi=math.inf):
    """An integer flag from lo to hi: within what torch holds and builds in reasonable time."""
    must = "0 or more" if lo == 0 else f"at least {lo}"
    must = must if hi == math.inf else f"from {lo} to {hi:,}"
    return checked(int, lambda v: lo <= v <= hi, must)


def int_list(hi):
    """An argparse type: '1,2,2,2' -> [1, 2, 2, 2], up to 16 integers, each from 1 to hi."""
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    ok = lambda values: len(values) <= 16 and all(1 <= v <= hi for v in values)  # noqa: E731
    return checked(ints, ok, f"up to 16 comma-separated integers from 1 to {hi}")


finite = math.isfinite
COUNT, NONNEGATIVE = whole(0), checked(float, lambda v: v >= 0, "0 or more")
FINITE_NONNEGATIVE = checked(float, lambda v: finite(v) and v >= 0, "0 or more, and finite")
POSITIVE = checked(float, lambda v: v > 0, "more than 0")
FINITE_POSITIVE = checked(float, lambda v: finite(v) and v > 0, "more than 0, and finite")
FRACTION = checked(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
SEED = whole(0, 2**32 - 1)


def class_label(text):
    """--class: a class number, or all."""
    return text if text == "all" else whole(0)(text)


# numpy's range; each process's streams add to it
BATCH = whole(1, 2**20)


# The flags, one row each: (flag, type, default, help[, more argparse keywords]). A list as the type
# gives the choices, bool makes a switch. A help ends with "; paper: X" where that matters.
NETWORK_FLAGS = [
    ("--model", list(MODELS), "res_att", "conv, res or res_att; paper: res_att"),
    ("--image-size", whole(1, 4096), 32, "image side in pixels"),
    ("--base-channels", whole(32, 4096), 128, "channels at full resolution, a multiple of 32"),
    ("--channel-mult", int_list(64), [1, 2, 2, 2], "channel multiplier per level, e.g. 1,2,2,2"),
    ("--num-res-blocks", whole(1, 64), 2, "residual blocks per level going down"),
    ("--attn-resolutions", int_list(4096), [16], "resolutions with self-attention (res_att)"),
    ("--dropout", FRACTION, 0.1, "dropout in every block"),
    ("--timesteps", whole(2, 100_000), 1000, "diffusion steps T"),
    ("--schedule", list(SCHEDULES), "linear", "beta schedule; paper: linear 1e-4 to 0.02"),
]
COMPILE_MODES = ["auto", "default", "reduce-overhead", "max-autotune"]
COMPILE_HELP = """torch.compile the network (a slow first step, faster after) in mode MODE; auto:
reduce-overhead (CUDA graphs) when training on one GPU, default otherwise; None: off"""
RUNTIME_FLAGS = [
    ("--device", ["auto", "cpu", "cuda", "mps"], "auto", "auto: cuda, then mps, then cpu"),
    ("--amp", ["auto", "bf16", "fp16", "none"], "auto", "auto: bf16 on CUDA, else none (float32)"),
    ("--seed", SEED, 0, "random seed"),
    ("--compile", COMPILE_MODES, None, COMPILE_HELP, dict(nargs="?", const="auto", metavar="MODE")),
]
SAMPLER_FLAGS = [
    ("--sampler", ["auto", "ddpm", "ddim", "dpm++"], "auto", "auto: ddpm on CUDA, else dpm++"),
    ("--sample-steps", whole(2), None, "ddim and dpm++ steps; None: 100 for ddim, 20 for dpm++"),
    ("--eta", FINITE_NONNEGATIVE, 0.0, "DDIM noise: 0 deterministic, 1 DDPM-like"),
    ("--variance", ["fixedlarge", "fixedsmall"], "fixedlarge", "ddpm's sigma_t^2: beta or beta~"),
    ("--guidance", FINITE_NONNEGATIVE, 0.5, "classifier-free guidance w, class-conditional models"),
]
DATA_FLAGS = [
    ("--dataset", [*TORCHVISION_DATASETS, "folder"], "cifar10", "the training images"),
    ("--data-dir", str, "data", "the dataset's folder; for folder, any tree of .png/.jpg files"),
]
TRAIN_FLAGS = [
    ("--no-flip", bool, False, "no random horizontal flips (they are for cifar10 and folder)"),
    ("--epochs", whole(1), 100, "passes over the data; paper: 800k steps, about 2000"),
    ("--max-steps", COUNT, 0, "stop after this many steps if sooner; 0: no limit"),
    ("--batch-size", BATCH, 128, "global batch; paper: 128"),
    ("--lr", FINITE_POSITIVE, 2e-4, "Adam learning rate; paper: 2e-4"),
    ("--warmup", COUNT, 5000, "linear learning-rate warm-up steps; paper: 5000"),
    ("--grad-clip", POSITIVE, 1.0, "clip the global gradient norm to this; inf: no clipping"),
    ("--ema-decay", FRACTION, 0.9999, "EMA decay, warmed up; paper: 0.9999"),
    ("--out-dir", str, None, "where ckpt.pt, log.csv and pictures go; None: runs/<model>"),
    ("--resume", bool, False, "continue the run in --out-dir from its ckpt.pt"),
    ("--ckpt-minutes", NONNEGATIVE, 5, "save ckpt.pt so often, and at the end; 0: only then"),
    ("--ckpt-every", COUNT, 0, "also save every N steps; 0: off"),
    ("--sample-every", COUNT, 10, "a grid of samples every N epochs; 0: never"),
    ("--log-every", whole(1), 100, "a log.csv row every N steps"),
    ("--wandb", bool, False, "log to Weights & Biases (pip install wandb)"),
    (
        "--fid-every",
        COUNT,
        0,
        "an FID every N epochs, in fid.csv (pip install pytorch-fid); 0: off",
    ),
    ("--fid-samples", whole(2, 10_000_000), 10_000, "samples per --fid-every FID; paper: 50000"),
    REF_STATS := ("--ref-stats", str, None, "FID reference: an npz of mu, sigma; None: the data's"),
    ("--class-cond", bool, False, "train on the dataset's labels, for --guidance (not paper)"),
    ("--cond-drop", FRACTION, 0.1, "with --class-cond, the share of labels dropped to 'no label'"),
]
SAMPLE_FLAGS = [
    ("--ckpt", str, None, "a ckpt.pt written by train", dict(required=True)),
    ("--num-samples", whole(1, 10_000_000), 64, "how many images; an FID takes 50000"),
    ("--batch-size", BATCH, 500, "images per sampler batch"),
    ("--weights", ["ema", "model"], "ema", "the EMA or the raw weights; paper: ema"),
    ("--format", ["png", "npz"], "png", "png files and a grid, or one uint8 (N, H, W, C) npz"),
    ("--out-dir", str, None, "where they go; None: a samples/ folder beside the checkpoint"),
    ("--class", class_label, None, "K, or all; None: each in turn", dict(dest="label")),
]
FID_FLAGS = [
    ("--ckpt", str, None, "a ckpt.pt written by train: the FID of its samples"),
    ("--images", str, None, "or the FID of these: a folder of images, or an npz from sample"),
    ("--num-samples", whole(2, 10_000_000), 50_000, "how many samples; paper: 50000"),
    *[row for row in SAMPLE_FLAGS if row[0] in ("--batch-size", "--weights", "--class")],
    (
        "--dataset",
        [*TORCHVISION_DATASETS, "folder"],
        None,
        "the reference; None: the run's/cifar10",
    ),
    ("--data-dir", str, None, "its folder, where its statistics are cached; None: the run's/data"),
    REF_STATS,
]
SHARED = ("--image-size", "--timesteps", "--schedule", "--seed")  # forward takes these too
FORWARD_FLAGS = [row for row in NETWORK_FLAGS + RUNTIME_FLAGS if row[0] in SHARED] + [
    ("--num-images", whole(1), 8, "rows, one image each"),
    ("--out-dir", str, "runs", "writes forward_process.png there"),
]
BENCH_FLAGS = [
    ("--batch-size", BATCH, 128, "training batch; on a CPU 32"),
    ("--sample-batch-size", BATCH, 500, "sampling batch; on a CPU 32"),
    ("--steps", whole(1), 20, "timed calls of each"),
    ("--warmup-steps", COUNT, 5, "untimed calls first, compiling included; on a CPU 3"),
    ("--profile", COUNT, 0, "then profile N training steps: the slowest operators or kernels"),
]


def add_flags(parser, title, rows):
    """Add a group of flags, from rows (flag, type, default, help[, more keywords])."""
    group = parser.add_argument_group(title)
    for flag, kind, default, text, *more in rows:
        kwargs = {"choices": kind} if isinstance(kind, list) else {"type": kind}
        kwargs = {"action": "store_true"} if kind is bool else kwargs
        group.add_argument(flag, default=default, help=text, **kwargs, **(more[0] if more else {}))


COMMANDS = {  # name: (its function, its groups of flags, its help)
    "train": (train, "network runtime data sampler training", "train a model (Algorithm 1)"),
    "sample": (write_samples, "runtime sampler sample", "generate images from a checkpoint"),
    "forward": (draw_forward_process, "data forward", "picture the forward (noising) process"),
    "bench": (benchmark, "network runtime bench", "measure training and sampling speed"),
    "fid": (measure_fid, "runtime sampler fid", "the FID of a checkpoint's samples, or of images"),
    "compare": (compare_runs, "", "compare the loss and FID curves of runs"),
}
FLAGS = dict(network=NETWORK_FLAGS, runtime=RUNTIME_FLAGS, sampler=SAMPLER_FLAGS, data=DATA_FLAGS)
FLAGS.update(training=TRAIN_FLAGS, sample=SAMPLE_FLAGS, forward=FORWARD_FLAGS, bench=BENCH_FLAGS)
FLAGS.update(fid=FID_FLAGS)


def build_parser():
    """The six commands and their flags; returns (parser, {command: subparser})."""
    description = "Denoising Diffusion Probabilistic Models (Ho et al. 2020); no command: train"
    parser = Parser(prog="ddpm.py", allow_abbrev=False, description=description)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    commands = {}
    for name, (_, groups, what) in COMMANDS.items():
        p = commands[name] = sub.add_parser(name, allow_abbrev=False, help=what, description=what)
        for group in groups.split():
            add_flags(p, group, FLAGS[group])
    commands["compare"].add_argument("runs", nargs="+", help="run folders, each with its log.csv")
    commands["compare"].add_argument("--plot", metavar="FILE.png", help="draw the curves there")
    for flag in ("lr", "grad_clip", "ema_decay", "warmup"):  # read by the training iteration
        commands["bench"].set_defaults(**{flag: commands["train"].get_default(flag)})
    return parser, commands


def parse_args(argv):
    """Parse a command line (train when no command is named); records which flags were typed."""
    argv = list(argv)
    parser, commands = build_parser()
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv.insert(0, "train")
    args = parser.parse_args(argv)
    typed = {tok.split("=")[0] for tok in argv}  # a resume may not contradict these
    actions = commands[args.command]._actions
    args.explicit = {a.dest for a in actions if typed & set(a.option_strings)}
    return args


def main(argv=None):
    """Run a command; returns 0, 2 for bad input (one line on stderr) or 130 for Ctrl-C. Under
    torchrun only rank 0 prints that line; the other ranks exit alike."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        COMMANDS[args.command][0](args)
        return 0
    except UserError as e:
        message = str(e)
    except torch.cuda.OutOfMemoryError:  # training keeps its last checkpoint: it was saved whole
        message = "out of GPU memory; use a smaller --batch-size (bench: --sample-batch-size too)"
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no Triton or no C compiler here
        cause = first_line(getattr(e, "inner_exception", e))
        message = f"--compile failed ({cause}); run without --compile, which computes the same"
    except KeyboardInterrupt:  # Ctrl-C: training has saved its checkpoint by now
        message = "interrupted"
    if os.environ.get("RANK", "0") == "0":
        print(f"ddpm.py: {'error: ' * (message != 'interrupted')}{message}", file=sys.stderr)
    return 130 if message == "interrupted" else 2


if __name__ == "__main__":
    sys.exit(main())
