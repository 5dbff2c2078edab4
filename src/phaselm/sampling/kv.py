"""Perturbed copies of a KV cache that cost O(perturbed layers), for any transformers causal LM.

:class:`RowGroupCache` is a :class:`transformers.DynamicCache` (it *is* the clean cache) that can
run extra *row groups* through the upper part of the model in the same forward pass:

* Below ``first_layer`` every group would compute the same thing, so the model runs the clean
  batch of B rows there.
* From ``first_layer`` on, forward pre-hooks repeat the hidden state and every batch-shaped
  argument (attention mask, rotary embeddings, position ids) to ``n·B`` rows, group-major:
  row ``g·B + b`` is group ``g`` of prompt ``b``. Group 0 is the clean path.
* In :meth:`RowGroupCache.update` group ``g`` attends to the *clean* past keys/values plus its own
  new entries; its value vectors at the last ``window`` positions are multiplied by
  ``rotations[layer][g-1, b, kv_head]`` (``v ← R v``). Only group 0's new entries are stored, so the
  cache stays exactly the clean cache: the perturbed state is discarded after every pass.

Heads are key/value heads (GQA aware): a rotation of KV head h reaches every query head that
reads it. Everything goes through the public Cache API that transformers' attention layers call
(``past_key_values.update(k, v, layer_idx)``), so GPT-2, Llama, Qwen2, Mistral, SmolLM2 and
other decoder-only models work unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.layers``, ``transformer.h``, ...)."""
    n_layers = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find the {n_layers} decoder layers of {type(model).__name__}")


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers causal LM config."""
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return cfg.num_hidden_layers, n_kv, head_dim


class RowGroupCache(DynamicCache):
    """The clean KV cache, plus perturbed row groups from ``first_layer`` on (see module doc).

    Use :meth:`attach` (a context manager) once around decoding to install the layer hooks, and
    :meth:`row_groups` around each forward pass that should carry perturbed groups.
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        self.n_groups = 1
        self.first_layer = 0
        self.batch = 0
        self.rotations: dict[int, torch.Tensor] = {}
        self.window: int | None = None

    @contextmanager
    def attach(self, model: nn.Module, first_layer: int):
        """Install pre-hooks on decoder layers ``first_layer..L-1`` for the duration of the block."""
        self.first_layer = first_layer
        layers = decoder_layers(model)
        handles = [
            layer.register_forward_pre_hook(self._repeat_rows, with_kwargs=True) for layer in layers[first_layer:]
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def row_groups(self, batch: int, rotations: dict[int, torch.Tensor], window: int | None):
        """Run ``1 + n_perturbed`` row groups in the forward passes inside the block.

        ``rotations[layer]``: ``[n_perturbed, B or 1, num_kv_heads, head_dim, head_dim]`` (one
        rotation per group, row and KV head; identity for heads left alone; a row axis of 1 is
        shared by all rows); layers without an entry are not rotated. ``window``: how many of the
        most recent positions are rotated (``None``: all).
        """
        sizes = {r.shape[0] for r in rotations.values()}
        if len(sizes) != 1:
            raise ValueError("every layer's rotations must have the same number of perturbed groups")
        if min(rotations) < self.first_layer:
            raise ValueError(f"rotation at layer {min(rotations)} is below the first hooked layer {self.first_layer}")
        self.n_groups, self.batch, self.rotations, self.window = 1 + sizes.pop(), batch, rotations, window
        try:
            yield
        finally:
            self.n_groups, self.rotations = 1, {}

    def _repeat_rows(self, module, args, kwargs):
        n, b = self.n_groups, self.batch
        if n == 1:
            return None

        def repeat(x):
            if isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] == b:
                return x.repeat(n, *([1] * (x.ndim - 1)))
            if isinstance(x, tuple) and x and all(isinstance(t, torch.Tensor) for t in x):
                return tuple(repeat(t) for t in x)
            return x

        return (
            tuple(repeat(a) for a in args),
            {k: (v if k == "cache_position" else repeat(v)) for k, v in kwargs.items()},
        )

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = self.n_groups
        if n == 1 or layer_idx < self.first_layer:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        new_k = key_states.unflatten(0, (n, -1))  # [n, B, H, q, d]
        new_v = value_states.unflatten(0, (n, -1))
        keys, values = super().update(new_k[0], new_v[0], layer_idx, *args, **kwargs)  # clean: [B, H, T, d]
        q = key_states.shape[-2]
        past_k, past_v = keys[..., : keys.shape[-2] - q, :], values[..., : values.shape[-2] - q, :]
        all_k = torch.cat([past_k.unsqueeze(0).expand(n, *past_k.shape), new_k], dim=-2)
        all_v = torch.cat([past_v.unsqueeze(0).expand(n, *past_v.shape), new_v], dim=-2)
        rot = self.rotations.get(layer_idx)
        if rot is not None:
            width = all_v.shape[-2] if self.window is None else min(self.window, all_v.shape[-2])
            window = all_v[1:, ..., -width:, :]  # [n-1, B, H, W, d]
            all_v[1:, ..., -width:, :] = torch.einsum("gbhwd,gbhed->gbhwe", window, rot.to(window.dtype))
        return all_k.flatten(0, 1), all_v.flatten(0, 1)
