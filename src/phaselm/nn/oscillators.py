"""Kuramoto oscillators: dynamics, order parameters and anti-over-synchronisation controls.

Shared by PhaseGPT (phase-coupled attention) and PMA (phase-modulated attention).

Dynamics, for oscillators θ_i coupled along one axis (tokens, or a population):

    dθ_i/dt = ω_i + (K/n_i) Σ_{j ∈ C(i)} sin(θ_j − θ_i)

Positive K pulls phases together. ``causal=True``: C(i) = {j ≤ i} along the coupling axis (token i
never sees later tokens), else all j. The sum is computed through the mean-field identity

    (1/n_i) Σ_{j ∈ C(i)} sin(θ_j − θ_i) = R_i · sin(ψ_i − θ_i),   R_i e^{iψ_i} = mean_{j ∈ C(i)} e^{iθ_j}

with the (running) mean taken by a cumulative sum, so a step costs O(T·N) and never builds a
[T, T] tensor. Shapes: ``theta [..., T, N]`` with the coupling axis ``dim`` (default −2, tokens)
and oscillators independent along the other axes; ω and K broadcast against θ.

Order parameter R = |mean e^{iθ}| over any axes (circular statistics; angles are never averaged
linearly). Controls that act in training: phase noise (``noise_std``), frequency jitter
(:func:`jitter_frequencies`) and a coherence regulariser (:func:`coherence_penalty`) that takes R
computed from phases *with* gradients.
"""

from __future__ import annotations

import math

import torch

from phaselm.nn.functional import causal_mean


class PhasorSums:
    """Running sums Σ_j w_j cos θ_j, Σ_j w_j sin θ_j over the tokens seen so far, one entry per
    mean-field evaluation (an Euler step evaluates once, an RK4 step four times, and a caller may
    add its own, e.g. R of the final phases). It is the whole state the causal mean field needs to
    go on from earlier tokens: a new token costs O(N) per evaluation, whatever the context length.

    ``prefix``: the sums of earlier tokens, ``[E, ..., 2]`` with the coupling axis removed (None:
    no earlier tokens); ``count``: how many earlier tokens they hold, broadcastable against θ with
    the coupling axis of size 1. Each evaluation reads ``prefix[i]`` in order and records its new
    totals in ``totals`` (stack them with :meth:`stacked` for a cache).
    """

    def __init__(self, prefix: torch.Tensor | None = None, count: torch.Tensor | float = 0.0):
        self.prefix, self.count, self.totals = prefix, count, []

    def take(self) -> torch.Tensor | None:
        """The earlier tokens' sums for the next evaluation, ``[..., 2]`` (None: no earlier tokens)."""
        i = len(self.totals)
        if self.prefix is None:
            return None
        if i >= self.prefix.shape[0]:
            raise ValueError(f"the Kuramoto state holds {self.prefix.shape[0]} mean-field evaluations, "
                             f"but evaluation {i + 1} was asked for (steps or method changed?)")
        return self.prefix[i]

    def stacked(self) -> torch.Tensor:
        """``[E, ..., 2]``: the totals after the new tokens, for the next call."""
        return torch.stack(self.totals)


