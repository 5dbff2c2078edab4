"""Phase-coupled attention (PhaseGPT).

Each head h carries N oscillators per token. Phases start from the hidden state, θ⁰ = π·tanh(W x) (``[B, H, T, N]``), evolve for a few causal Kuramoto steps
along the token axis (:mod:`phaselm.nn.oscillators`; learnable per-head ω ``[H, N]`` and K ``[H]``),
and bias the attention logits by the phase coherence of query and key tokens:

    s_ij = q_i·k_j / √d + β_h · c_ij,      c_ij = (1/N) Σ_n cos(θ_i,n − θ_j,n) ∈ [−1, 1]

(causal mask after the bias; β_h learnable, initialised to ``coherence_init``, or fixed there with
``coherence_trainable=False``: β = 0 fixed is the "no coherence bias" control). The choice is an
*additive* bias, so that the whole thing is exactly one ``scaled_dot_product_attention`` call with
2N extra query/key features: since cos(a − b) = cos a cos b + sin a sin b,

    q'_i = [q_i, (β_h √d / N)·cos θ_i, (β_h √d / N)·sin θ_i],   k'_j = [k_j, cos θ_j, sin θ_j],
    q'_i·k'_j / √d = q_i·k_j/√d + β_h c_ij.

No [T, T, N] tensor is built; :meth:`PhaseCoupledAttention.explicit_scores` computes s_ij from the
definition for tests; with ``output_attentions`` the layer keeps A = softmax(s) (coherence bias
included) as ``attention_weights``, and :attr:`last_phases` holds θ of the last forward. The cached keys are k' (they carry the coherence features); the cached
values are v, of head size d. The layer keeps R = |mean_n e^{iθ_n}| per head (with gradients, for
the coherence regulariser; detached, for logging).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from phaselm.nn import oscillators as osc
from phaselm.nn.attention import PLAIN, CausalSelfAttention, LayerInputs, attend, phasor_sums, store_phasor_sums, token_weight


class PhaseCoupledAttention(CausalSelfAttention):
    """Phase-coupled causal attention (see the module docstring)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False, layer_idx: int = 0,
                 n_osc: int = 32, coupling_init: float = 1.0, kuramoto_steps: int = 2,
                 kuramoto_dt: float = 0.1, integrator: str = "euler", coherence_init: float = 0.5, phase_noise: float = 0.0,
                 freq_jitter: float = 0.0, coherence_trainable: bool = True):
        super().__init__(n_embd, n_head, dropout, bias, layer_idx)
        if n_osc < 1 or kuramoto_steps < 0 or kuramoto_dt <= 0:
            raise ValueError(f"n_osc must be >= 1, kuramoto_steps >= 0 and kuramoto_dt > 0 (got {n_osc}, {kuramoto_steps}, "
                             f"{kuramoto_dt})")
        self.n_osc, self.kuramoto_steps, self.kuramoto_dt, self.integrator = n_osc, kuramoto_steps, kuramoto_dt, integrator
        self.phase_noise, self.freq_jitter = phase_noise, freq_jitter
        self.coupling_init, self.coherence_init = float(coupling_init), float(coherence_init)
        self.phase_proj = nn.Linear(n_embd, n_head * n_osc, bias=bias)
        self.omega = nn.Parameter(self.initial_value("omega"))
        self.omega._no_weight_decay = True
        self.coupling = nn.Parameter(self.initial_value("coupling"))
        if kuramoto_steps == 0:  # phases frozen at θ⁰: ω and K never reach the output, so they take no gradient
            self.omega.requires_grad_(False)  # (as DDP requires of every trainable parameter)
            self.coupling.requires_grad_(False)
        self.coherence = nn.Parameter(self.initial_value("coherence"), requires_grad=coherence_trainable)
        self.last_r: torch.Tensor | None = None  # [H], with gradients
        self.last_phases: torch.Tensor | None = None  # θ [B, H, T, N] of the last forward, with gradients

    def initial_value(self, name: str) -> torch.Tensor:
        """The initial value of one of this layer's own tensors (its Linear layers initialise
        themselves): ω ~ 0.1·N(0, 1) ``[H, N]``, K = ``coupling_init`` and β = ``coherence_init`` ``[H]``."""
        h = self.n_head
        if name == "omega":
            return 0.1 * torch.randn(h, self.n_osc)
        return torch.full((h,), {"coupling": self.coupling_init, "coherence": self.coherence_init}[name])

    @torch.no_grad()
    def reset_parameters(self, names: list[str] | None = None) -> None:
        """Draw ``names`` (default: all) of ω, K and β again from :meth:`initial_value`."""
        for name in names or ("omega", "coupling", "coherence"):
            getattr(self, name).copy_(self.initial_value(name))

    def phases(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        """θ after the Kuramoto steps: ``[B, H, T, N]`` (continuing from the cached mean field)."""
        b, t, _ = x.shape
        theta = math.pi * torch.tanh(self.phase_proj(x)).view(b, t, self.n_head, self.n_osc).transpose(1, 2)
        omega = self.omega
        if self.training and self.freq_jitter > 0:
            omega = osc.jitter_frequencies(omega, self.freq_jitter)
        sums = phasor_sums(inputs, self.layer_idx, theta)
        theta = osc.integrate(theta, omega[:, None, :], self.coupling[:, None, None], steps=self.kuramoto_steps,
                              dt=self.kuramoto_dt, integrator=self.integrator, dim=-2, causal=True,
                              noise_std=self.phase_noise if self.training else 0.0,
                              weight=token_weight(inputs, 4), sums=sums)
        store_phasor_sums(inputs, self.layer_idx, sums)
        self.last_phases = theta
        return theta

    def forward(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # [B, H, T, D]
        theta = self.phases(x, inputs)
        self.last_r = osc.order_parameter(theta, dim=-1).mean(dim=(0, 2))  # R over oscillators, mean over B, T
        scale = (self.coherence * math.sqrt(self.head_dim) / self.n_osc)[:, None, None]  # [H, 1, 1]
        q_aug = torch.cat([q, scale * torch.cos(theta), scale * torch.sin(theta)], dim=-1)
        k_aug = torch.cat([k, torch.cos(theta), torch.sin(theta)], dim=-1)
        y, self.attention_weights = attend(self, q_aug, k_aug, v, inputs, scale=1 / math.sqrt(self.head_dim),
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
