"""Small pieces of math shared by the building blocks, the samplers and the metrics (one
implementation each).

* :func:`entropy`: H(p) = −Σ_v p_v log p_v (nats) of p = softmax(logits), or of given probabilities.
* :func:`kl_divergence`: KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) of p = softmax(a), q = softmax(b).
* :func:`inverse_softplus`: x with softplus(x) = log(1 + eˣ) = y.
* :func:`causal_mean`: the running mean m_i = (S₀ + Σ_{j≤i} w_j x_j) / max(1, n₀ + Σ_{j≤i} w_j).
"""

from __future__ import annotations

import math

import torch


def entropy(logits: torch.Tensor | None = None, *, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) over the last axis: of softmax(``logits [..., V]``) (computed in float32
    at least; tokens removed with logit −inf contribute 0), or of ``probs [..., V]`` (rows summing
    to 1; 0 log 0 = 0). Returns ``[...]``."""
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits and probs")
    if probs is not None:
        return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p_logits) ‖ softmax(q_logits)) in nats over the last axis: ``[..., V]`` (shapes
    broadcast) → ``[...]``."""
    logp, logq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = log(1 + eˣ) = y (y > 0): x = y + log(1 − e^{−y})."""
    return y + math.log(-math.expm1(-y))


def causal_mean(x: torch.Tensor, dim: int = -1, weight: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, prefix_count: torch.Tensor | float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running mean along ``dim``: m_i = (S₀ + Σ_{j≤i} w_j x_j) / max(1, n₀ + Σ_{j≤i} w_j), in O(T).

    ``x [..., T, ...]``; ``weight`` broadcastable against x (1 = counted, 0 = left out, e.g.
    padding; None: all 1); ``prefix`` S₀, the sum of earlier elements (x's shape with ``dim`` of
    size 1; None: 0) and ``prefix_count`` n₀, how many there were (broadcastable). A position with
    nothing counted yet gets mean 0. Returns ``(m, totals)``: m shaped like x, and the sums
    S₀ + Σ_j w_j x_j over the whole axis (``dim`` removed), which carry the mean on to later
    elements."""
    axis = dim % x.ndim
    if weight is None:
        count = torch.arange(1, x.shape[axis] + 1, device=x.device, dtype=x.dtype)
        count = count.view(-1, *([1] * (x.ndim - axis - 1)))
    else:
        x = x * weight
        count = weight.expand_as(x).cumsum(axis)
    sums = x.cumsum(axis)
    if prefix is not None:
        sums = sums + prefix
    count = (count + prefix_count).clamp_min(1)
    return sums / count, sums.select(axis, -1)
