"""Phase-modulated attention (PMA): attention logits scaled by oscillator phase coherence.

The class docstring of :class:`PhaseModulatedAttention` holds the equations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phaselm.nn import oscillators as osc
from phaselm.nn.attention import PLAIN, CausalSelfAttention, LayerInputs, attend, phasor_sums, store_phasor_sums, token_weight
from phaselm.nn.functional import causal_mean, entropy, inverse_softplus
from phaselm.nn.hooks import HookPoint


class PhaseModulatedAttention(CausalSelfAttention):
    """Phase-modulated causal attention (PMA). Per head h, query i, key j ≤ i:

        P[h,i,j]   = cos(φ[h,i] − φ_pos[h,j])                 φ: oscillator phase of token i
        P_eff      = λ_h P + (1 − λ_h),  λ_h ∈ [0, 0.5)        so P_eff ∈ (0, 1] stays positive
        τ[h,i]     = τ_base,h (1 + β_h Var_{j≤i}(P[h,i,j])) (1 + α_h (1 − R[h,i]))
        A[h]       = softmax_j((q_i·k_j / √d) P_eff[h,i,j] / τ[h,i] + causal mask) ,  y = A v

    One oscillator per head and token: φ⁰ = π tanh(W_φ x) ``[B, H, T]`` evolves for a few causal
    Kuramoto steps along the tokens (:mod:`phaselm.nn.oscillators`) with learnable ω_h and coupling K
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
    With ``output_attentions`` (either path) the layer keeps A ``[B, H, T, S]`` as
    ``attention_weights``: the modulated pattern, P_eff and τ included.
    Explicit path (:meth:`forward` with ``explicit=True``, or automatically when ``hook_P`` or
    ``hook_pattern`` is hooked or metrics are recorded): builds P and A from the definition (full
    forward only, without cache or padding).

    Hook points (``blocks.{L}.pma.`` + name): ``hook_K`` [B,H,T], ``hook_phi`` [B,H,T] (after the
    Kuramoto steps), ``hook_phi_pos`` [H,T] ([B,H,T] with position ids), ``hook_R`` [B,H,T],
    ``hook_lam`` [H], ``hook_var_P`` [B,H,T], ``hook_tau`` [B,H,T], ``hook_P`` [B,H,T,T],
    ``hook_pattern`` [B,H,T,T] (A, explicit path) and ``hook_z`` [B,H,T,D] (heads before the output
    projection). Each one sits on the tensor that the next computation consumes, so replacing it is
    an intervention.
    """

    LAM_MAX = 0.5

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0, bias: bool = False,
                 layer_idx: int = 0, coupling_init: float = 1.0, coupling_mode: str = "context",
                 kuramoto_steps: int = 2, kuramoto_dt: float = 0.1, integrator: str = "euler", lam_init: float = 0.1, lam_trainable: bool = True,
                 tau_base_init: float = 1.0, tau_alpha_init: float = 0.1, tau_beta_init: float = 0.1,
                 phase_noise: float = 0.0, freq_jitter: float = 0.0):
        super().__init__(n_embd, n_head, dropout, bias, layer_idx)
        if coupling_mode not in ("context", "constant"):
            raise ValueError(f"coupling_mode must be 'context' or 'constant', got {coupling_mode!r}")
        if not 0 <= lam_init < self.LAM_MAX or (lam_trainable and lam_init <= 0):
            raise ValueError(f"lam_init must be in [0, 0.5) (and > 0 when trainable), got {lam_init}")
        if tau_base_init <= 0 or tau_alpha_init <= 0 or tau_beta_init <= 0 or kuramoto_steps < 0 or kuramoto_dt <= 0:
            raise ValueError("tau_base_init, tau_alpha_init, tau_beta_init and kuramoto_dt must be > 0 and kuramoto_steps >= 0")
        self.kuramoto_steps, self.kuramoto_dt, self.integrator = kuramoto_steps, kuramoto_dt, integrator
        self.phase_noise, self.freq_jitter, self.coupling_mode = phase_noise, freq_jitter, coupling_mode
        self.coupling_init, self.block_size, self.lam_init = coupling_init, block_size, lam_init
        self.tau_inits = {"tau_raw": tau_base_init, "alpha_raw": tau_alpha_init, "beta_raw": tau_beta_init}
        self.phase_proj = nn.Linear(n_embd, n_head, bias=bias)
        self.omega = nn.Parameter(self.initial_value("omega"))
        if coupling_mode == "context":
            self.context_norm = nn.RMSNorm(n_embd)
            self.coupling_map = nn.Linear(n_embd, n_head)
        else:
            self.coupling_raw = nn.Parameter(self.initial_value("coupling_raw"))
        if kuramoto_steps == 0:  # phases frozen at φ⁰: ω and K (its map) never reach the output, so they take no
            coupling = [self.coupling_raw] if coupling_mode == "constant" else [  # gradient (as DDP requires of
                *self.context_norm.parameters(), *self.coupling_map.parameters()]  # every trainable parameter)
            for p in (self.omega, *coupling):
                p.requires_grad_(False)
        self.phi_pos = nn.Parameter(self.initial_value("phi_pos"))
        self.phi_pos._no_weight_decay = True
        if lam_trainable:
            self.lam_raw = nn.Parameter(self.initial_value("lam_raw"))  # λ = 0.5·sigmoid(raw) ∈ (0, 0.5)
        else:
            self.register_buffer("lam_fixed", self.initial_value("lam_fixed"))
        for name in self.tau_inits:
            setattr(self, name, nn.Parameter(self.initial_value(name)))
        for name in ("K", "phi", "phi_pos", "R", "lam", "var_P", "tau", "P", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())
        self.explicit = False  # force the explicit path (set by the LM while recording metrics)
        self.last_r: torch.Tensor | None = None  # [H], with gradients (coherence regulariser)
        self.last: dict[str, torch.Tensor] = {}  # detached summaries of the last forward

    OWN = ("omega", "coupling_raw", "phi_pos", "lam_raw", "lam_fixed", "tau_raw", "alpha_raw", "beta_raw")

    def initial_value(self, name: str) -> torch.Tensor:
        """The initial value of one of this layer's own tensors ``[H]`` (φ_pos ``[H, block_size]``):
        ω ~ 0.1·N(0, 1), φ_pos ~ U(−π, π), K = softplus(raw) = ``coupling_init``, λ = 0.5·sigmoid(raw) =
        ``lam_init`` (``lam_fixed`` when not trainable), softplus(raw) = τ_base₀, α₀, β₀."""
        h = self.n_head
        if name == "omega":
            return 0.1 * torch.randn(h)
        if name == "phi_pos":
            return torch.empty(h, self.block_size).uniform_(-math.pi, math.pi)
        lam = self.lam_init
        value = {"coupling_raw": inverse_softplus(self.coupling_init), "lam_fixed": float(lam),
                 "lam_raw": math.log(lam / (0.5 - lam)) if lam > 0 else 0.0,
                 **{k: inverse_softplus(v) for k, v in self.tau_inits.items()}}[name]
        return torch.full((h,), value)

    @torch.no_grad()
    def reset_parameters(self, names: list[str] | None = None) -> None:
        """Draw ``names`` (default: all this layer has) of its own tensors again from :meth:`initial_value`."""
        for name in names or [n for n in self.OWN if hasattr(self, n)]:
            getattr(self, name).copy_(self.initial_value(name))

    @torch.no_grad()
    def reset_parameters_after_init(self, names: tuple[str, ...] = ("weight", "bias")) -> None:
        """K starts at ``coupling_init`` everywhere: W_K = 0, b_K = softplus⁻¹(K₀) (a model-wide
        weight init would otherwise overwrite the map); ``names``: only these of the map's tensors."""
        if self.coupling_mode == "context":
            if "weight" in names:
                self.coupling_map.weight.zero_()
            if "bias" in names:
                self.coupling_map.bias.fill_(inverse_softplus(self.coupling_init))

    def phase_parameters(self) -> list[nn.Parameter]:
        """The parameters that shape the phases and their effect (for the Fisher information)."""
        mods = [self.phase_proj] + ([self.coupling_map] if self.coupling_mode == "context" else [])
        own = [self.omega, self.phi_pos] + [getattr(self, n) for n in ("coupling_raw", "lam_raw")
                                            if isinstance(getattr(self, n, None), nn.Parameter)]
        return [p for m in mods for p in m.parameters()] + own

    def lam(self) -> torch.Tensor:
        return self.LAM_MAX * torch.sigmoid(self.lam_raw) if hasattr(self, "lam_raw") else self.lam_fixed

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
        phi = osc.integrate(phi0[..., None], omega[:, None, None], k[..., None], steps=self.kuramoto_steps,
                            dt=self.kuramoto_dt, integrator=self.integrator, dim=-2, causal=True,
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
        means = causal_mean(torch.stack([u, w, u * u, u * w, w * w]), -1)[0]  # [5, H, L]
        if positions is not None:
            means = means[:, :, positions].transpose(1, 2)  # [5, B, H, T]
        mu, mw, muu, muw, mww = means
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
        lam = self.hook_lam(self.lam())[:, None, None]  # [H, 1, 1]
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
            self.attention_weights = att if inputs.output_attentions else None
            self.last["attention_entropy"] = entropy(probs=att).mean().detach()
        else:
            var_p = self.hook_var_P(self.causal_var_p(phi, self.phi_pos if inputs.positions is not None else phi_pos,
                                                      inputs.positions))
            tau = self.hook_tau(tau_base * (1 + beta * var_p) * (1 + alpha * (1 - r)))
            s1, s2 = torch.sqrt(1 - lam[..., 0]), torch.sqrt(lam[..., 0])  # [H, 1]
            q_coef = torch.stack([s1.expand_as(phi), s2 * torch.cos(phi), s2 * torch.sin(phi)], -1) / tau[..., None]
            k_coef = torch.stack([s1.expand_as(phi_pos), s2 * torch.cos(phi_pos), s2 * torch.sin(phi_pos)], -1)
            q_aug = (q_coef[..., :, None] * q[..., None, :]).flatten(-2)  # [B, H, T, 3D]
            k_aug = (k_coef[..., :, None] * k[..., None, :]).flatten(-2)
            y, self.attention_weights = attend(self, q_aug, k_aug, v, inputs, scale=1 / math.sqrt(d),
                                               dropout_p=drop)
            self.last.pop("attention_entropy", None)
        self.last_r = r.mean(dim=(0, 2))
        self.last.update(R=r.detach().mean(), tau=tau.detach().mean(), lam=lam.detach().mean())
        return self.merge_heads(self.hook_z(y))

    def metrics(self) -> dict[str, float]:
        return {f"{k}_mean": float(v) for k, v in self.last.items()}
