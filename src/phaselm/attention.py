"""Attention building blocks: standard causal attention, phase-coupled attention (PhaseGPT) and
phase-modulated attention (PMA), with the MLP and the pre-LN block around them.

Every block takes explicit sizes (width, heads, dropout, ...), not a model's config, and works in
two modes with the same weights:

* a full forward over ``x [B, T, C]`` (training; ``inputs=None`` means plain causal attention);
* incremental decoding through the transformers Cache API (:class:`LayerInputs` carries the cache,
  the attention mask ``[B, 1, T, S]`` over the S = past + T keys, the position ids and which tokens
  are padding). Keys and values go through ``cache.update(k, v, layer_idx)``; the oscillators'
  running mean fields are a per-layer recurrent state (``cache.get_recurrent_state`` /
  ``update_recurrent_state``), so a new token costs O(N) for its oscillators.

Phase-coupled attention (PhaseGPT). Each head h carries N oscillators per token. Phases start
from the hidden state, θ⁰ = π·tanh(W x) (``[B, H, T, N]``), evolve for a few causal Kuramoto steps
along the token axis (:mod:`phaselm.oscillators`; learnable per-head ω ``[H, N]`` and K ``[H]``),
and bias the attention logits by the phase coherence of query and key tokens:

    s_ij = q_i·k_j / √d + β_h · c_ij,      c_ij = (1/N) Σ_n cos(θ_i,n − θ_j,n) ∈ [−1, 1]

(causal mask after the bias; β_h learnable, initialised to ``coherence_init``). The choice is an
*additive* bias, so that the whole thing is exactly one ``scaled_dot_product_attention`` call with
2N extra query/key features: since cos(a − b) = cos a cos b + sin a sin b,

    q'_i = [q_i, (β_h √d / N)·cos θ_i, (β_h √d / N)·sin θ_i],   k'_j = [k_j, cos θ_j, sin θ_j],
    q'_i·k'_j / √d = q_i·k_j/√d + β_h c_ij.

No [T, T, N] tensor is built; :meth:`PhaseCoupledAttention.explicit_scores` computes s_ij from the
definition for tests. The cached keys are k' (they carry the coherence features); the cached
values are v, of head size d. The layer keeps R = |mean_n e^{iθ_n}| per head (with gradients, for
the coherence regulariser; detached, for logging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phaselm import oscillators as osc
from phaselm.hooks import HookPoint


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class LayerInputs:
    """What every layer of one forward pass needs besides its hidden state.

    ``cache``: a transformers ``Cache`` (None: no incremental decoding). ``mask``: boolean
    ``[B, 1, T, S]``, True where query i may attend key j (None: plain causal over T keys).
    ``positions``: position ids ``[B, T]`` (None: 0..T−1). ``valid``: ``[B, T]``, 1.0 for a real
    token, 0.0 for padding (None: all real). ``past``: how many tokens the cache held before.
    """

    cache: object | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    past: int = 0

    @classmethod
    def build(cls, batch: int, length: int, device, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache=None) -> "LayerInputs":
        """From a 2-D ``attention_mask [B, past + T]`` (1 real, 0 padding; left padding as
        ``generate`` makes it), optional ``position_ids [B, T]`` and the cache. Position ids
        default to the count of real tokens before each one, so a left-padded row computes
        exactly what the same row without padding computes."""
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None and cache is None and position_ids is None:
            return cls()
        total = past + length
        if attention_mask is not None:
            if attention_mask.shape != (batch, total):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {total}) "
                                 f"= (batch, cached tokens + new tokens)")
            keys = attention_mask.to(device=device, dtype=torch.bool)
        else:
            keys = torch.ones(batch, total, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = (keys.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        q_at = torch.arange(past, total, device=device)[:, None]
        causal = torch.arange(total, device=device)[None, :] <= q_at  # [T, S]
        mask = causal[None] & keys[:, None, :]
        mask |= torch.arange(total, device=device)[None, :] == q_at  # a padding query sees itself (no empty row)
        valid = keys[:, past:].float() if attention_mask is not None else None
        return cls(cache=cache, mask=mask[:, None], positions=position_ids.to(device), valid=valid, past=past)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments for a decoder block, so that hooks which repeat
        batch-shaped arguments (Phase-Slip's row groups) see each tensor."""
        return dict(vars(self))

    @property
    def plain(self) -> bool:
        """No cache, no padding, default positions: the training path."""
        return self.cache is None and self.mask is None and self.positions is None


