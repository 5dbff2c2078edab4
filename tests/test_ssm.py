"""Mamba block: the blocked scan == sequential oracle (values and gradients, any length and block
length, with an initial state), causality, fp32 scan."""
import pytest
import torch

from phaselm.nn import mamba
from phaselm.nn.mamba import (MambaConfig, MambaMixer, _scan_, _SelectiveScan, _sequential_scan, linear_scan,
                              selective_scan, selective_scan_from)


@pytest.mark.parametrize("piece", [None, 5])
@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 64])
def test_parallel_linear_scan_equals_the_loop_both_directions(monkeypatch, length, piece):
    if piece:  # steps in pieces of 5 of the 12 elements of a slab
        monkeypatch.setattr(mamba, "_STEP_ELEMS", piece)
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
    h0 = torch.randn(3, 4, dtype=torch.float64)  # a start state: the same as b_0 + a_0 h0 in place of b_0
    shifted = torch.cat([b[:1] + a[:1] * h0, b[1:]])
    assert torch.allclose(_scan_(a, b.clone(), h0=h0), linear_scan(a, shifted), atol=1e-12)
    shifted = torch.cat([b[:-1], b[-1:] + a[-1:] * h0])
    assert torch.allclose(_scan_(a, b.clone(), reverse=True, h0=h0), _scan_(a, shifted, reverse=True), atol=1e-12)


def scan_inputs(length, bt=2, e=5, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(length, bt, e, dtype=torch.float64, generator=g)
    dtu = torch.randn(length, bt, e, dtype=torch.float64, generator=g)
    A = -torch.rand(e, n, dtype=torch.float64, generator=g)
    B, C = (torch.randn(length, bt, n, dtype=torch.float64, generator=g) for _ in range(2))
    h0 = torch.randn(bt, e, n, dtype=torch.float64, generator=g)
    return [t.requires_grad_() for t in (dt, dtu, A, B, C, h0)]


def use_blocks(monkeypatch, steps, piece=None, bt=2, e=5, n=3):
    """Blocks of ``steps`` time steps for [·, bt, e, n] states, scan steps in pieces of ``piece``."""
    monkeypatch.setattr(mamba, "_BLOCK_ELEMS", steps * bt * e * n)
    if piece:
        monkeypatch.setattr(mamba, "_STEP_ELEMS", piece)


@pytest.mark.parametrize("length, steps, piece", [(1, 1, None), (1, 4, 7), (7, 1, None), (7, 3, None), (13, 4, 7),
                                                  (13, 13, None), (13, 64, 4), (16, 4, None), (1000, 64, None),
                                                  (1000, 7, 8)])
def test_blocked_scan_equals_the_oracle_with_gradients(monkeypatch, length, steps, piece):
    """Values and all gradients (h0 included, from y and from the last state) at block boundaries,
    partial last blocks, one step and one block, with slabs of 30 scanned whole or in pieces."""
    use_blocks(monkeypatch, steps, piece)
    args = scan_inputs(length)
    (y, last), (y_ref, last_ref) = _SelectiveScan.apply(*args), _sequential_scan(*args)
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(last, last_ref, atol=1e-12)
    assert torch.allclose(_SelectiveScan.apply(*args[:5]), _sequential_scan(*args[:5]), atol=1e-12)
    gy, gl = torch.randn_like(y), torch.randn_like(last)
    for loss in (lambda y, last: (y * gy).sum() + (last * gl).sum(), lambda y, last: (y * gy).sum(),
                 lambda y, last: (last * gl).sum()):
        fast, slow = (torch.autograd.grad(loss(*out), args, retain_graph=True, allow_unused=True, materialize_grads=True)
                      for out in ((y, last), (y_ref, last_ref)))
        for x, r in zip(fast, slow):
            assert torch.allclose(x, r, atol=1e-10)


@pytest.mark.parametrize("length, steps, piece", [(7, 3, None), (5, 1, 7), (4, 8, None)])
def test_blocked_scan_gradcheck_with_start_state(monkeypatch, length, steps, piece):
    use_blocks(monkeypatch, steps, piece)
    assert torch.autograd.gradcheck(_SelectiveScan.apply, tuple(scan_inputs(length)))


def test_scan_from_a_state_continues_the_whole_sequence():
    """Decoding in two parts (the second from the first's last state) gives the whole sequence's
    outputs and gradients; gradients reach h0."""
    torch.manual_seed(0)
    u, delta = torch.randn(2, 11, 6, requires_grad=True), (torch.rand(2, 11, 6) * 0.5).requires_grad_()
    A, D = (-torch.rand(6, 3)).requires_grad_(), torch.randn(6, requires_grad=True)
    B, C = torch.randn(2, 11, 3, requires_grad=True), torch.randn(2, 11, 3, requires_grad=True)
    params = [u, delta, A, B, C, D]
    whole = selective_scan(u, delta, A, B, C, D)
    y1, h = selective_scan_from(u[:, :4], delta[:, :4], A, B[:, :4], C[:, :4], D)
    y2, last = selective_scan_from(u[:, 4:], delta[:, 4:], A, B[:, 4:], C[:, 4:], D, h)
    parts = torch.cat([y1, y2], 1)
    assert torch.allclose(parts, whole, atol=1e-5) and last.shape == (2, 6, 3)
    g = torch.randn_like(whole)
    for x, r in zip(torch.autograd.grad((parts * g).sum(), params), torch.autograd.grad((whole * g).sum(), params)):
        assert torch.allclose(x, r, atol=1e-4, rtol=1e-4)
    h0 = torch.randn(2, 6, 3, requires_grad=True)
    y, last = selective_scan_from(u, delta, A, B, C, D, h0)
    dt, bt, ct = delta.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)
    y_ref, last_ref = _sequential_scan(dt, dt * u.transpose(0, 1), A, bt, ct, h0)
    assert torch.allclose(y, y_ref.transpose(0, 1) + u * D, atol=1e-5) and torch.allclose(last, last_ref, atol=1e-5)
    for x, r in zip(torch.autograd.grad(last.sum() + y.sum(), h0), torch.autograd.grad(last_ref.sum() + y_ref.sum(), h0)):
        assert torch.allclose(x, r, atol=1e-4)


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
    ref = torch.nn.Conv1d.forward(m.conv1d, u.transpose(1, 2))[..., :10].transpose(1, 2)  # torch's padded conv
    assert torch.allclose(m.conv1d(u), ref, atol=1e-6)
    assert torch.allclose(m.conv1d(u[:, 6:], past=u[:, :6]), ref[:, 6:], atol=1e-6)  # continued from earlier inputs


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
