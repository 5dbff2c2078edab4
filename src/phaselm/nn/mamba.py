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
either with an analytic backward pass (:class:`_SelectiveScan`; the adjoint g_t = ∂ℓ/∂h_t +
a_{t+1} g_{t+1} is the same scan run backwards; ∂ℓ/∂b_t = g_t, ∂ℓ/∂a_t = g_t h_{t−1}), or as the
sequential loop through autograd (the test oracle). The fast path is parallel across the batch,
channel and state axes and sequential in time: time is the outermost axis, so each step is one
multiply-add on a contiguous ``[Bt, N, E]`` slab, which reads each tensor once, for any length. It
goes through the sequence in blocks of T steps (on the CPU T·Bt·N·E ≈ ``_BLOCK_ELEMS``: buffers that
stay in cache, and few enough blocks that per-call overheads stay small), computing a = exp(ΔA),
b = Δu ⊗ B, the scan and y = Σ_n C h per block in reused buffers; no tensor of the full
``[L, Bt, N, E]`` size is made. The forward keeps only the state before each block; the backward
recomputes each block from it and computes all gradients there. With ``mamba_ssm`` installed and
the tensors on a GPU, ``scan="auto"`` uses its CUDA kernel. The scan always runs in float32 (A_log,
D and Δ stay fp32 under autocast).
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
_BLOCK_ELEMS = 1 << 19  # state elements per time block on the CPU (2 MiB buffers in float32; the backward
# keeps four, so two training processes stay inside a 32 MiB L3: benchmarks/scan_block_speed.py)
_STEP_ELEMS = 1 << 15  # on the CPU, a step of the scan acts on pieces of at most this many elements


