"""Exact random rotations of value vectors.

A rotation by angle θ in random planes:

    R = Q · blockdiag(G(θ), G(θ), ..., G(θ), [1]) · Qᵀ,     G(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]

with Q a Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed). R is orthogonal
(Rᵀ R = I to float precision, so norms are preserved exactly) and, for an even dimension d,
rotates *every* vector by exactly θ: cos∠(v, R v) = vᵀ R v / |v|² = cos θ. For odd d the last
basis direction of Q stays fixed, so a vector turns by at most θ.

This is what ``noise_scale`` means in :class:`phaselm.PhaseSlipSampler`: the angle θ in radians
by which each perturbed value vector turns (``noise_scale = 0`` gives exactly the identity).
"""

from __future__ import annotations

import math

import torch


def random_rotations(
    n: int, dim: int, angle: float, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> torch.Tensor:
    """``n`` independent random rotations of ``dim``-vectors by ``angle`` radians: ``[n, dim, dim]``.

    Computed in float64 and cast, so ``Rᵀ R = I`` holds to the precision of ``dtype``.
    ``angle == 0`` returns exact identities (no Q is drawn, the generator is not advanced).
    """
    if angle < 0:
        raise ValueError(f"rotation angle must be >= 0 radians, got {angle}")
    if angle == 0 or n == 0:
        return torch.eye(dim, dtype=dtype, device=device).expand(n, dim, dim).clone()
    gauss = torch.randn(n, dim, dim, generator=generator, dtype=torch.float64)
    return rotations_from_gaussian(gauss.to(device), angle).to(dtype)


def rotations_from_gaussian(gauss: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotations ``[..., d, d]`` by ``angle`` from Gaussian matrices ``[..., d, d]`` (one batched QR,
    on whatever device ``gauss`` lives; draw ``gauss`` with seeded CPU generators for determinism)."""
    dim = gauss.shape[-1]
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar measure
    c, s = math.cos(angle), math.sin(angle)
    block = torch.eye(dim, dtype=gauss.dtype, device=gauss.device).expand(gauss.shape).clone()
    even = torch.arange(0, dim - 1, 2, device=gauss.device)
    block[..., even, even] = c
    block[..., even + 1, even + 1] = c
    block[..., even, even + 1] = -s
    block[..., even + 1, even] = s
    return q @ block @ q.transpose(-1, -2)
