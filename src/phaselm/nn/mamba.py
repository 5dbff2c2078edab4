"""A pure-PyTorch Mamba (selective state-space) block, with a parallel and a sequential scan.

The block, for ``x [B, L, D]`` (E = ``expand``·D inner channels, N = ``d_state``, R = ``dt_rank``):

    x_in, z = in_proj(x).chunk(2)                         # [B, L, E] each
    u = SiLU(causal depthwise conv1d_k(x_in))             # kernel k = d_conv, left padding only
    Δ_raw, B, C = x_proj(u).split(R, N, N)                # [B, L, R], [B, L, N], [B, L, N]
    Δ = softplus(dt_proj(Δ_raw))                          # [B, L, E], > 0
    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t ⊙ u_t) B_tᵀ         # h [B, E, N], A = −exp(A_log) [E, N]
    y_t = h_t C_t + D ⊙ u_t                               # [B, E]
    out = out_proj(y ⊙ SiLU(z))                           # [B, L, D]

Incremental decoding keeps, per block, the last ``d_conv`` conv inputs ``[B, E, d_conv]`` and the
SSM state h ``[B, E, N]`` in a transformers cache (``cache.update_conv_state`` /
``update_recurrent_state``, the layout of transformers' own Mamba); new tokens continue from them
(:func:`selective_scan_from`, one step of the recurrence for one token), giving what the full
sequence gives. Padding tokens (``valid`` = 0) are zeroed before the conv and after it, so they
leave h unchanged: a left-padded row computes what the row without padding computes.

The recurrence h_t = a_t h_{t−1} + b_t is a first-order linear scan. :func:`selective_scan` runs it
either as a work-efficient parallel (Blelloch up-/down-sweep, log₂L steps on whole tensors) scan
with an analytic backward pass (the adjoint g_t = ∂ℓ/∂h_t + a_{t+1} g_{t+1} is the same scan run
backwards; ∂ℓ/∂b_t = g_t, ∂ℓ/∂a_t = g_t h_{t−1}), or as the sequential loop (the test oracle).
With ``mamba_ssm`` installed and the tensors on a GPU, ``scan="auto"`` uses its CUDA kernel. The
scan always runs in float32 (A_log, D and Δ stay fp32 under autocast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional CUDA kernels (pip install mamba-ssm on a GPU machine)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_cuda_scan
except Exception:  # noqa: BLE001 - any import problem means: not available
    _mamba_cuda_scan = None

SCANS = ("auto", "parallel", "sequential", "cuda")


@dataclass
class MambaConfig:
    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    bias: bool = False
    scan: str = "auto"  # auto | parallel | sequential | cuda

    def __post_init__(self):
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")
        for key in ("d_model", "d_state", "d_conv", "expand"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


# ---------------------------------------------------------------------------------------------- scans
def _blelloch_(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> None:
    """In place: b ← inclusive scan of h_t = a_t h_{t−1} + b_t along the first axis, whose length
    is a power of two (``reverse``: h_t = a_t h_{t+1} + b_t, from the end); ``a`` is overwritten
    with partial products. Time is the outermost axis, so every operation acts on whole contiguous
    slabs of the other axes. Up-sweep, then down-sweep: 2·log₂L steps, O(L) work."""
    length = b.shape[0]
    levels = length.bit_length() - 1
    for d in range(levels):  # up-sweep: in each block of s, the last node absorbs the middle one
        s = 2 ** (d + 1)
        dst, src = (0, s // 2) if reverse else (s - 1, s // 2 - 1)
        av, bv = a.unflatten(0, (length // s, s)), b.unflatten(0, (length // s, s))
        bv[:, dst].addcmul_(av[:, dst], bv[:, src])
        av[:, dst].mul_(av[:, src])
    for d in range(levels - 2, -1, -1):  # down-sweep: the middle of each block takes the prefix before it
        s = 2 ** (d + 1)
        n = length // s - 1
        if n == 0:
            continue
        start, dst, src = (1, s // 2 - 1, s - 1) if reverse else (s - 1, s // 2, 0)
        av = a.narrow(0, start, n * s).unflatten(0, (n, s))
        bv = b.narrow(0, start, n * s).unflatten(0, (n, s))
        bv[:, dst].addcmul_(av[:, dst], bv[:, src])


def _scan_(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Inclusive linear scan along the first axis (any length), overwriting ``a`` and ``b`` (padded
    copies when the length is not a power of two); returns the states."""
    length = b.shape[0]
    size = 1 << max(0, (length - 1).bit_length())
    if size != length:
        pad = size - length
        a = torch.cat([a, a.new_ones(pad, *a.shape[1:])] if not reverse else [a.new_ones(pad, *a.shape[1:]), a])
        b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])] if not reverse else [b.new_zeros(pad, *b.shape[1:]), b])
        _blelloch_(a, b, reverse)
        return b[:length] if not reverse else b[pad:]
    _blelloch_(a, b, reverse)
    return b


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t ⊙ h_{t−1} + b_t along the first axis (h_{−1} = 0), ``[L, ...]``: the parallel scan
    on copies of the inputs (no autograd)."""
    return _scan_(a.clone(), b.clone())


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t·h_t with h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_tᵀ, time-first tensors.

    Backward by hand (so only h is kept): with g the adjoint (g_t = C_t dy_t + a_{t+1} g_{t+1}, the
    same scan run from the end) and a_t h_{t−1} = h_t − b_t,
    ∂Δ = Σ_n g (h − b) A + (g·B) u,  ∂A = Σ_{t,b} g (h − b) Δ,  ∂u = (g·B) Δ,
    ∂B = Σ_e g Δu,  ∂C = Σ_e dy h.
    """

    @staticmethod
    def forward(ctx, dt, dtu, A, B, C):
        # dt, dtu [L, Bt, E]; A [E, N]; B, C [L, Bt, N]
        a = (dt[..., None] * A).exp_()
        b = dtu[..., None] * B[:, :, None, :]  # Δu ⊗ B
        h = _scan_(a, b)  # [L, Bt, E, N]
        ctx.save_for_backward(dt, dtu, A, B, C, h)
        return (h @ C[..., None])[..., 0]

    @staticmethod
    def backward(ctx, dy):
        dt, dtu, A, B, C, h = ctx.saved_tensors
        m = torch.empty_like(h)
        torch.exp(dt[1:, ..., None] * A, out=m[:-1])  # a_{t+1}, 0 after the end
        m[-1] = 0
        g = _scan_(m, dy[..., None] * C[:, :, None, :], reverse=True)
        del m
        w = torch.addcmul(h, dtu[..., None], B[:, :, None, :], value=-1).mul_(g)  # (h_t − b_t) g_t = a_t h_{t−1} g_t
        d_A = (w * dt[..., None]).sum((0, 1))
        d_dt = w.mul_(A).sum(-1)
        del w
        d_dtu = (g @ B[..., None])[..., 0]  # Σ_n g B
        d_B = (dtu[:, :, None, :] @ g)[:, :, 0, :]  # Σ_e Δu g
        d_C = (dy[:, :, None, :] @ h)[:, :, 0, :]  # Σ_e dy h
        return d_dt, d_dtu, d_A, d_B, d_C


