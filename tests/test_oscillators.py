"""Kuramoto core: mean-field equals the pairwise sum, causality, physics, circular statistics, controls."""
import math

import pytest
import torch

from phaselm.nn import oscillators as osc


def pairwise(theta, causal):
    """Direct O(T²) reference: (1/n_i) Σ_{j ∈ C(i)} sin(θ_j − θ_i) along axis −2."""
    diff = torch.sin(theta.unsqueeze(-3) - theta.unsqueeze(-2))  # [..., i, j, N] = sin(θ_j − θ_i)
    t = theta.shape[-2]
    mask = torch.tril(torch.ones(t, t)) if causal else torch.ones(t, t)
    return (diff * mask[..., None]).sum(-2) / mask.sum(-1)[:, None]


@pytest.mark.parametrize("causal", [True, False])
def test_mean_field_equals_the_pairwise_sum(causal):
    theta = torch.rand(2, 3, 17, 5, dtype=torch.float64) * 2 * math.pi
    assert torch.allclose(osc.coupling_term(theta, causal=causal), pairwise(theta, causal), atol=1e-12)
    r, psi = osc.mean_field(theta, causal=causal)
    assert torch.allclose(r * torch.sin(psi - theta), pairwise(theta, causal), atol=1e-12)


def test_causal_coupling_never_looks_ahead():
    theta = torch.rand(1, 12, 4) * 6
    out = osc.integrate(theta, 0.3, 2.0, steps=5, integrator="rk4")
    changed = theta.clone()
    changed[:, 7:] = torch.rand(1, 5, 4) * 6
    out2 = osc.integrate(changed, 0.3, 2.0, steps=5, integrator="rk4")
    assert torch.equal(out[:, :7], out2[:, :7])
    assert not torch.allclose(out[:, 7:], out2[:, 7:])


def test_zero_coupling_advances_each_phase_by_omega_t():
    theta = torch.rand(10, 6, dtype=torch.float64)
    omega = torch.randn(10, 6, dtype=torch.float64)
    for method in ("euler", "rk4"):
        out = osc.integrate(theta, omega, 0.0, steps=40, dt=0.05, integrator=method)
        assert torch.allclose(out, theta + omega * 2.0, atol=1e-12)


def test_positive_coupling_pulls_phases_together_and_negative_pushes_apart():
    theta = torch.tensor([[0.0], [0.5]])  # two oscillators along the coupling axis
    together = osc.integrate(theta, 0.0, 1.0, steps=1, causal=False)
    apart = osc.integrate(theta, 0.0, -1.0, steps=1, causal=False)
    gap = lambda t: float(t[1, 0] - t[0, 0])  # noqa: E731
    assert gap(together) < 0.5 < gap(apart)


def test_two_oscillators_match_the_analytic_solution_and_rk4_beats_euler():
    # identical ω = 0, all-to-all: dΔ/dt = −K sin Δ  ⇒  tan(Δ/2) = tan(Δ0/2) e^{−Kt}
    k, d0, steps, dt = 1.5, 2.0, 50, 0.05
    theta = torch.tensor([[0.0], [d0]], dtype=torch.float64)
    exact = 2 * math.atan(math.tan(d0 / 2) * math.exp(-k * steps * dt))
    errs = {}
    for method in ("euler", "rk4"):
        out = osc.integrate(theta, 0.0, k, steps=steps, dt=dt, integrator=method, causal=False)
        errs[method] = abs(float(out[1, 0] - out[0, 0]) - exact)
    assert errs["rk4"] < 1e-7 and errs["euler"] > 100 * errs["rk4"]


def test_synchronisation_above_and_incoherence_below_critical_coupling():
    gen = torch.Generator().manual_seed(0)
    n = 2000
    theta0 = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 * math.pi
    # identical frequencies, K > 0: full synchrony
    same = osc.integrate(theta0, 1.0, 1.0, steps=300, dt=0.1, causal=False)
    assert float(osc.order_parameter(same, dim=0)) > 0.99
    # Gaussian frequencies (σ = 1): g(0) = 1/√(2π), K_c = 2/(π g(0)) ≈ 1.60
    omega = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    kc = osc.critical_coupling(1 / math.sqrt(2 * math.pi))
    assert kc == pytest.approx(1.596, abs=1e-3)
    low = osc.integrate(theta0, omega, 0.3 * kc, steps=400, dt=0.1, causal=False)
    high = osc.integrate(theta0, omega, 3.0 * kc, steps=400, dt=0.1, causal=False)
    assert float(osc.order_parameter(low, dim=0)) < 0.15
    assert float(osc.order_parameter(high, dim=0)) > 0.8


def test_order_parameter_uses_circular_statistics():
    gen = torch.Generator().manual_seed(1)
    random = torch.rand(20000, generator=gen) * 2 * math.pi - math.pi
    assert float(osc.order_parameter(random)) < 0.03  # random phases: R ≈ 0 (not 0.88)
    near_pi = torch.tensor([math.pi - 0.01, -math.pi + 0.01])  # close on the circle, far apart linearly
    assert float(osc.order_parameter(near_pi)) > 0.99
    both = torch.rand(3, 4, 5)
    assert osc.order_parameter(both, dim=(0, 2)).shape == (4,)


def test_regulariser_gradient_reaches_the_phase_parameters():
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 16)
    x = torch.randn(4, 10, 8)
    theta = math.pi * torch.tanh(proj(x))  # [B, T, N]
    theta = osc.integrate(theta, 0.1, 2.0, steps=3)
    r = osc.order_parameter(theta, dim=-1)
    for mode in ("ceiling", "center", "band"):
        proj.zero_grad()
        pen = osc.coherence_penalty(r, mode=mode, target=0.05, width=0.01)
        assert pen.item() > 0
        pen.backward(retain_graph=True)
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0, mode


def test_noise_and_jitter_act_and_are_seeded():
    theta = torch.zeros(50, 1)
    a = osc.integrate(theta, 0.0, 1.0, steps=5, causal=False, noise_std=0.3, generator=torch.Generator().manual_seed(2))
    b = osc.integrate(theta, 0.0, 1.0, steps=5, causal=False, noise_std=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and float(osc.order_parameter(a, dim=0)) < 1.0
    omega = torch.zeros(100)
    assert osc.jitter_frequencies(omega, 0.02, torch.Generator().manual_seed(0)).std() > 0.01
    with pytest.raises(ValueError, match="integrator"):
        osc.integrate(theta, 0.0, 1.0, integrator="heun")


def test_coherence_penalty_refuses_phases_passed_as_order_parameters():
    theta = torch.tensor([[0.3, 2.5, -2.0]])  # phases in radians, as the PhaseGPT seed passed them
    with pytest.raises(ValueError, match="order parameters R in \\[0, 1\\].*order_parameter"):
        osc.coherence_penalty(theta)
    assert float(osc.coherence_penalty(osc.order_parameter(theta, dim=-1))) >= 0
