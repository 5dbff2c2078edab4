"""Interventions on phase-modulated attention: override K, R, τ, λ or the phases.

An override replaces the tensor at a hook point (:mod:`phaselm.nn.hooks`), so the next computation
consumes the overridden value: K feeds the Kuramoto steps (so φ, R, τ and the logits follow), φ
feeds R, P and the fast path, R and Var(P) feed τ, τ and λ feed the logits.

    set_coupling_override(model, K=3.0)            # persistent, every PMA layer
    set_coupling_override(model, K=None)           # removes it
    with override(model, R=0.2, layers=[4]):       # temporary, one layer
        metrics = model(ids, return_metrics=True).metrics
    clear_overrides(model)

A value is a number, a tensor broadcastable to the hooked tensor (K, φ, R, τ: ``[B, H, T]``; λ:
``[H]``; φ_pos: ``[H, T]``), or a function ``tensor -> tensor``. Numbers and tensors are checked
when the override is set (a ``ValueError`` naming the target, and nothing installed): finite,
R in [0, 1], τ > 0, λ in [0, 1] (P_eff = λ·cos + 1 − λ stays a mix; the learned λ lies in
[0, 0.5)), and a shape whose head axis is 1 or the layer's head count. ``layers`` is a layer
index or a list of them. Persistent overrides are kept per target *and layer*: overriding K on
layer 4 and then on layer 5 keeps both; overriding layer 4 again replaces its value.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Callable, Iterable, Union

import torch
from torch import nn

from phaselm.nn.hooks import HookPoint

Value = Union[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
TARGETS = {"K": "hook_K", "R": "hook_R", "tau": "hook_tau", "lam": "hook_lam",
           "phi": "hook_phi", "phi_pos": "hook_phi_pos"}
_ATTR = "_phaselm_overrides"
# (lowest, highest, lowest allowed?) per target; every value must also be finite
RANGES = {"R": (0.0, 1.0, True), "tau": (0.0, math.inf, False), "lam": (0.0, 1.0, True)}
# index of the head axis counted from the end, and the most dimensions, of each hooked tensor
SHAPES = {"K": (-2, 3), "phi": (-2, 3), "R": (-2, 3), "tau": (-2, 3), "lam": (-1, 1),
          "phi_pos": (-2, 2)}


def _points(model: nn.Module, target: str, layers: int | Iterable[int] | None) -> dict[int, HookPoint]:
    """``{layer: hook point}`` of ``target`` in the chosen PMA layers (all of them by default)."""
    if target not in TARGETS:
        raise ValueError(f"unknown override {target!r}; choose from {', '.join(sorted(TARGETS))}")
    if not hasattr(model, "pma_layers"):
        raise TypeError(f"{type(model).__name__} has no PMA layers; overrides need a PMAForCausalLM (phaselm.PhaseModulatedAttentionLM)")
    pma = model.pma_layers()
    chosen = list(pma) if layers is None else [layers] if isinstance(layers, numbers.Integral) else list(layers)
    missing = [i for i in chosen if i not in pma]
    if missing:
        raise ValueError(f"layers {missing} are not PMA blocks; the PMA blocks are {sorted(pma)}")
    return {int(i): getattr(pma[i], TARGETS[target]) for i in chosen}


def check_value(target: str, value: Value, n_head: int) -> Value:
    """``value`` if it is a valid override of ``target`` for layers of ``n_head`` heads, else a
    one-line ``ValueError`` (functions are checked when they run)."""
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"override {target}: expected a number, a tensor or a function, got "
                         f"{type(value).__name__} {value!r}")
    t = torch.as_tensor(value).detach()
    if t.is_complex():
        raise ValueError(f"override {target}: expected real values, got {t.dtype}")
    t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"override {target}: every value must be finite, got {_show(t)}")
    low, high, closed = RANGES.get(target, (-math.inf, math.inf, True))
    if bool((t > high).any()) or bool((t < low).any() if closed else (t <= low).any()):
        rule = f"in [{low:g}, {high:g}]" if closed else f"> {low:g}"
        raise ValueError(f"override {target}: values must be {rule}, got {_show(t)}")
    axis, most = SHAPES[target]
    if t.dim() > most or t.dim() >= -axis and t.shape[axis] not in (1, n_head):
        raise ValueError(f"override {target}: a tensor of shape {tuple(t.shape)} does not broadcast to the hooked "
                         f"tensor ({'[H]' if most == 1 else '[H, T]' if most == 2 else '[B, H, T]'}, H = {n_head})")
    return value


def _show(t: torch.Tensor) -> str:
    return f"{t.item():g}" if t.numel() == 1 else f"a tensor with values {t.min().item():g}..{t.max().item():g}"


def _replace_with(target: str, value: Value):
    def hook(tensor: torch.Tensor, point: HookPoint) -> torch.Tensor:
        if callable(value):
            return value(tensor)
        v = torch.as_tensor(value, dtype=tensor.dtype, device=tensor.device)
        try:
            return torch.broadcast_to(v, tensor.shape)
        except RuntimeError:
            raise ValueError(f"override {target}: a tensor of shape {tuple(v.shape)} does not broadcast to the "
                             f"hooked tensor of shape {tuple(tensor.shape)}") from None

    return hook


def _install(model: nn.Module, target: str, value: Value, layers) -> dict[int, object]:
    """Check ``value`` for every chosen layer, then hook it in; ``{layer: handle}``."""
    points = _points(model, target, layers)
    pma = model.pma_layers()
    for i in points:
        check_value(target, value, pma[i].n_head)
    return {i: p.add_hook(_replace_with(target, value)) for i, p in points.items()}


def set_override(model: nn.Module, target: str, value: Value | None,
                 layers: int | Iterable[int] | None = None) -> None:
    """Persistently override ``target`` (K, R, tau, lam, phi, phi_pos) in ``layers`` (all PMA layers
    by default), replacing an earlier override of the same target on those layers and keeping it on
    the others; ``value=None`` removes the override from ``layers``."""
    chosen = _points(model, target, layers)
    new = {} if value is None else _install(model, target, value, layers)  # validated before anything is removed
    registry = model.__dict__.setdefault(_ATTR, {}).setdefault(TARGETS[target], {})
    for i in chosen:
        if i in registry:
            registry.pop(i).remove()
    registry.update(new)


def set_coupling_override(model: nn.Module, K: Value | None = None, layers: int | Iterable[int] | None = None) -> None:
    """Fix the oscillators' coupling strength K (replacing K = f(h_SSM)); ``K=None`` removes it."""
    set_override(model, "K", K, layers)


def clear_overrides(model: nn.Module) -> None:
    """Remove every persistent override."""
    for handles in model.__dict__.pop(_ATTR, {}).values():
        for handle in handles.values():
            handle.remove()


@contextmanager
def override(model: nn.Module, layers: Iterable[int] | None = None, **values: Value):
    """Temporary overrides, e.g. ``with override(model, K=3.0, tau=1.0): ...``; removed on exit."""
    handles = []
    try:
        for target, value in values.items():
            handles += list(_install(model, target, value, layers).values())
        yield model
    finally:
        for handle in handles:
            handle.remove()
