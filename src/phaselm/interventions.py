"""Interventions on phase-modulated attention: override K, R, τ, λ or the phases.

An override replaces the tensor at a hook point (:mod:`phaselm.hooks`), so the next computation
consumes the overridden value: K feeds the Kuramoto steps (so φ, R, τ and the logits follow), φ
feeds R, P and the fast path, R and Var(P) feed τ, τ and λ feed the logits.

    set_coupling_override(model, K=3.0)            # persistent, every PMA layer
    set_coupling_override(model, K=None)           # removes it
    with override(model, R=0.2, layers=[4]):       # temporary, one layer
        logits, metrics = model(ids, return_metrics=True)
    clear_overrides(model)

A value is a number, a tensor broadcastable to the hooked tensor (K, φ, R, τ: ``[B, H, T]``; λ:
``[H]``; φ_pos: ``[H, T]``), or a function ``tensor -> tensor``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Union

import torch
from torch import nn

from phaselm.hooks import HookPoint

Value = Union[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
TARGETS = {"K": "hook_K", "R": "hook_R", "tau": "hook_tau", "lam": "hook_lambda", "lambda_": "hook_lambda",
           "phi": "hook_phi", "phi_pos": "hook_phi_pos"}
_ATTR = "_phaselm_overrides"


def _points(model: nn.Module, target: str, layers: Iterable[int] | None) -> list[HookPoint]:
    if target not in TARGETS:
        raise ValueError(f"unknown override {target!r}; choose from {', '.join(sorted(TARGETS))}")
    if not hasattr(model, "pma_layers"):
        raise TypeError(f"{type(model).__name__} has no PMA layers; overrides need a PhaseModulatedAttentionLM")
    pma = model.pma_layers()
    chosen = list(pma) if layers is None else list(layers)
    missing = [i for i in chosen if i not in pma]
    if missing:
        raise ValueError(f"layers {missing} are not PMA blocks; the PMA blocks are {sorted(pma)}")
    return [getattr(pma[i], TARGETS[target]) for i in chosen]


def _replace_with(value: Value):
    def hook(tensor: torch.Tensor, point: HookPoint) -> torch.Tensor:
        if callable(value):
            return value(tensor)
        return torch.broadcast_to(torch.as_tensor(value, dtype=tensor.dtype, device=tensor.device), tensor.shape)

    return hook


def set_override(model: nn.Module, target: str, value: Value | None, layers: Iterable[int] | None = None) -> None:
    """Persistently override ``target`` (K, R, tau, lam, phi, phi_pos) in ``layers`` (all PMA layers
    by default); ``value=None`` removes that override."""
    points = _points(model, target, layers)
    registry = model.__dict__.setdefault(_ATTR, {})
    for handle in registry.pop(target, []):
        handle.remove()
    if value is not None:
        registry[target] = [p.add_hook(_replace_with(value)) for p in points]


def set_coupling_override(model: nn.Module, K: Value | None = None, layers: Iterable[int] | None = None) -> None:
    """Fix the oscillators' coupling strength K (replacing K = f(h_SSM)); ``K=None`` removes it."""
    set_override(model, "K", K, layers)


def clear_overrides(model: nn.Module) -> None:
    """Remove every persistent override."""
    for handles in model.__dict__.pop(_ATTR, {}).values():
        for handle in handles:
            handle.remove()


@contextmanager
def override(model: nn.Module, layers: Iterable[int] | None = None, **values: Value):
    """Temporary overrides, e.g. ``with override(model, K=3.0, tau=1.0): ...``; removed on exit."""
    handles = []
    try:
        for target, value in values.items():
            handles += [p.add_hook(_replace_with(value)) for p in _points(model, target, layers)]
        yield model
    finally:
        for handle in handles:
            handle.remove()