def _scan_(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, h0: torch.Tensor | None = None) -> torch.Tensor:
    """In place: b ← h with h_t = a_t ⊙ h_{t−1} + b_t along the first axis, h_{−1} = ``h0`` (None:
    0); ``reverse``: h_t = a_t ⊙ h_{t+1} + b_t from the end, h_L = ``h0``. Returns ``b`` (which
    must be contiguous after the first axis); ``a`` is not changed.

    A loop over time of whole-slab multiply-adds (time is the outermost axis, so each step acts on
    one contiguous slab): one pass over each tensor, any length, no padding. On the CPU the slab is
    cut into pieces of at most ``_STEP_ELEMS`` (ATen's grain size), which run on the calling
    thread: a larger step would be shared out to the thread pool, a synchronisation per step that
    costs more than the step itself and, on a busy machine, waits for the scheduler."""
    length, width = b.shape[0], math.prod(b.shape[1:])
    a, b_flat = a.reshape(length, width), b.view(length, width)
    h0 = None if h0 is None else h0.reshape(width)
    piece = _STEP_ELEMS if b.device.type == "cpu" else width
    for lo in range(0, width, piece):
        cols = slice(lo, lo + piece)
        prev = None if h0 is None else h0[cols]
        steps = zip(a[:, cols].unbind(0), b_flat[:, cols].unbind(0))
        for at, bt in (reversed(list(steps)) if reverse else steps):
            if prev is not None:
                bt.addcmul_(at, prev)
            prev = bt
    return b


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t ⊙ h_{t−1} + b_t along the first axis (h_{−1} = 0), ``[L, ...]``, on a copy of ``b``
    (no autograd)."""
    return _scan_(a, b.clone())


def _block_length(dt: torch.Tensor, n: int) -> int:
    """Time steps per block: on the CPU as many as fit ``_BLOCK_ELEMS`` state elements, elsewhere
    the whole sequence."""
    length, slab = dt.shape[0], dt.shape[1] * dt.shape[2] * n
    return max(1, min(length, _BLOCK_ELEMS // slab)) if dt.device.type == "cpu" else length


class _SelectiveScan(torch.autograd.Function):
    """y_t = Σ_n C_t h_t with h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_t, time-first tensors, in
    blocks of T time steps whose buffers are reused (no tensor of the full ``[L, Bt, N, E]`` size
    is made); ``h0`` given: h_{−1} = h0 and the last state is returned too.

    Forward keeps only the state before each block (checkpoints, ``[L/T + 1, Bt, N, E]``); the
    backward runs the blocks from the end, recomputes a, b and h of each from its checkpoint, and
    runs the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} (g_{L−1} gets ∂ℓ/∂h_L) through the block; the
    carry a_T g_T passes to the block before, and from the first block it is ∂ℓ/∂h0. With
    w = a_t h_{t−1} g_t (= ∂ℓ/∂ log a_t):
    ∂Δ = Σ_n w A,  ∂A = Σ_{t,b} w Δ,  ∂(Δu) = Σ_n g B,  ∂B = Σ_e g Δu,  ∂C = Σ_e dy h.
    """

    @staticmethod
    def forward(ctx, dt, dtu, A, B, C, h0=None):
        # dt, dtu [L, Bt, E]; A [E, N]; B, C [L, Bt, N]; h0 [Bt, E, N]; the state is kept as [Bt, N, E]
        length, bt, e = dt.shape
        n, At = A.shape[-1], A.t().contiguous()
        T = _block_length(dt, n)
        starts = range(0, length, T)
        ckpt = dt.new_empty(len(starts) + 1, bt, n, e)  # ckpt[k]: the state before block k
        ckpt[0] = 0 if h0 is None else h0.transpose(-1, -2)
        a_buf, h_buf = dt.new_empty(2, T, bt, n, e)
        y = dt.new_empty(length, bt, 1, e)
        for k, s in enumerate(starts):
            blk = slice(s, s + T)
            m = len(range(length)[blk])
            a = torch.mul(dt[blk, :, None, :], At, out=a_buf[:m]).exp_()
            h = torch.mul(dtu[blk, :, None, :], B[blk, :, :, None], out=h_buf[:m])  # b = Δu ⊗ B
            _scan_(a, h, h0=ckpt[k])
            torch.matmul(C[blk, :, None, :], h, out=y[blk])  # Σ_n C h
            ckpt[k + 1] = h[-1]
        ctx.block = T
        ctx.with_h0 = h0 is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(dt, dtu, A, B, C, ckpt)
        y = y[:, :, 0]
        return y if h0 is None else (y, ckpt[-1].transpose(-1, -2).clone())

    @staticmethod
    def backward(ctx, dy, d_last=None):
        dt, dtu, A, B, C, ckpt = ctx.saved_tensors
        length, bt, e = dt.shape
        n, At, T = A.shape[-1], A.t().contiguous(), ctx.block
        if dy is None:
            dy = dt.new_zeros(length, bt, e)
        a_buf, g_buf, acc = dt.new_empty(3, T, bt, n, e)
        h_buf = dt.new_empty(T + 1, bt, n, e)  # row 0: the state before the block, then h
        acc.zero_()  # Σ over blocks of w Δ
        d_dt, d_dtu = dt.new_empty(2, length, bt, 1, e)
        d_B, d_C = dt.new_empty(2, length, bt, 1, n)
        carry = None if d_last is None else d_last.transpose(-1, -2)  # a_{t+1} g_{t+1} after the block
        for k in range(len(ckpt) - 2, -1, -1):
            blk = slice(k * T, (k + 1) * T)
            m = len(range(length)[blk])
            a = torch.mul(dt[blk, :, None, :], At, out=a_buf[:m]).exp_()
            h = torch.mul(dtu[blk, :, None, :], B[blk, :, :, None], out=h_buf[1:m + 1])
            h_buf[0] = ckpt[k]
            _scan_(a, h, h0=h_buf[0])
            g = torch.mul(dy[blk, :, None, :], C[blk, :, :, None], out=g_buf[:m])  # C dy
            if carry is not None:
                g[-1] += carry
            _scan_(a[1:], g[:-1], reverse=True, h0=g[-1])
            carry = a[0] * g[0]
            torch.matmul(dy[blk, :, None, :], h.transpose(-1, -2), out=d_C[blk])  # Σ_e dy h
            torch.matmul(dtu[blk, :, None, :], g.transpose(-1, -2), out=d_B[blk])  # Σ_e Δu g
            torch.matmul(B[blk, :, None, :], g, out=d_dtu[blk])  # Σ_n g B
            w = a.mul_(g).mul_(h_buf[:m])  # a_t h_{t−1} g_t
            acc[:m].addcmul_(w, dt[blk, :, None, :])
            torch.sum(w.mul_(At), 2, keepdim=True, out=d_dt[blk])  # Σ_n w A
        d_A = acc.sum((0, 1)).t()
        grads = (d_dt[:, :, 0], d_dtu[:, :, 0], d_A, d_B[:, :, 0], d_C[:, :, 0])
        if ctx.with_h0:
            grads += (None if carry is None else carry.transpose(-1, -2),)
        return grads


def _sequential_scan(dt, dtu, A, B, C, h0=None):
    """The same as :class:`_SelectiveScan`, as a plain loop through autograd: the test oracle."""
    h = torch.zeros(dt.shape[1:] + A.shape[-1:], dtype=dt.dtype, device=dt.device) if h0 is None else h0
    ys = []
    for t in range(dt.shape[0]):
        h = torch.exp(dt[t, ..., None] * A) * h + dtu[t, ..., None] * B[t, :, None, :]
        ys.append((h @ C[t, :, :, None])[..., 0])
    return torch.stack(ys) if h0 is None else (torch.stack(ys), h)


def _tracing() -> bool:
    """Whether ``torch.export`` or ``torch.jit.trace`` is recording: they cannot record the in-place
    (``out=``) writes of :class:`_SelectiveScan`, so the scan is then recorded as the sequential loop
    (the same recurrence, one step per time step; ``torch.compile`` keeps the fast scan)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _time_first(u, delta, A, B, C, D):
    """float32 copies; Δ, Δu, B, C time first and contiguous (``[L, Bt, ·]``)."""
    u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
    dt = delta.transpose(0, 1).contiguous()
    dtu = (dt * u.transpose(0, 1)).contiguous()
    return u, dt, dtu, A, B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous(), D


