"""The Phase-Modulated Attention language model: a hybrid of Mamba and PMA blocks.

    tokens [B, T] → embedding → N × SSM block → M × PMA block → RMSNorm → LM head (tied) → [B, T, V]

* SSM block: x + Mamba(RMSNorm(x)) (:class:`phaselm.ssm.MambaMixer`).
* PMA block: x + PMA(RMSNorm(x), c), then x + MLP(RMSNorm(x)), with
  :class:`phaselm.attention.PhaseModulatedAttention`; c, the hidden state of the most recent SSM
  block (the embeddings if none precedes), sets the oscillators' coupling K = f(c), so
  synchronisation depends on context.

``layout="ssm_first"`` (as published) puts all SSM blocks first; ``"interleaved"`` spreads the PMA
blocks evenly among them. ``n_ssm = n_layer`` is a pure Mamba LM, ``n_ssm = 0`` a pure PMA
transformer (no positional embedding besides the learned phases φ_pos).

Every internal quantity has a hook point (:mod:`phaselm.hooks`): ``hook_embed``,
``blocks.{L}.hook_resid_post``, ``blocks.{L}.pma.hook_{K,phi,phi_pos,R,lambda,var_P,tau,P,pattern,z}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phaselm.attention import PhaseModulatedAttention
from phaselm.hooks import HookPoint, hook_names, name_hook_points
from phaselm.models.gpt import GPT, MLP, GenerateMixin, GPTConfig
from phaselm.ssm import MambaConfig, MambaMixer


@dataclass
class PMAConfig:
    vocab_size: int = 49152  # the embedded SmolLM2 tokenizer's
    block_size: int = 1024
    d_model: int = 768
    n_layer: int = 24  # SSM + PMA blocks
    n_ssm: int = 20
    n_head: int = 12
    layout: str = "ssm_first"  # ssm_first | interleaved
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dropout: float = 0.0
    bias: bool = False
    lambda_init: float = 0.1
    lambda_trainable: bool = True
    tau_base_init: float = 1.0
    tau_alpha_init: float = 0.1
    tau_beta_init: float = 0.1
    coupling_init: float = 1.0
    coupling_mode: str = "context"  # context | constant
    kuramoto_steps: int = 2
    kuramoto_dt: float = 0.1
    integrator: str = "euler"
    phase_noise: float = 0.0
    freq_jitter: float = 0.0
    scan: str = "auto"  # auto | parallel | sequential | cuda

    def __post_init__(self):
        if not 0 <= self.n_ssm <= self.n_layer:
            raise ValueError(f"n_ssm must be in 0..n_layer ({self.n_layer}), got {self.n_ssm}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.layout not in ("ssm_first", "interleaved"):
            raise ValueError(f"layout must be 'ssm_first' or 'interleaved', got {self.layout!r}")

    def block_types(self) -> list[str]:
        """``"ssm"`` / ``"pma"`` for each of the ``n_layer`` blocks, in order."""
        n_pma = self.n_layer - self.n_ssm
        if self.layout == "ssm_first" or n_pma == 0:
            return ["ssm"] * self.n_ssm + ["pma"] * n_pma
        pma_at = {round((k + 1) * self.n_layer / n_pma) - 1 for k in range(n_pma)}
        return ["pma" if i in pma_at else "ssm" for i in range(self.n_layer)]


def create_130m_config(**overrides) -> PMAConfig:
    """d_model 768, 24 blocks: 20 Mamba + 4 PMA (12 heads) after them, vocabulary 49152 (the
    embedded SmolLM2 tokenizer), context 1024; ≈141M parameters with tied embeddings (the published
    name says 130M; the Mamba-130M trunk it is named after has 24 Mamba blocks)."""
    return PMAConfig(**overrides)


def create_tiny_config(**overrides) -> PMAConfig:
    """A CPU-sized hybrid: d_model 128, 4 Mamba + 2 PMA blocks (4 heads), d_state 8, context 128,
    character vocabulary (65 for Shakespeare)."""
    base = dict(vocab_size=65, block_size=128, d_model=128, n_layer=6, n_ssm=4, n_head=4, d_state=8)
    return PMAConfig(**{**base, **overrides})


class SSMBlock(nn.Module):
    def __init__(self, cfg: PMAConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model)
        self.ssm = MambaMixer(MambaConfig(d_model=cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                          expand=cfg.expand, bias=cfg.bias, scan=cfg.scan))
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.hook_resid_post(x + self.drop(self.ssm(self.norm(x))))


class PMABlock(nn.Module):
    def __init__(self, cfg: PMAConfig):
        super().__init__()
        gcfg = GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.d_model, dropout=cfg.dropout, bias=cfg.bias)
        self.norm_1 = nn.RMSNorm(cfg.d_model)
        self.pma = PhaseModulatedAttention(
            gcfg, coupling_init=cfg.coupling_init, coupling_mode=cfg.coupling_mode, steps=cfg.kuramoto_steps,
            dt=cfg.kuramoto_dt, method=cfg.integrator, lambda_init=cfg.lambda_init,
            lambda_trainable=cfg.lambda_trainable, tau_base_init=cfg.tau_base_init, tau_alpha_init=cfg.tau_alpha_init,
            tau_beta_init=cfg.tau_beta_init, phase_noise=cfg.phase_noise, freq_jitter=cfg.freq_jitter)
        self.norm_2 = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(gcfg)
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.pma(self.norm_1(x), context)
        return self.hook_resid_post(x + self.mlp(self.norm_2(x)))


class PhaseModulatedAttentionLM(GenerateMixin, nn.Module):
    """``logits, loss = model(ids, targets)``; ``logits, metrics = model(ids, return_metrics=True)``.

    ``metrics``: ``R_mean`` (mean order parameter over PMA layers), per PMA layer (keyed by block
    index) ``R``, ``tau``, ``lambda``, ``K`` and ``attention_entropy`` (nats), the mean
    ``next_token_entropy`` (nats) and that of the last position, and ``loss`` when targets are given.
    """

    def __init__(self, config: PMAConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("PMAConfig.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([SSMBlock(config) if kind == "ssm" else PMABlock(config)
                                     for kind in config.block_types()])
        self.norm_f = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(GPT._init_weights)  # N(0, 0.02) weights, zero biases
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith((".pma.proj.weight", ".mlp.proj.weight", ".ssm.out_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for m in self.modules():
            if isinstance(m, MambaMixer):
                m.reset_dt_parameters()
            if isinstance(m, PhaseModulatedAttention):
                m.reset_parameters_after_init()
        name_hook_points(self)

    def pma_layers(self) -> dict[int, PhaseModulatedAttention]:
        return {i: b.pma for i, b in enumerate(self.blocks) if isinstance(b, PMABlock)}

    def phase_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.pma_layers().values() for p in m.phase_parameters()]

    def hook_names(self) -> list[str]:
        return hook_names(self)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def layer_metrics(self) -> dict[str, float]:
        return {f"layer{i}.{k}": v for i, m in self.pma_layers().items() for k, v in m.metrics().items()}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_metrics: bool = False):
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        layers = self.pma_layers().values()
        for m in layers:
            m.explicit = return_metrics  # attention entropy needs the pattern
        try:
            x = self.hook_embed(self.drop(self.wte(idx)))
            context = x
            for block in self.blocks:
                x = block(x, context)
                if isinstance(block, SSMBlock):
                    context = x
        finally:
            for m in layers:
                m.explicit = False
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if not return_metrics:
            return logits, loss
        return logits, self._metrics(logits, loss)

    def _metrics(self, logits: torch.Tensor, loss: torch.Tensor | None) -> dict:
        from phaselm.metrics import next_token_entropy

        ent = next_token_entropy(logits.detach())
        out: dict = {"next_token_entropy": float(ent.mean()), "next_token_entropy_last": float(ent[:, -1].mean())}
        layers = self.pma_layers()
        for key in ("R", "tau", "lambda", "K", "attention_entropy"):
            out[key] = {i: float(m.last[key]) for i, m in layers.items() if key in m.last}
        out["R_mean"] = sum(out["R"].values()) / len(layers) if layers else float("nan")
        if loss is not None:
            out["loss"] = float(loss)
        return out