def _mean_phasor(theta: torch.Tensor, dim: int, causal: bool, weight: torch.Tensor | None = None,
                 sums: PhasorSums | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of mean_{j ∈ C(i)} e^{iθ_j}: running along ``dim`` if ``causal``,
    else the full mean (kept as a size-1 axis, broadcastable).

    ``weight`` (broadcastable against θ, 1 for real tokens and 0 for padding) excludes tokens from
    the mean; ``sums`` (causal only) carries the running sums of earlier tokens in and the new
    totals out. The sums accumulate in float32 at least, whatever θ's dtype."""
    axis = dim % theta.ndim
    acc = torch.promote_types(theta.dtype, torch.float32)
    z = torch.stack([torch.cos(theta), torch.sin(theta)], -1).to(acc)  # [..., 2]
    w = None if weight is None else weight.to(acc)[..., None]
    if not causal:
        if sums is not None:
            raise ValueError("running phasor sums need causal coupling")
        if w is not None:
            z = z * w
        n = theta.shape[axis] if w is None else w.expand_as(z).sum(axis, keepdim=True).clamp_min(1)
        m = (z.sum(axis, keepdim=True) / n).to(theta.dtype)
        return m[..., 0], m[..., 1]
    prefix, count = (None, 0.0) if sums is None else (sums.take(), sums.count)
    if prefix is not None:
        prefix = prefix.unsqueeze(axis).to(acc)
    if torch.is_tensor(count):
        count = count[..., None]
    m, totals = causal_mean(z, axis, w, prefix, count)
    if sums is not None:
        sums.totals.append(totals)
    m = m.to(theta.dtype)
    return m[..., 0], m[..., 1]


def mean_field(theta: torch.Tensor, dim: int = -2, causal: bool = True, weight: torch.Tensor | None = None,
               sums: PhasorSums | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, ψ)``: modulus and angle of the (running, if ``causal``) mean of e^{iθ} along ``dim``
    (``weight``, ``sums``: see :func:`_mean_phasor`)."""
    mc, ms = _mean_phasor(theta, dim, causal, weight, sums)
    return torch.sqrt(mc * mc + ms * ms), torch.atan2(ms, mc)


def coupling_term(theta: torch.Tensor, dim: int = -2, causal: bool = True, weight: torch.Tensor | None = None,
                  sums: PhasorSums | None = None) -> torch.Tensor:
    """(1/n_i) Σ_{j ∈ C(i)} sin(θ_j − θ_i) = R_i sin(ψ_i − θ_i), in O(T·N).

    R sin(ψ − θ) = Im(z e^{−iθ}) with z = mc + i·ms, i.e. ms·cos θ − mc·sin θ (no atan2, so the
    gradient is smooth where R = 0)."""
    mc, ms = _mean_phasor(theta, dim, causal, weight, sums)
    return ms * torch.cos(theta) - mc * torch.sin(theta)


def velocity(theta: torch.Tensor, omega, coupling, dim: int = -2, causal: bool = True,
             weight: torch.Tensor | None = None, sums: PhasorSums | None = None) -> torch.Tensor:
    """dθ/dt = ω + K · (1/n_i) Σ_j sin(θ_j − θ_i)."""
    return omega + coupling * coupling_term(theta, dim, causal, weight, sums)


def integrate(
    theta: torch.Tensor,
    omega,
    coupling,
    steps: int = 1,
    dt: float = 0.1,
    integrator: str = "euler",
    dim: int = -2,
    causal: bool = True,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
    sums: PhasorSums | None = None,
) -> torch.Tensor:
    """Integrate the Kuramoto ODE for ``steps`` steps of ``dt`` (explicit Euler or RK4).

    ``noise_std`` adds phase noise √dt·σ·ξ per step (Euler–Maruyama; only when σ > 0), which keeps
    a population from locking completely. Differentiable in θ, ω and K. ``weight`` leaves padding
    tokens out of every mean field; ``sums`` (:class:`PhasorSums`) continues from earlier tokens
    (incremental decoding): the result for the new tokens equals integrating the whole sequence.
    """
    if integrator not in ("euler", "rk4"):
        raise ValueError(f"integrator must be 'euler' or 'rk4', got {integrator!r}")
    if steps < 0 or dt <= 0:
        raise ValueError(f"steps must be >= 0 and dt > 0, got steps={steps}, dt={dt}")

    def f(th):
        return velocity(th, omega, coupling, dim, causal, weight, sums)

    for _ in range(steps):
        if integrator == "euler":
            theta = theta + dt * f(theta)
        else:
            k1 = f(theta)
            k2 = f(theta + 0.5 * dt * k1)
            k3 = f(theta + 0.5 * dt * k2)
            k4 = f(theta + dt * k3)
            theta = theta + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if noise_std > 0:
            noise = torch.randn(theta.shape, generator=generator, device=theta.device, dtype=theta.dtype)
            theta = theta + math.sqrt(dt) * noise_std * noise
    return theta


def order_parameter(theta: torch.Tensor, dim=-1, keepdim: bool = False) -> torch.Tensor:
    """R = |mean e^{iθ}| over ``dim`` (an int or a tuple of axes): 1 = all phases equal, ≈ 0 = spread."""
    acc = torch.promote_types(theta.dtype, torch.float32)
    c = torch.cos(theta).to(acc).mean(dim, keepdim=keepdim)
    s = torch.sin(theta).to(acc).mean(dim, keepdim=keepdim)
    # sqrt of a floor of 1e-30 instead of +1e-12 inside: 0 stays ≈ 0 (1e-15), and the gradient stays finite
    return torch.sqrt((c * c + s * s).clamp_min(1e-30)).to(theta.dtype)


def jitter_frequencies(omega: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ω + std·ξ (ξ ~ N(0, 1)): frequency jitter, drawn fresh per call (e.g. per training step)."""
    if std <= 0:
        return omega
    return omega + std * torch.randn(omega.shape, generator=generator, device=omega.device, dtype=omega.dtype)


def coherence_penalty(r: torch.Tensor, mode: str = "ceiling", target: float = 0.45, width: float = 0.1) -> torch.Tensor:
    """Coherence regulariser on R (mean over its elements), to be added to the loss with a weight λ.

    ``ceiling``: relu(R − R*)²; ``center``: (R − R*)²; ``band``: relu(|R − R*| − width)².
    ``r`` must be order parameters in [0, 1] (:func:`order_parameter`), not phases: a value outside
    is a ``ValueError`` naming the fix (the PhaseGPT seed passed phases here).
    """
    with torch.no_grad():
        low, high = float(r.min()), float(r.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"coherence_penalty takes order parameters R in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                         "(phases?); pass order_parameter(phases) instead")
    if mode == "ceiling":
        pen = torch.relu(r - target) ** 2
    elif mode == "center":
        pen = (r - target) ** 2
    elif mode == "band":
        pen = torch.relu((r - target).abs() - width) ** 2
    else:
        raise ValueError(f"mode must be 'ceiling', 'center' or 'band', got {mode!r}")
    return pen.mean()


def critical_coupling(density_at_zero: float) -> float:
    """Kuramoto's K_c = 2 / (π g(0)) for a unimodal symmetric frequency density g."""
    return 2.0 / (math.pi * density_at_zero)