def selective_scan(u, delta, A, B, C, D, scan: str = "parallel") -> torch.Tensor:
    """The selective scan y = SSM(A, B, C, D)(u) with step sizes Δ, in float32.

    ``u``, ``delta`` ``[Bt, L, E]``; ``A`` ``[E, N]``; ``B``, ``C`` ``[Bt, L, N]``; ``D`` ``[E]``
    → ``y [Bt, L, E]``. ``scan``: ``parallel`` (default: :class:`_SelectiveScan`), ``sequential``
    (oracle), ``cuda`` (mamba_ssm kernels) or ``auto`` (cuda when available for these tensors, else
    parallel).
    """
    if scan == "auto":
        scan = "cuda" if (_mamba_cuda_scan is not None and u.is_cuda) else "parallel"
    if scan == "parallel" and _tracing():
        scan = "sequential"
    if scan == "cuda":
        if _mamba_cuda_scan is None or not u.is_cuda:
            raise RuntimeError("scan='cuda' needs the mamba_ssm package and CUDA tensors; use scan='parallel'")
        y = _mamba_cuda_scan(u.float().transpose(1, 2).contiguous(), delta.float().transpose(1, 2).contiguous(),
                             A.float(), B.float().transpose(1, 2).contiguous(), C.float().transpose(1, 2).contiguous(),
                             D.float())
        return y.transpose(1, 2)
    with torch.autocast(u.device.type, enabled=False):
        u, dt, dtu, A, bt, ct, D = _time_first(u, delta, A, B, C, D)
        y = (_SelectiveScan.apply if scan == "parallel" else _sequential_scan)(dt, dtu, A, bt, ct)
        return y.transpose(0, 1) + u * D