PLAIN = LayerInputs()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: LayerInputs, layer_idx: int,
           scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) v through SDPA: ``q [B, H, T, Dk]``, ``k [B, H, T, Dk]``,
    ``v [B, H, T, Dv]`` (Dv ≤ Dk) → ``[B, H, T, Dv]``. With a cache, k and v are first appended to
    layer ``layer_idx`` of it and the queries attend to every cached key the mask allows."""
    if inputs.cache is not None:
        k, v = inputs.cache.update(k, v, layer_idx)
    dv = v.shape[-1]
    if dv < q.shape[-1]:  # SDPA kernels want one head size for q, k and v
        v = F.pad(v, (0, q.shape[-1] - dv))
    if inputs.mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, scale=scale, dropout_p=dropout_p)
    return y[..., :dv]


def phasor_sums(inputs: LayerInputs, layer_idx: int, like: torch.Tensor) -> osc.PhasorSums | None:
    """The running Kuramoto sums of earlier tokens from the cache (None without a cache).

    The state is stored batch-first, ``[B, E, H, N, 2]`` (E mean-field evaluations); the number of
    earlier real tokens is the position id of the first new token."""
    if inputs.cache is None:
        return None
    state = inputs.cache.get_recurrent_state(layer_idx) if inputs.past else None
    count = (inputs.positions[:, :1] if inputs.positions is not None else torch.zeros(like.shape[0], 1))
    count = count.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))
    return osc.PhasorSums(None if state is None else state.movedim(1, 0), count)


def store_phasor_sums(inputs: LayerInputs, layer_idx: int, sums: osc.PhasorSums | None) -> None:
    """Write the new totals as the layer's recurrent state. transformers' cache layers report a
    recurrent state only once a conv state was written (``has_previous_state``); these layers have
    no conv state, so the flag is set here."""
    if sums is not None and sums.totals:
        inputs.cache.update_recurrent_state(sums.stacked().movedim(0, 1).contiguous(), layer_idx)
        layer = inputs.cache.layers[layer_idx]
        if hasattr(layer, "has_previous_state"):
            layer.has_previous_state[0] = True


def token_weight(inputs: LayerInputs, ndim: int) -> torch.Tensor | None:
    """``valid [B, T]`` shaped ``[B, 1, T, 1, ...]`` for a ``[B, H, T, ...]`` tensor of ``ndim`` axes."""
    if inputs.valid is None:
        return None
    return inputs.valid.view(inputs.valid.shape[0], 1, inputs.valid.shape[1], *([1] * (ndim - 3)))


# ---------------------------------------------------------------------------------------------- standard
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(q kᵀ/√d + causal mask) v, through SDPA."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False, layer_idx: int = 0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head, self.dropout, self.layer_idx = n_head, dropout, layer_idx
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` → q, k, v each ``[B, H, T, C/H]``."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        return tuple(z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, H, T, D]`` → output projection of ``[B, T, H·D]``."""
        b, h, t, d = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, h * d)))

    def attn_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(attend(q, k, v, inputs, self.layer_idx, dropout_p=self.attn_dropout()))