def _sequential_scan(dt, dtu, A, B, C):
    """The same as :class:`_SelectiveScan`, as a plain loop through autograd: the test oracle."""
    h = torch.zeros(dt.shape[1:] + A.shape[-1:], dtype=dt.dtype, device=dt.device)
    ys = []
    for t in range(dt.shape[0]):
        h = torch.exp(dt[t, ..., None] * A) * h + dtu[t, ..., None] * B[t, :, None, :]
        ys.append((h @ C[t, :, :, None])[..., 0])
    return torch.stack(ys)


def selective_scan(u, delta, A, B, C, D, scan: str = "parallel") -> torch.Tensor:
    """The selective scan y = SSM(A, B, C, D)(u) with step sizes Δ, in float32.

    ``u``, ``delta`` ``[Bt, L, E]``; ``A`` ``[E, N]``; ``B``, ``C`` ``[Bt, L, N]``; ``D`` ``[E]``
    → ``y [Bt, L, E]``. ``scan``: ``parallel`` (default), ``sequential`` (oracle), ``cuda``
    (mamba_ssm kernels) or ``auto`` (cuda when available for these tensors, else parallel).
    """
    if scan == "auto":
        scan = "cuda" if (_mamba_cuda_scan is not None and u.is_cuda) else "parallel"
    if scan == "cuda":
        if _mamba_cuda_scan is None or not u.is_cuda:
            raise RuntimeError("scan='cuda' needs the mamba_ssm package and CUDA tensors; use scan='parallel'")
        y = _mamba_cuda_scan(u.float().transpose(1, 2).contiguous(), delta.float().transpose(1, 2).contiguous(),
                             A.float(), B.float().transpose(1, 2).contiguous(), C.float().transpose(1, 2).contiguous(),
                             D.float())
        return y.transpose(1, 2)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
        dt, bt, ct = delta.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)  # time first
        dtu = dt * u.transpose(0, 1)
        if scan == "parallel":
            y = _SelectiveScan.apply(dt.contiguous(), dtu.contiguous(), A, bt.contiguous(), ct.contiguous())
        else:
            y = _sequential_scan(dt, dtu, A, bt, ct)
        return y.transpose(0, 1) + u * D


