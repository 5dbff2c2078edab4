"""Matmul form for the few-row linear layers of the perturbed suffix, chosen by one measurement.

Decoding runs each linear layer on a handful of rows. On some CPU BLAS builds ``F.linear(x, W)``
(``x Wᵀ``) with 2 rows costs 2-3× its 1-row time, while the same product written as ``(W xᵀ)ᵀ``
costs about the 1-row time (measured on the 2-core dev machine, LM head W [49152, 576]: 29 ms vs
4.9 ms). Both compute y = x Wᵀ + b, exactly the same function (only the order of float
additions may differ, ~1e-7 relative).

:func:`fast_linears` times both forms once per distinct (out, in) shape at the row count the
sampler will use, and, for the duration of a ``with`` block, routes every linear layer given to it
whose transposed form was faster through that form when it sees exactly that many rows. Nothing
changes on CUDA (no measurement, no patch) or where ``F.linear`` wins.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


_VERDICTS: dict[tuple, bool] = {}
"""(weight shape, dtype, rows, threads) -> whether the transposed form won the measurement."""


def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` computed as ``(W xᵀ)ᵀ + b``; x ``[..., in]`` → ``[..., out]``."""
    flat = x.reshape(-1, x.shape[-1])
    y = (weight @ flat.T).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def transposed_is_faster(weight: torch.Tensor, rows: int, repeats: int = 5, margin: float = 0.8) -> bool:
    """One measurement: is ``(W xᵀ)ᵀ`` faster than ``F.linear(x, W)`` for ``rows`` input rows?
    (best of ``repeats``; the transposed form must win by ``1 − margin`` to be chosen)."""
    # a private generator: the measurement must not move the global RNG that sampling draws from
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    plain = _best_time(lambda: F.linear(x, weight), repeats)
    flipped = _best_time(lambda: _transposed(x, weight, None), repeats)
    return flipped < margin * plain


@contextmanager
def fast_linears(modules: list[nn.Module], rows: int):
    """Inside the block, each ``nn.Linear`` in ``modules`` whose weight shape was measured faster in the
    transposed form computes its ``rows``-row inputs that way (see the module doc)."""
    linears = [m for m in modules if type(m) is nn.Linear and m.weight.device.type == "cpu" and rows >= 2]
    patched = []
    for lin in linears:
        key = (tuple(lin.weight.shape), lin.weight.dtype, rows, torch.get_num_threads())
        if key not in _VERDICTS:  # measured once per process
            _VERDICTS[key] = transposed_is_faster(lin.weight, rows)
        if _VERDICTS[key] and "forward" not in vars(lin):
            lin.forward = _make_forward(lin, rows)
            patched.append(lin)
    try:
        yield {k: v for k, v in _VERDICTS.items() if k[2] == rows}
    finally:
        for lin in patched:
            del lin.forward


def _make_forward(lin: nn.Linear, rows: int):
    def forward(x):
        if x.numel() // x.shape[-1] == rows:
            return _transposed(x, lin.weight, lin.bias)
        return F.linear(x, lin.weight, lin.bias)

    return forward
