"""Next-token logit processing and sampling, shared by every sampler.

Order (as in transformers' ``generate``): temperature → top-k → top-p → min-p, then sample from
the softmax (or take the argmax for greedy decoding). Removed tokens get logit ``-inf``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MAX_SEED = 2**63 - 1


def check_seed(name: str, value) -> int:
    """``value`` as a seed: an integer in [0, 2**63 - 1] (what every torch generator accepts), else a
    one-line ValueError (a float, a bool, a string or an out-of-range number is never truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How a next token is chosen from logits.

    ``temperature``: T > 0 (logits / T). ``top_k``: keep the k largest logits. ``top_p``: keep
    the smallest set of most likely tokens whose probability sums to >= p, p in (0, 1].
    ``min_p``: keep tokens with probability >= min_p · max probability, min_p in [0, 1).
    ``do_sample=False``: greedy (argmax); the other knobs are then ignored.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    do_sample: bool = True

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not self.do_sample:
            return

        def real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        if not (real(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {self.temperature!r}; "
                             "use do_sample=False for greedy decoding")
        if self.top_k is not None and not (isinstance(self.top_k, numbers.Integral) and not isinstance(self.top_k, bool)
                                           and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {self.top_k!r}")
        if self.top_p is not None and not (real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {self.top_p!r}")
        if self.min_p is not None and not (real(self.min_p) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1) (or None to disable), got {self.min_p!r}")


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p to ``logits [B, V]``; returns new float logits."""
    z = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < z.shape[-1]:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cum = sorted_z.softmax(-1).cumsum(-1)
        # drop a token when the more likely tokens before it already reach top_p (keeps >= 1 token)
        drop_sorted = (cum - sorted_z.softmax(-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    if cfg.min_p is not None and cfg.min_p > 0:
        probs = z.softmax(-1)
        z = z.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return z


def choose_tokens(logits: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]``: argmax when greedy, else a draw from the processed
    softmax; with one generator per row (``generators[b]``) each row's draws depend only on its seed."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = process_logits(logits, cfg).softmax(-1)
    if generators is None or len(generators) == 1:
        return torch.multinomial(probs, 1, generator=None if generators is None else generators[0]).squeeze(-1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])
