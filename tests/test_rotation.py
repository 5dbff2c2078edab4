import math

import pytest
import torch

from phaselm.sampling.rotation import random_rotations


@pytest.mark.parametrize("dim", [64, 8, 7])
def test_rotation_is_exactly_orthogonal_and_preserves_norms(dim):
    rot = random_rotations(5, dim, 0.3, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(dim).expand(5, dim, dim)
    assert torch.allclose(rot.transpose(-1, -2) @ rot, eye, atol=1e-6)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(5), atol=1e-5)  # proper rotation
    v = torch.randn(5, 100, dim)
    rotated = v @ rot.transpose(-1, -2)
    assert torch.allclose(rotated.norm(dim=-1), v.norm(dim=-1), rtol=1e-6, atol=1e-6)


def test_every_vector_turns_by_exactly_the_angle_in_even_dimension():
    angle = 0.7
    rot = random_rotations(3, 64, angle, generator=torch.Generator().manual_seed(1)).double()
    v = torch.randn(3, 50, 64, dtype=torch.float64)
    cos = ((v @ rot.transpose(-1, -2)) * v).sum(-1) / v.norm(dim=-1) ** 2
    assert torch.allclose(cos, torch.full_like(cos, math.cos(angle)), atol=1e-6)


def test_zero_angle_is_exact_identity_and_seeded_draws_repeat():
    assert torch.equal(random_rotations(2, 16, 0.0), torch.eye(16).expand(2, 16, 16))
    a = random_rotations(2, 16, 0.1, generator=torch.Generator().manual_seed(5))
    b = random_rotations(2, 16, 0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="angle"):
        random_rotations(1, 4, -0.1)
