"""Hook points with stable names, in the TransformerLens style.

A :class:`HookPoint` is an identity module placed on an internal tensor; its dotted module path is
its name (``blocks.4.pma.hook_phi``). A hook is ``fn(tensor, hook) -> tensor | None``: returning a
tensor replaces the one the model goes on to consume, so hooks double as interventions.

    logits, _ = run_with_hooks(model, ids, fwd_hooks=[("blocks.4.pma.hook_K", lambda k, hook: 3.0 * k)])
    (logits, _), cache = run_with_cache(model, ids, names_filter=lambda n: n.endswith("hook_R"))
    with hooks(model, [(lambda n: "hook_tau" in n, fn)]):
        ...                                    # hooks are removed on exit, also after an error

``model.hook_names()`` (or :func:`hook_names`) lists every name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NameFilter = Union[str, Callable[[str], bool]]


class HookPoint(nn.Module):
    """Identity on a tensor; hooks added with :meth:`add_hook` may read or replace it."""

    def __init__(self):
        super().__init__()
        self.name: str | None = None  # set by name_hook_points()

    def add_hook(self, fn: HookFn):
        """Register ``fn(tensor, hook)``; returns a handle whose ``remove()`` detaches it."""
        return self.register_forward_hook(lambda module, inputs, output: fn(output, module))

    @property
    def active(self) -> bool:
        """True when a hook is attached (some modules switch to an explicit path then)."""
        return bool(self._forward_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def name_hook_points(model: nn.Module) -> None:
    """Give every HookPoint in ``model`` its dotted module path as ``name``."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = name


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """``{name: point}``; names are paths inside the model's ``base_model`` (a transformers causal LM's
    base model, so ``blocks.4.pma.hook_phi`` names the same point in ``PMAModel`` and ``PMAForCausalLM``)."""
    base = getattr(model, "base_model", model)
    return {name: m for name, m in base.named_modules() if isinstance(m, HookPoint)}


def hook_names(model: nn.Module) -> list[str]:
    return list(hook_points(model))


def _matching(model: nn.Module, name: NameFilter) -> dict[str, HookPoint]:
    """``{name: hook point}`` of the points of ``model`` that ``name`` (a name or a filter) selects;
    names are paths inside ``model`` (its ``base_model`` for a transformers model), so a bare module (an
    attention layer) names its own points."""
    points = hook_points(model)
    if callable(name):
        found = {n: p for n, p in points.items() if name(n)}
    else:
        found = {name: points[name]} if name in points else {}
        if not found:
            close = [n for n in points if n.split(".")[-1] == name.split(".")[-1]][:4]
            raise KeyError(f"no hook point named {name!r}; e.g. {', '.join(close) or ', '.join(list(points)[:4])} "
                           "(model.hook_names() lists them all)")
    return found


@contextmanager
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[NameFilter, HookFn]]):
    """Attach ``(name or filter, fn)`` hooks for the duration of the ``with`` block; always removed."""
    handles = []
    try:
        for name, fn in fwd_hooks:
            handles += [p.add_hook(fn) for p in _matching(model, name).values()]
        yield model
    finally:
        for h in handles:
            h.remove()


def run_with_hooks(model: nn.Module, *args, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs):
    """``model(*args, **kwargs)`` with temporary hooks."""
    with hooks(model, fwd_hooks):
        return model(*args, **kwargs)


def run_with_cache(model: nn.Module, *args, names_filter: NameFilter | None = None, detach: bool = True, **kwargs):
    """``(output, cache)``: the model's output and a dict name → tensor of every hook point that
    matches ``names_filter`` (all of them by default), as the model consumed them."""
    cache: dict[str, torch.Tensor] = {}

    def store(name):
        def fn(tensor, hook):
            cache[name] = tensor.detach() if detach else tensor
        return fn

    handles = []
    try:
        for name, point in _matching(model, names_filter or (lambda n: True)).items():
            handles.append(point.add_hook(store(name)))
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, cache
