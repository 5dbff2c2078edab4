"""A GPT in the nanoGPT style: pre-LN blocks, causal attention through
``torch.nn.functional.scaled_dot_product_attention``, learned positions, tied input/output
embeddings, dropout. The attention module of each layer is pluggable, so PhaseGPT and PMA can
swap it per layer.

Shapes: tokens ``idx [B, T]`` → logits ``[B, T, vocab]``; a block maps ``x [B, T, C]`` to
``[B, T, C]`` with C = ``n_embd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(q kᵀ/√d + causal mask) v, through SDPA."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` → q, k, v each ``[B, H, T, C/H]``."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        return tuple(z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, H, T, D]`` → output projection of ``[B, T, H·D]``."""
        b, h, t, d = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, h * d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: GPTConfig, attn: nn.Module):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = attn
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


AttentionFactory = Callable[[GPTConfig, int], nn.Module]


class GenerateMixin:
    """``generate`` for a causal LM whose ``forward(idx)`` returns ``(logits [B, T, V], ...)`` and
    whose ``config.block_size`` bounds the context."""

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx [B, T]`` (context cropped to block_size)."""
        from phaselm.sampling.processors import SamplingConfig, choose_tokens

        cfg = SamplingConfig(temperature=temperature, top_k=top_k)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            nxt = choose_tokens(logits[:, -1], cfg, None if generator is None else [generator])
            idx = torch.cat([idx, nxt[:, None]], dim=1)
        return idx


class GPT(GenerateMixin, nn.Module):
    """GPT language model. ``attention_factory(cfg, layer_idx)`` builds each layer's attention
    (default :class:`CausalSelfAttention`); a module with a ``metrics()`` method exposes extra
    per-layer metrics to the trainer."""

    def __init__(self, cfg: GPTConfig, attention_factory: AttentionFactory | None = None):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.config = cfg
        make_attn = attention_factory or (lambda c, i: CausalSelfAttention(c))
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, make_attn(cfg, i)) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def layer_metrics(self) -> dict[str, float]:
        """``layer{i}.{name}`` for every attention module with a ``metrics()`` method (for logging)."""
        return {f"layer{i}.{k}": v for i, b in enumerate(self.blocks) if hasattr(b.attn, "metrics")
                for k, v in b.attn.metrics().items()}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``[B, T, V]`` and, with ``targets [B, T]``, the mean cross-entropy in nats/token."""
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