def selective_scan_from(u, delta, A, B, C, D, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan continued from state ``h0 [Bt, E, N]`` (None: zeros), in float32, for
    decoding: ``(y [Bt, L, E], h_L [Bt, E, N])``. h_t = a_t h_{t−1} + b_t with h_{−1} = h0 is the
    zero-start scan with b_0 + a_0 h0 in place of b_0; one token is one step of the recurrence.
    Differentiable through the sequential loop when gradients are on, else the parallel scan."""
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
        dt, bt, ct = delta.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)  # time first
        a = torch.exp(dt[..., None] * A)  # [L, Bt, E, N]
        b = (dt * u.transpose(0, 1))[..., None] * bt[:, :, None, :]
        if h0 is not None:
            b = torch.cat([b[:1] + a[:1] * h0.float(), b[1:]])
        if a.shape[0] == 1:
            h = b
        elif torch.is_grad_enabled():
            h, prev = [], torch.zeros_like(b[0])
            for t in range(a.shape[0]):
                prev = a[t] * prev + b[t]
                h.append(prev)
            h = torch.stack(h)
        else:
            h = _scan_(a, b)
        y = (h @ ct[..., None])[..., 0].transpose(0, 1) + u * D
        return y, h[-1]


# ---------------------------------------------------------------------------------------------- block
class MambaMixer(nn.Module):
    """The Mamba mixer: ``x [B, L, d_model]`` → ``[B, L, d_model]`` (see the module docstring)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * e, bias=cfg.bias)
        self.conv1d = nn.Conv1d(e, e, kernel_size=cfg.d_conv, groups=e, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.bias)
        self.reset_dt_parameters()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))  # [E, N]
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(e))

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """Mamba's Δ initialisation: softplus(dt_proj bias) log-uniform in [dt_min, dt_max]; call it
        again after a model-wide weight init."""
        cfg, e = self.cfg, self.cfg.d_inner
        dt = torch.exp(torch.rand(e) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.uniform_(self.dt_proj.weight, -cfg.dt_rank ** -0.5, cfg.dt_rank ** -0.5)

    def causal_conv(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise causal conv1d of ``x [B, L, E]``: out_t = bias + Σ_i w_i ⊙ x_{t−k+1+i}, as k
        shifted multiply-adds (the same result as ``self.conv1d`` cropped to L, whose CPU backward
        is orders of magnitude slower). ``past [B, P, E]``: earlier inputs (zeros if None)."""
        k, length = self.cfg.d_conv, x.shape[1]
        if past is not None and past.shape[1]:
            past = past[:, -(k - 1):] if k > 1 else past[:, :0]
            xp = torch.cat([F.pad(past, (0, 0, k - 1 - past.shape[1], 0)), x], dim=1)
        else:
            xp = F.pad(x, (0, 0, k - 1, 0))
        w = self.conv1d.weight[:, 0, :]  # [E, k]
        out = self.conv1d.bias + xp[:, :length] * w[:, 0]
        for i in range(1, k):
            out = out + xp[:, i: i + length] * w[:, i]
        return out

    def forward(self, x: torch.Tensor, cache=None, layer_idx: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, d_model]`` → ``[B, L, d_model]``; with a transformers ``cache``, continue from
        (and update) layer ``layer_idx``'s conv and SSM state; ``valid [B, L]`` marks real tokens."""
        cfg = self.cfg
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, E]
        if valid is not None:
            x_in = x_in * valid[..., None].to(x_in.dtype)
        if cache is None:
            u = F.silu(self.causal_conv(x_in))
        else:
            # the cached conv inputs followed by the new ones, [B, E, past + L] (the cache keeps the last d_conv)
            full = cache.update_conv_state(x_in.transpose(1, 2), layer_idx, conv_kernel_size=cfg.d_conv)
            past = full[..., : full.shape[-1] - x_in.shape[1]].transpose(1, 2)
            u = F.silu(self.causal_conv(x_in, past))
        if valid is not None:
            u = u * valid[..., None].to(u.dtype)
        dt_raw, B, C = self.x_proj(u).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_raw).float())
        A = -torch.exp(self.A_log.float())
        if cache is None:
            y = selective_scan(u, delta, A, B, C, self.D, scan=cfg.scan)
        else:
            y, h = selective_scan_from(u, delta, A, B, C, self.D, cache.get_recurrent_state(layer_idx))
            cache.update_recurrent_state(h, layer_idx)
        return self.out_proj((y * F.silu(z.float())).to(x.dtype))