class MLP(nn.Module):
    """GELU MLP ``[B, T, C]`` → ``[B, T, C]`` with a 4C hidden layer."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, n_embd: int, attn: nn.Module, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = attn
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x, **inputs):
        """``x [B, T, C]``; ``inputs``: the fields of :class:`LayerInputs` (none: plain causal)."""
        x = x + self.attn(self.ln_1(x), LayerInputs(**inputs))
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------- PhaseGPT
class PhaseCoupledAttention(CausalSelfAttention):
    """Phase-coupled causal attention (see the module docstring)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False, layer_idx: int = 0,
                 n_osc: int = 32, coupling_init: float = 1.0, steps: int = 2, dt: float = 0.1,
                 method: str = "euler", coherence_init: float = 0.5, phase_noise: float = 0.0,
                 freq_jitter: float = 0.0):
        super().__init__(n_embd, n_head, dropout, bias, layer_idx)
        if n_osc < 1 or steps < 0 or dt <= 0:
            raise ValueError(f"n_osc must be >= 1, steps >= 0 and dt > 0 (got {n_osc}, {steps}, {dt})")
        self.n_osc, self.steps, self.dt, self.method = n_osc, steps, dt, method
        self.phase_noise, self.freq_jitter = phase_noise, freq_jitter
        self.phase_proj = nn.Linear(n_embd, n_head * n_osc, bias=bias)
        self.omega = nn.Parameter(0.1 * torch.randn(n_head, n_osc))
        self.omega._no_weight_decay = True
        self.coupling = nn.Parameter(torch.full((n_head,), float(coupling_init)))
        self.coherence = nn.Parameter(torch.full((n_head,), float(coherence_init)))
        self.last_r: torch.Tensor | None = None  # [H], with gradients

    def phases(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        """θ after the Kuramoto steps: ``[B, H, T, N]`` (continuing from the cached mean field)."""
        b, t, _ = x.shape
        theta = math.pi * torch.tanh(self.phase_proj(x)).view(b, t, self.n_head, self.n_osc).transpose(1, 2)
        omega = self.omega
        if self.training and self.freq_jitter > 0:
            omega = osc.jitter_frequencies(omega, self.freq_jitter)
        sums = phasor_sums(inputs, self.layer_idx, theta)
        theta = osc.integrate(theta, omega[:, None, :], self.coupling[:, None, None], steps=self.steps, dt=self.dt,
                              method=self.method, dim=-2, causal=True,
                              noise_std=self.phase_noise if self.training else 0.0,
                              weight=token_weight(inputs, 4), sums=sums)
        store_phasor_sums(inputs, self.layer_idx, sums)
        return theta

    def forward(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # [B, H, T, D]
        theta = self.phases(x, inputs)
        self.last_r = osc.order_parameter(theta, dim=-1).mean(dim=(0, 2))  # R over oscillators, mean over B, T
        scale = (self.coherence * math.sqrt(self.head_dim) / self.n_osc)[:, None, None]  # [H, 1, 1]
        q_aug = torch.cat([q, scale * torch.cos(theta), scale * torch.sin(theta)], dim=-1)
        k_aug = torch.cat([k, torch.cos(theta), torch.sin(theta)], dim=-1)
        y = attend(q_aug, k_aug, v, inputs, self.layer_idx, scale=1 / math.sqrt(self.head_dim),
                   dropout_p=self.attn_dropout())
        return self.merge_heads(y)

    def explicit_scores(self, x: torch.Tensor) -> torch.Tensor:
        """s_ij from the definition (builds [B, H, T, T, N]; for tests): masked logits ``[B, H, T, T]``."""
        q, k, _ = self.split_heads(x)
        theta = self.phases(x)
        c = torch.cos(theta[:, :, :, None, :] - theta[:, :, None, :, :]).mean(-1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + self.coherence[:, None, None] * c
        t = x.shape[1]
        return s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=x.device).tril(), float("-inf"))

    def explicit_forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, v = self.split_heads(x)
        return self.merge_heads(self.explicit_scores(x).softmax(-1) @ v)

    def metrics(self) -> dict[str, float]:
        if self.last_r is None:
            return {}
        r = self.last_r.detach()
        out = {"R_mean": float(r.mean()), "K_mean": float(self.coupling.detach().mean()),
               "coherence_mean": float(self.coherence.detach().mean())}
        out.update({f"R_head{h}": float(v) for h, v in enumerate(r)})
        return out


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = log(1 + eˣ) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


# ---------------------------------------------------------------------------------------------- PMA
class PhaseModulatedAttention(CausalSelfAttention):
    """Phase-modulated causal attention (PMA). Per head h, query i, key j ≤ i:

        P[h,i,j]   = cos(φ[h,i] − φ_pos[h,j])                 φ: oscillator phase of token i
        P_eff      = λ_h P + (1 − λ_h),  λ_h ∈ [0, 0.5)        so P_eff ∈ (0, 1] stays positive
        τ[h,i]     = τ_base,h (1 + β_h Var_{j≤i}(P[h,i,j])) (1 + α_h (1 − R[h,i]))
        A[h]       = softmax_j((q_i·k_j / √d) P_eff[h,i,j] / τ[h,i] + causal mask) ,  y = A v

    One oscillator per head and token: φ⁰ = π tanh(W_φ x) ``[B, H, T]`` evolves for a few causal
    Kuramoto steps along the tokens (:mod:`phaselm.oscillators`) with learnable ω_h and coupling K
    ``[B, H, T]`` = softplus(W_K · RMSNorm(c) + b_K), c the hidden state of the preceding SSM block
    (``coupling_mode="context"``; W_K starts at 0 so K starts at ``coupling_init``), or a learnable
    constant per head (``"constant"``). R[h,i] e^{iψ} = mean_{j≤i} e^{iφ[h,j]} (causal, circular),
    and Var(P) is over the keys j ≤ i of query i, so nothing depends on later tokens. j indexes
    positions (position ids), so a left-padded row sees the same φ_pos as the unpadded row.

    Fast path: since cos(a − b) = cos a cos b + sin a sin b, (q·k) P_eff = q'·k' with
    q' = [√(1−λ) q, √λ q cos φ_i, √λ q sin φ_i] / τ_i and k' = [√(1−λ) k, √λ k cos φ_pos_j,
    √λ k sin φ_pos_j]: one ``scaled_dot_product_attention`` call with a 3× head size (v zero-padded),
    no [T, T] tensor; Var(P) comes from cumulative means of cos/sin φ_pos and their products. With
    a cache, k' is cached (it carries the key's phase features) and the running sums of e^{iφ} (for
    the Kuramoto steps and for R) are the layer's recurrent state.
    Explicit path (:meth:`forward` with ``explicit=True``, or automatically when ``hook_P`` or
    ``hook_pattern`` is hooked or metrics are recorded): builds P and A from the definition (full
    forward only, without cache or padding).

    Hook points (``blocks.{L}.pma.`` + name): ``hook_K`` [B,H,T], ``hook_phi`` [B,H,T] (after the
    Kuramoto steps), ``hook_phi_pos`` [H,T] ([B,H,T] with position ids), ``hook_R`` [B,H,T],
    ``hook_lambda`` [H], ``hook_var_P`` [B,H,T], ``hook_tau`` [B,H,T], ``hook_P`` [B,H,T,T],
    ``hook_pattern`` [B,H,T,T] (A, explicit path) and ``hook_z`` [B,H,T,D] (heads before the output
    projection). Each one sits on the tensor that the next computation consumes, so replacing it is
    an intervention.
    """

    LAMBDA_MAX = 0.5

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0, bias: bool = False,
                 layer_idx: int = 0, coupling_init: float = 1.0, coupling_mode: str = "context", steps: int = 2,
                 dt: float = 0.1, method: str = "euler", lambda_init: float = 0.1, lambda_trainable: bool = True,
                 tau_base_init: float = 1.0, tau_alpha_init: float = 0.1, tau_beta_init: float = 0.1,
                 phase_noise: float = 0.0, freq_jitter: float = 0.0):
        super().__init__(n_embd, n_head, dropout, bias, layer_idx)
        if coupling_mode not in ("context", "constant"):
            raise ValueError(f"coupling_mode must be 'context' or 'constant', got {coupling_mode!r}")
        if not 0 <= lambda_init < self.LAMBDA_MAX or (lambda_trainable and lambda_init <= 0):
            raise ValueError(f"lambda_init must be in [0, 0.5) (and > 0 when trainable), got {lambda_init}")
        if tau_base_init <= 0 or tau_alpha_init <= 0 or tau_beta_init <= 0 or steps < 0 or dt <= 0:
            raise ValueError("tau_base_init, tau_alpha_init, tau_beta_init and dt must be > 0 and steps >= 0")
        h = n_head
        self.steps, self.dt, self.method = steps, dt, method
        self.phase_noise, self.freq_jitter, self.coupling_mode = phase_noise, freq_jitter, coupling_mode
        self.coupling_init = coupling_init
        self.phase_proj = nn.Linear(n_embd, h, bias=bias)
        self.omega = nn.Parameter(0.1 * torch.randn(h))
        if coupling_mode == "context":
            self.context_norm = nn.RMSNorm(n_embd)
            self.coupling_map = nn.Linear(n_embd, h)
        else:
            self.coupling_raw = nn.Parameter(torch.full((h,), inverse_softplus(coupling_init)))
        self.phi_pos = nn.Parameter(torch.empty(h, block_size).uniform_(-math.pi, math.pi))
        self.phi_pos._no_weight_decay = True
        lam_raw = torch.full((h,), math.log(lambda_init / (0.5 - lambda_init)) if lambda_init > 0 else 0.0)
        if lambda_trainable:
            self.lambda_raw = nn.Parameter(lam_raw)  # λ = 0.5·sigmoid(raw) ∈ (0, 0.5)
        else:
            self.register_buffer("lambda_fixed", torch.full((h,), float(lambda_init)))
        self.tau_raw = nn.Parameter(torch.full((h,), inverse_softplus(tau_base_init)))
        self.alpha_raw = nn.Parameter(torch.full((h,), inverse_softplus(tau_alpha_init)))
        self.beta_raw = nn.Parameter(torch.full((h,), inverse_softplus(tau_beta_init)))
        for name in ("K", "phi", "phi_pos", "R", "lambda", "var_P", "tau", "P", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())
        self.explicit = False  # force the explicit path (set by the LM while recording metrics)
        self.last_r: torch.Tensor | None = None  # [H], with gradients (coherence regulariser)
        self.last: dict[str, torch.Tensor] = {}  # detached summaries of the last forward

    @torch.no_grad()
    def reset_parameters_after_init(self) -> None:
        """K starts at ``coupling_init`` everywhere: W_K = 0, b_K = softplus⁻¹(K₀) (a model-wide
        weight init would otherwise overwrite the map)."""
        if self.coupling_mode == "context":
            nn.init.zeros_(self.coupling_map.weight)
            self.coupling_map.bias.fill_(inverse_softplus(self.coupling_init))

    def phase_parameters(self) -> list[nn.Parameter]:
        """The parameters that shape the phases and their effect (for the Fisher information)."""
        mods = [self.phase_proj] + ([self.coupling_map] if self.coupling_mode == "context" else [])
        own = [self.omega, self.phi_pos] + [getattr(self, n) for n in ("coupling_raw", "lambda_raw")
                                            if isinstance(getattr(self, n, None), nn.Parameter)]
        return [p for m in mods for p in m.parameters()] + own

    def lam(self) -> torch.Tensor:
        return self.LAMBDA_MAX * torch.sigmoid(self.lambda_raw) if hasattr(self, "lambda_raw") else self.lambda_fixed

    def coupling_strength(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """K ``[B, H, T]`` (> 0)."""
        if self.coupling_mode == "constant":
            b, t, _ = x.shape
            return F.softplus(self.coupling_raw)[None, :, None].expand(b, -1, t)
        c = x if context is None else context
        return F.softplus(self.coupling_map(self.context_norm(c))).transpose(1, 2)

    def phases(self, x: torch.Tensor, context: torch.Tensor | None = None, inputs: LayerInputs = PLAIN,
               sums: osc.PhasorSums | None = None) -> torch.Tensor:
        """φ after the Kuramoto steps, ``[B, H, T]`` (through ``hook_K`` and ``hook_phi``)."""
        k = self.hook_K(self.coupling_strength(x, context))
        self.last["K"] = k.detach().mean()
        phi0 = math.pi * torch.tanh(self.phase_proj(x)).transpose(1, 2)  # [B, H, T]
        omega = osc.jitter_frequencies(self.omega, self.freq_jitter) if self.training else self.omega
        phi = osc.integrate(phi0[..., None], omega[:, None, None], k[..., None], steps=self.steps, dt=self.dt,
                            method=self.method, dim=-2, causal=True,
                            noise_std=self.phase_noise if self.training else 0.0,
                            weight=token_weight(inputs, 4), sums=sums)[..., 0]
        return self.hook_phi(phi)

    @staticmethod
    def causal_var_p(phi: torch.Tensor, phi_pos: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Var_{j≤i} cos(φ_i − φ_pos_j) ``[B, H, T]`` in O(T), from cumulative means of
        u = cos φ_pos, w = sin φ_pos: E[P] = a·ū + b·w̄, E[P²] = a²·(u²)‾ + 2ab·(uw)‾ + b²·(w²)‾
        with a = cos φ_i, b = sin φ_i. ``phi_pos [H, L]``; the keys of query i are the positions
        0..p_i (``positions [B, T]``; None: p_i = i and L = T)."""
        u, w = torch.cos(phi_pos), torch.sin(phi_pos)  # [H, L]
        if positions is None:
            count = torch.arange(1, phi.shape[-1] + 1, device=phi.device, dtype=phi.dtype)
            mu, mw, muu, muw, mww = (z.cumsum(-1) / count for z in (u, w, u * u, u * w, w * w))
        else:
            count = (positions + 1).to(phi.dtype)[:, None, :]  # [B, 1, T]
            mu, mw, muu, muw, mww = (z.cumsum(-1)[:, positions].transpose(0, 1) / count
                                     for z in (u, w, u * u, u * w, w * w))  # [B, H, T]
        a, b = torch.cos(phi), torch.sin(phi)
        mean = a * mu + b * mw
        mean_sq = a * a * muu + 2 * a * b * muw + b * b * mww
        return (mean_sq - mean * mean).clamp_min(0.0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, explicit: bool | None = None,
                inputs: LayerInputs = PLAIN) -> torch.Tensor:
        """``x [B, T, C]`` (and the SSM hidden state ``context [B, T, C]``) → ``[B, T, C]``."""
        b, t, _ = x.shape
        q, k, v = self.split_heads(x)  # [B, H, T, D]
        sums = phasor_sums(inputs, self.layer_idx, q)
        phi = self.phases(x, context, inputs, sums)
        r, _ = osc.mean_field(phi[..., None], dim=-2, causal=True, weight=token_weight(inputs, 4), sums=sums)
        store_phasor_sums(inputs, self.layer_idx, sums)
        r = self.hook_R(r[..., 0])  # [B, H, T]
        if inputs.positions is None:
            phi_pos = self.hook_phi_pos(self.phi_pos[:, :t])  # [H, T]
        else:  # the new keys' phases (an override reaches them, not Var(P) over cached keys)
            phi_pos = self.hook_phi_pos(self.phi_pos[:, inputs.positions].transpose(0, 1))  # [B, H, T]
        lam = self.hook_lambda(self.lam())[:, None, None]  # [H, 1, 1]
        explicit = explicit if explicit is not None else (self.explicit or self.hook_P.active
                                                          or self.hook_pattern.active)
        d, drop = self.head_dim, self.attn_dropout()
        tau_base, alpha, beta = (F.softplus(p)[:, None] for p in (self.tau_raw, self.alpha_raw, self.beta_raw))
        if explicit:
            if not inputs.plain:
                raise ValueError("the explicit PMA path (hook_P, hook_pattern, metrics) needs a full forward "
                                 "without cache or padding; call the model with use_cache=False and no attention_mask")
            p = self.hook_P(torch.cos(phi[..., :, None] - phi_pos[None, :, None, :]))  # [B, H, T, T]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            n = mask.sum(-1)  # keys per query
            mean = p.masked_fill(~mask, 0).sum(-1) / n
            var_p = ((p - mean[..., None]) ** 2).masked_fill(~mask, 0).sum(-1) / n
            tau = self.hook_tau(tau_base * (1 + beta * self.hook_var_P(var_p)) * (1 + alpha * (1 - r)))
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)) * (lam * p + 1 - lam) / tau[..., None]
            att = self.hook_pattern(scores.masked_fill(~mask, float("-inf")).softmax(-1))
            y = F.dropout(att, drop, self.training) @ v
            self.last["attention_entropy"] = -(att * torch.log(att.clamp_min(1e-30))).sum(-1).mean().detach()
        else:
            var_p = self.hook_var_P(self.causal_var_p(phi, self.phi_pos if inputs.positions is not None else phi_pos,
                                                      inputs.positions))
            tau = self.hook_tau(tau_base * (1 + beta * var_p) * (1 + alpha * (1 - r)))
            s1, s2 = torch.sqrt(1 - lam[..., 0]), torch.sqrt(lam[..., 0])  # [H, 1]
            q_coef = torch.stack([s1.expand_as(phi), s2 * torch.cos(phi), s2 * torch.sin(phi)], -1) / tau[..., None]
            k_coef = torch.stack([s1.expand_as(phi_pos), s2 * torch.cos(phi_pos), s2 * torch.sin(phi_pos)], -1)
            q_aug = (q_coef[..., :, None] * q[..., None, :]).flatten(-2)  # [B, H, T, 3D]
            k_aug = (k_coef[..., :, None] * k[..., None, :]).flatten(-2)
            y = attend(q_aug, k_aug, v, inputs, self.layer_idx, scale=1 / math.sqrt(d), dropout_p=drop)
            self.last.pop("attention_entropy", None)
        self.last_r = r.mean(dim=(0, 2))
        self.last.update(R=r.detach().mean(), tau=tau.detach().mean(), **{"lambda": lam.detach().mean()})
        return self.merge_heads(self.hook_z(y))

    def metrics(self) -> dict[str, float]:
        return {f"{k}_mean": float(v) for k, v in self.last.items()}
