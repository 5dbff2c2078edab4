"""Mamba block: parallel scan == sequential oracle (values and gradients), causality, fp32 scan."""
import pytest
import torch

from phaselm.nn.mamba import MambaConfig, MambaMixer, _scan_, _SelectiveScan, _sequential_scan, linear_scan, selective_scan


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 64])
def test_parallel_linear_scan_equals_the_loop_both_directions(length):
    torch.manual_seed(length)
    a, b = torch.rand(length, 3, 4, dtype=torch.float64), torch.randn(length, 3, 4, dtype=torch.float64)
    h, ref = linear_scan(a, b), []
    state = torch.zeros(3, 4, dtype=torch.float64)
    for t in range(length):
        state = a[t] * state + b[t]
        ref.append(state)
    assert torch.allclose(h, torch.stack(ref), atol=1e-12)
    backwards = _scan_(a.clone(), b.clone(), reverse=True)
    assert torch.allclose(backwards, linear_scan(a.flip(0), b.flip(0)).flip(0), atol=1e-12)


@pytest.mark.parametrize("length", [7, 16])
def test_selective_scan_backward_is_exact(length):
    torch.manual_seed(0)
    bt, e, n = 2, 5, 3
    dt = torch.rand(length, bt, e, dtype=torch.float64, requires_grad=True)
    dtu = torch.randn(length, bt, e, dtype=torch.float64, requires_grad=True)
    A = (-torch.rand(e, n, dtype=torch.float64)).requires_grad_()
    B, C = (torch.randn(length, bt, n, dtype=torch.float64, requires_grad=True) for _ in range(2))
    args = (dt, dtu, A, B, C)
    assert torch.autograd.gradcheck(_SelectiveScan.apply, args)
    fast, slow = _SelectiveScan.apply(*args), _sequential_scan(*args)
    assert torch.allclose(fast, slow, atol=1e-12)
    g = torch.randn_like(fast)
    for x, y in zip(torch.autograd.grad((fast * g).sum(), args), torch.autograd.grad((slow * g).sum(), args)):
        assert torch.allclose(x, y, atol=1e-10)


def mixer(scan="parallel", d=16):
    torch.manual_seed(0)
    return MambaMixer(MambaConfig(d_model=d, d_state=4, scan=scan))


def test_mamba_block_parallel_equals_sequential_with_gradients():
    fast, slow = mixer("parallel"), mixer("sequential")
    x = torch.randn(2, 19, 16, requires_grad=True)
    yf, ys = fast(x), slow(x)
    assert torch.allclose(yf, ys, atol=1e-5)
    gf = torch.autograd.grad(yf.square().sum(), [x, *fast.parameters()])
    gs = torch.autograd.grad(ys.square().sum(), [x, *slow.parameters()])
    for a, b in zip(gf, gs):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_mamba_block_is_causal_and_conv_matches_conv1d():
    m = mixer()
    x = torch.randn(1, 20, 16)
    y = x.clone()
    y[:, 9:] = torch.randn(1, 11, 16)
    assert torch.allclose(m(x)[:, :9], m(y)[:, :9], atol=1e-6)
    u = torch.randn(2, 10, m.cfg.d_inner)
    ref = m.conv1d(u.transpose(1, 2))[..., :10].transpose(1, 2)
    assert torch.allclose(m.causal_conv(u), ref, atol=1e-6)


def test_scan_runs_in_float32_under_bfloat16_inputs():
    torch.manual_seed(0)
    u, delta = torch.randn(1, 6, 4).bfloat16(), torch.rand(1, 6, 4).bfloat16()
    A, B, C, D = -torch.rand(4, 2), torch.randn(1, 6, 2).bfloat16(), torch.randn(1, 6, 2).bfloat16(), torch.ones(4)
    y = selective_scan(u, delta, A, B, C, D)
    assert y.dtype == torch.float32
    ref = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), D, scan="sequential")
    assert torch.allclose(y, ref, atol=1e-5)


def test_bad_scan_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="scan must be one of"):
        MambaConfig(d_model=8, scan="fast")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        selective_scan(torch.zeros(1, 2, 2), torch.ones(1, 2, 2), -torch.ones(2, 1), torch.zeros(1, 2, 1),
                       torch.zeros(1, 2, 1), torch.ones(2), scan="cuda")
