"""Rectified flow (paper Eq. 1): straight paths between noise and data, a velocity target, an Euler sampler.

Convention (the paper's Eq. 1): t runs from 0 (pure noise) to 1 (data), x_t = t·x + (1 - t)·ε, and the model
predicts the velocity v = dx_t/dt = x - ε. Sampling integrates from t = 0 to t = 1. Training timesteps are
logit-normal: t = sigmoid(u), u ~ N(μ, σ) (the paper writes the logit; its inverse is meant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import ecviz.defaults as D
from ecviz.errors import EcvizError


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·x + (1 - t)·ε, t (B,) broadcast over x (B, ...)."""
    t = t.view(-1, *[1] * (x.dim() - 1))
    return t * x + (1 - t) * noise


def velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target dx_t/dt = x - ε."""
    return x - noise


def sample_timesteps(n: int, mu: float = 0.0, sigma: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal t in (0, 1): mu shifts mass toward noise (<0) or data (>0), sigma widens it."""
    u = torch.randn(n, generator=generator, device=device) * sigma + mu
    return torch.sigmoid(u)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared velocity error over (B, S, D) tokens; token_mask (B, S) selects the tokens that count."""
    err = (pred - target).square().mean(-1)  # (B, S)
    if token_mask is None:
        return err.mean()
    return (err * token_mask).sum() / token_mask.sum().clamp(min=1)


def sample_seed(seed: int, i: int) -> int:
    """Noise seed of sample i of a run seeded `seed`: independent of batching and process count."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint32)[0])


def noise_for(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One Gaussian (shape) per seed from its own generator: a sample's noise never depends on its batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@dataclass
class Step:
    """What the sampler's per-step callback sees."""

    index: int  # 0 .. steps-1
    t: float  # the timestep the model saw
    x: torch.Tensor  # the state after the step
    x0: torch.Tensor  # the current estimate of the clean sample, x_t + (1 - t)·v


def check_branches_apart(model: torch.nn.Module, images: int) -> None:
    """Guidance runs [conditional; unconditional] as one batch of 2·images: each half must fill whole routing
    groups of the sparse layers, or one group would hold images of both branches, competing for the same
    expert capacity. EcvizError otherwise (a dense model, or groups within an image, take any batch)."""
    from ecviz.routing import SparseMoE

    moe = next((m for m in model.modules() if isinstance(m, SparseMoE)), None)
    if moe is None:
        return
    g = moe.current_group_size
    tokens = images * model.cfg.tokens
    if tokens % g:
        raise EcvizError(f"a guided batch of {images} images ({tokens} tokens per branch) does not fill whole routing "
                         f"groups of {g} tokens, so a group would mix the conditional and unconditional branch; "
                         "pad the batch (Pipeline.generate_samples does)")


@torch.no_grad()
def euler_sample(model: torch.nn.Module, noise: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor,
                 steps: int = D.STEPS, guidance: float = 1.0,
                 callback: Callable[[Step], None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from noise at t=0 to t=1 in `steps` equal Euler steps.

    With guidance != 1 (the classifier-free guidance scale), the batch is run as [conditional; unconditional]
    (null text) in one forward and v = v_u + guidance·(v_c - v_u). Deterministic: the result depends only on
    noise, text and settings.
    """
    if steps < 1:
        raise EcvizError(f"steps must be at least 1, got {steps}")
    x, B = noise, noise.shape[0]
    guided = guidance != 1.0
    if guided:
        check_branches_apart(model, B)
        y_null, m_null = model.null_like(y, y_mask)
        y, y_mask = torch.cat([y, y_null]), torch.cat([y_mask, m_null])
    for i in range(steps):
        t = i / steps
        tt = torch.full((2 * B if guided else B,), t, device=x.device)
        v = model(torch.cat([x, x]) if guided else x, tt, y, y_mask)
        if guided:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x0 = x + (1 - t) * v
        x = x + v / steps
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x
