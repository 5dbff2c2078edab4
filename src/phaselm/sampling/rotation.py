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
    eye = torch.eye(dim, dtype=torch.float64).expand(n, dim, dim)
    if angle == 0 or n == 0:
        return eye.to(dtype=dtype, device=device).clone()
    gauss = torch.randn(n, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar measure
    c, s = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
    block = eye.clone()
    even = torch.arange(0, dim - 1, 2)
    block[:, even, even] = c
    block[:, even + 1, even + 1] = c
    block[:, even, even + 1] = -s
    block[:, even + 1, even] = s
    rot = q @ block @ q.transpose(-1, -2)
    return rot.to(dtype=dtype, device=device)