def selective_scan_from(u, delta, A, B, C, D, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan continued from state ``h0 [Bt, E, N]`` (None: zeros), in float32, for
    decoding: ``(y [Bt, L, E], h_L [Bt, E, N])``, with h_{−1} = h0. Differentiable, h0 included
    (:class:`_SelectiveScan`; one token is one step of the recurrence, :func:`_sequential_scan`)."""
    with torch.autocast(u.device.type, enabled=False):
        u, dt, dtu, A, bt, ct, D = _time_first(u, delta, A, B, C, D)
        if h0 is None:
            h0 = dt.new_zeros(dt.shape[1:] + A.shape[-1:])
        scan = _sequential_scan if dt.shape[0] == 1 or _tracing() else _SelectiveScan.apply
        y, h = scan(dt, dtu, A, bt, ct, h0.float())
        return y.transpose(0, 1) + u * D, h


# ---------------------------------------------------------------------------------------------- block
class CausalConv1d(nn.Conv1d):
    """Mamba's depthwise causal convolution over time, ``weight [E, 1, k]``, ``bias [E]`` (the
    parameters and initialisation of ``nn.Conv1d(E, E, k, groups=E, padding=k − 1)``).

    ``forward(x [B, L, E], past [B, P, E] | None)`` → ``[B, L, E]``: out_t = bias + Σ_i w_i ⊙ x_{t−k+1+i},
    as k shifted multiply-adds (the same result as the padded ``nn.Conv1d`` cropped to L, whose CPU
    backward is orders of magnitude slower); ``past`` holds earlier inputs (zeros if None). The weights
    are read inside this module's own forward, so hooks on it (accelerate's offload, PEFT) run.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__(channels, channels, kernel_size=kernel, groups=channels, padding=kernel - 1)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        k, length = self.kernel_size[0], x.shape[1]
        if past is not None and past.shape[1]:
            past = past[:, -(k - 1):] if k > 1 else past[:, :0]
            xp = torch.cat([F.pad(past, (0, 0, k - 1 - past.shape[1], 0)), x], dim=1)
        else:
            xp = F.pad(x, (0, 0, k - 1, 0))
        w = self.weight[:, 0, :]  # [E, k]
        out = self.bias + xp[:, :length] * w[:, 0]
        for i in range(1, k):
            out = out + xp[:, i: i + length] * w[:, i]
        return out

    def step(self, x: torch.Tensor, cache=None, layer_idx: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` of ``x [B, L, E]`` with padding (``valid [B, L]`` = 0) zeroed first, so it
        leaves no trace in later outputs; with a transformers ``cache``, continuing from (and
        updating) layer ``layer_idx``'s conv state, its last k inputs ``[B, E, k]``."""
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        if cache is None:
            return self(x)
        # the cached inputs followed by the new ones, [B, E, past + L] (the cache keeps the last k)
        full = cache.update_conv_state(x.transpose(1, 2), layer_idx, conv_kernel_size=self.kernel_size[0])
        return self(x, full[..., : full.shape[-1] - x.shape[1]].transpose(1, 2))


class MambaMixer(nn.Module):
    """The Mamba mixer: ``x [B, L, d_model]`` → ``[B, L, d_model]`` (see the module docstring)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * e, bias=cfg.bias)
        self.conv1d = CausalConv1d(e, cfg.d_conv)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.bias)
        self.reset_dt_parameters()
        self.A_log = nn.Parameter(self.initial_value("A_log"))  # [E, N]
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(self.initial_value("D"))

    def initial_value(self, name: str) -> torch.Tensor:
        """A_log[e, n] = log(n + 1) (S4D-real: A = −(1, 2, …, N) in every channel) ``[E, N]``; D = 1 ``[E]``."""
        e, n = self.cfg.d_inner, self.cfg.d_state
        if name == "A_log":
            return torch.log(torch.arange(1, n + 1, dtype=torch.float64)).float().repeat(e, 1)
        return torch.ones(e)

    @torch.no_grad()
    def reset_parameters(self, names: list[str] | None = None) -> None:
        """Set ``names`` (default: A_log and D) again from :meth:`initial_value`."""
        for name in names or ("A_log", "D"):
            getattr(self, name).copy_(self.initial_value(name))

    @torch.no_grad()
    def reset_dt_parameters(self, names: tuple[str, ...] = ("weight", "bias")) -> None:
        """Mamba's Δ initialisation: softplus(dt_proj bias) log-uniform in [dt_min, dt_max], weight
        U(±dt_rank^−½); call it again after a model-wide weight init (``names``: only these of
        dt_proj's tensors; the draws are made either way). The float32 draw is mapped in float64 and
        rounded once: in float32, exp/log/expm1 gave last-bit differences between an Intel and an AMD
        CPU, so a seed now gives the same weights on both."""
        cfg, e = self.cfg, self.cfg.d_inner
        log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(e).double() * (log_max - log_min) + log_min)  # [E], float64
        if "bias" in names:
            self.dt_proj.bias.copy_((dt + torch.log(-torch.expm1(-dt))).float())  # inverse softplus
        weight = torch.empty_like(self.dt_proj.weight).uniform_(-cfg.dt_rank ** -0.5, cfg.dt_rank ** -0.5)
        if "weight" in names:
            self.dt_proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor, cache=None, layer_idx: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, d_model]`` → ``[B, L, d_model]``; with a transformers ``cache``, continue from
        (and update) layer ``layer_idx``'s conv and SSM state; ``valid [B, L]`` marks real tokens."""
        cfg = self.cfg
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, E]
        u = F.silu(self.conv1d.step(x_in, cache, layer_idx, valid))
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
