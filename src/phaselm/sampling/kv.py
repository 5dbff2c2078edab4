"""Perturbed copies of a model's cache that cost O(perturbed layers), for any transformers causal LM.

:class:`RowGroups` runs extra *row groups* through the upper part of a model, in the same forward
pass as the clean rows, over any transformers :class:`~transformers.Cache` (the one ``generate``
builds, or :class:`RowGroupCache`):

* Below ``first_layer`` every group would compute the same thing, so the model runs the clean
  batch of B rows there.
* From ``first_layer`` on, forward pre-hooks repeat the hidden state and every batch-shaped
  argument (attention mask, rotary embeddings, position ids, Bloom's ALiBi ``[B·H, 1, T]``) to
  ``n·B`` rows, group-major: row ``g·B + b`` is group ``g`` of prompt ``b``. Group 0 is the clean
  path. Which arguments are batch-shaped is measured once per model (:func:`batch_plan`: the
  arguments of a 2-row and a 1-row forward pass), not guessed from shapes: MPT's ALiBi
  ``[H, 1, T]`` looks like Bloom's at batch 1 but is shared by all rows.
* Key/value layers (``cache.update(k, v, layer_idx)``, patched on the cache instance): group
  ``g`` attends to the *clean* past keys/values plus its own new entries; its value vectors at the
  ``window`` positions ending at the newest entry are multiplied by
  ``rotations[layer][g-1, b, kv_head]`` (``v ← R v``).
  Only group 0's new entries are stored.
* Recurrent / convolutional layer states (transformers ``LinearAttentionLayer`` and the hybrid
  layers, read with ``get_conv_state`` / ``get_recurrent_state`` and written with
  ``update_conv_state`` / ``update_recurrent_state`` or in place): for the duration of the pass each
  state ``[B, ...]`` is replaced by ``n`` copies of itself ``[n·B, ...]``, so every group reads the
  clean state; afterwards rows ``0..B-1`` are copied back into the original tensor and the other
  groups' updates are dropped.

So the cache stays exactly the clean cache: the perturbed state is discarded after every pass.
Heads are key/value heads (GQA aware): a rotation of KV head h reaches every query head that reads
it. Static caches (``cache_implementation="static"``) write in place: the clean rows' update writes the
clean slots as usual and each group gets a copy of the layer's keys/values with its own new entries in
those slots (:func:`write_slots`), so the static addresses (and a compiled step) stay valid. Quantised
and offloaded caches are refused (:func:`check_cache`).
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.layers``, ``transformer.h``, ...)."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find the {n_layers} decoder layers of {type(model).__name__}")


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers causal LM config (value head dim)."""
    cfg = model.config.get_text_config(decoder=True)
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        n_kv = 1  # Falcon / GPTBigCode multi-query attention: one shared key/value head
    head_dim = getattr(cfg, "v_head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return cfg.num_hidden_layers, n_kv, head_dim


NON_ATTENTION_LAYER_TYPES = ("conv", "linear_attention", "dummy", "moe", "mlp")


def attention_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers that keep keys/values (the layers whose heads Phase-Slip can
    rotate), from the cache layer types transformers derives from the config (``layer_types``): every
    type but the recurrent / convolutional / cache-less ones (unknown kinds are left to the probe)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    cfg = model.config.get_text_config(decoder=True)
    if not getattr(cfg, "num_attention_heads", None):
        return []
    types, _ = get_layer_types_and_kwargs(cfg)
    return [i for i, t in enumerate(types) if t not in NON_ATTENTION_LAYER_TYPES]


def is_static(cache) -> bool:
    """Whether ``cache`` (a transformers ``Cache``) has static key/value layers (``StaticCache``)."""
    from transformers.cache_utils import StaticLayer

    return any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ()))


def _is_state_layer(layer) -> bool:
    return hasattr(layer, "conv_states") and hasattr(layer, "recurrent_states")


def check_cache(cache) -> None:
    """Raise a one-line ``ValueError`` unless every layer of ``cache`` is a kind :class:`RowGroups` handles:
    a dynamic or static key/value layer (sliding or not; the perturbed rows get copies of its entries,
    :func:`write_slots`), a recurrent / convolutional state layer, a hybrid of both, or a placeholder.
    Quantised, offloaded and indexed (sparse-attention) layers are refused."""
    from transformers.cache_utils import (
        BaseQuantizedLayer, DummyLayer, DynamicIndexedLayer, DynamicLayer, StaticIndexedLayer, StaticLayer,
    )

    if getattr(cache, "offloading", False):
        raise ValueError("Phase-Slip cannot use an offloaded cache; use the default dynamic cache or "
                         "cache_implementation='static'")
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if isinstance(layer, (BaseQuantizedLayer, DynamicIndexedLayer, StaticIndexedLayer)) or not (
                isinstance(layer, (DynamicLayer, StaticLayer, DummyLayer)) or _is_state_layer(layer)):
            raise ValueError(
                f"Phase-Slip cannot copy layer {i} of this cache (a {type(layer).__name__}) for its perturbed rows; "
                "use the default dynamic cache or cache_implementation='static' (no quantised cache)"
            )


class RowGroups:
    """Perturbed row groups over ``cache`` from ``first_layer`` on (see the module doc).

    Use :meth:`attach` (a context manager) once around decoding to install the layer hooks and the
    cache patch, and :meth:`row_groups` around each forward pass that should carry perturbed groups.
    """

    def __init__(self, cache):
        self.cache = cache
        self.n_groups = 1
        self.first_layer = 0
        self.batch = 0
        self.rotations: dict[int, torch.Tensor] = {}
        self.window: int | None = None

    @contextmanager
    def attach(self, model: nn.Module, first_layer: int):
        """Install pre-hooks on decoder layers ``first_layer..L-1`` and route ``cache.update`` through
        :meth:`update` for the duration of the block."""
        check_cache(self.cache)
        self.first_layer = first_layer
        plans = batch_plan(model, first_layer)
        layers = decoder_layers(model)
        handles = [
            layer.register_forward_pre_hook(functools.partial(self._repeat_rows, plan), with_kwargs=True)
            for layer, plan in zip(layers[first_layer:], plans)
        ]
        own = vars(self.cache).get("update")
        clean_update = self.cache.update
        self._clean_update = clean_update
        self.cache.update = self.update
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if own is None:
                vars(self.cache).pop("update", None)
            else:
                self.cache.update = own

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
        saved = self._expand_states()
        try:
            yield
        finally:
            self._collapse_states(saved)
            self.n_groups, self.rotations = 1, {}

    # ------------------------------------------------------------------ recurrent / conv states
    def _expand_states(self) -> list:
        """Replace every state ``[B, ...]`` of the state layers at or above ``first_layer`` by ``n``
        stacked copies ``[n·B, ...]``; return what :meth:`_collapse_states` needs to undo it."""
        saved = []
        for layer in getattr(self.cache, "layers", ())[self.first_layer:]:
            if not _is_state_layer(layer):
                continue
            for states in (layer.conv_states, layer.recurrent_states):
                for idx, clean in list(states.items()):
                    if clean is not None:
                        states[idx] = clean.repeat(self.n_groups, *([1] * (clean.ndim - 1)))
                    saved.append((states, idx, clean))
        return saved

    def _collapse_states(self, saved: list) -> None:
        """Keep the clean rows of every expanded state (in the original tensor where the shape allows,
        so a static address survives); drop the perturbed rows."""
        b = self.batch
        for states, idx, clean in saved:
            grown = states[idx]
            if grown is None:
                continue
            if clean is not None and clean.shape == grown[:b].shape:
                clean.copy_(grown[:b])
                states[idx] = clean
            else:  # created (or resized) during this pass
                states[idx] = grown[:b].clone()

    # ------------------------------------------------------------------ hidden rows and KV
    def _repeat_rows(self, plan, module, args, kwargs):
        """Pre-hook: repeat every argument that ``plan`` (:func:`batch_plan`) marks batch-shaped to ``n``
        groups, unless it already has them (the hidden state above the first hooked layer)."""
        if self.n_groups == 1:
            return None
        return repeat_batch_shaped((args, kwargs), plan, self.batch, self.n_groups)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """``cache.update`` during decoding: clean rows are stored as usual; every group gets the clean
        keys/values with its own new entries in the slots the clean ones went to, perturbed values rotated
        over the ``window`` positions ending at the newest entry (module doc). Shapes: ``key_states``
        ``[n·B, H, q, d]`` in, ``[n·B, H, T, d]`` out (``T``: what the layer returns, e.g. ``max_cache_len``
        for a static layer)."""
        n = self.n_groups
        if n == 1 or layer_idx < self.first_layer:
            return self._clean_update(key_states, value_states, layer_idx, *args, **kwargs)
        new_k = key_states.unflatten(0, (n, -1))  # [n, B, H, q, d]
        new_v = value_states.unflatten(0, (n, -1))
        q = key_states.shape[-2]
        slots = write_slots(self.cache.layers[layer_idx], q, key_states.device)  # before the update moves it
        keys, values = self._clean_update(new_k[0], new_v[0], layer_idx, *args, **kwargs)  # clean: [B, H, T, d]
        if slots is None:  # appended: the last q of what the layer returns
            slots = torch.arange(keys.shape[-2] - q, keys.shape[-2], device=keys.device)
        all_k = keys.unsqueeze(0).repeat(n, 1, 1, 1, 1)  # [n, B, H, T, d]: copies, the cache is not touched
        all_v = values.unsqueeze(0).repeat(n, 1, 1, 1, 1)
        all_k[1:].index_copy_(-2, slots, new_k[1:])
        all_v[1:].index_copy_(-2, slots, new_v[1:])
        rot = self.rotations.get(layer_idx)
        if rot is not None:
            # the window: positions end-W .. end-1 (end = newest slot + 1); those below 0 clamp to slot 0, which is
            # then in the window anyway, so the duplicates write the same R·v_0
            width = all_v.shape[-2] if self.window is None else self.window
            window = (slots[-1] + 1 - width + torch.arange(width, device=slots.device)).clamp(min=0)
            picked = all_v[1:].index_select(-2, window)  # [n-1, B, H, W, d]
            all_v[1:].index_copy_(-2, window, torch.einsum("gbhwd,gbhed->gbhwe", picked, rot.to(picked.dtype)))
        return all_k.flatten(0, 1), all_v.flatten(0, 1)


def write_slots(layer, q: int, device) -> torch.Tensor | None:
    """Where ``layer.update`` will put ``q`` new entries in the tensor it returns, read *before* the update:
    a ``[q]`` index tensor for static layers, which write in place (``StaticLayer``: after the
    ``cumulative_length`` filled slots; ``StaticSlidingWindowLayer`` once full: the last slot after its roll),
    ``None`` where the new entries come last (dynamic layers, and a sliding static layer becoming full,
    which returns past + new)."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    if isinstance(layer, StaticSlidingWindowLayer):
        done, size = layer.cumulative_length_int, layer.max_cache_len
        if done >= size and q == 1:
            return torch.tensor([size - 1], device=device)
        if done + q > size:
            return None
    if isinstance(layer, StaticLayer):
        return torch.arange(q, device=device) + layer.cumulative_length.to(device)
    return None


_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rows_per_prompt(two, one):
    """The plan of one argument, from its value in a 2-prompt (``two``) and a 1-prompt (``one``) pass:
    ``k`` for a tensor with ``k`` rows per prompt on dim 0 (``[k·B, ...]``), 0 for a tensor shared by
    all prompts, ``None`` where the two passes disagree in structure; tuples / dicts element-wise."""
    if isinstance(two, torch.Tensor) and isinstance(one, torch.Tensor):
        if two.ndim == one.ndim >= 1 and two.shape[0] == 2 * one.shape[0] and two.shape[1:] == one.shape[1:]:
            return one.shape[0]
        return 0 if two.shape == one.shape else None
    if isinstance(two, (tuple, list)) and isinstance(one, (tuple, list)) and len(two) == len(one):
        return tuple(_rows_per_prompt(a, b) for a, b in zip(two, one))
    if isinstance(two, dict) and isinstance(one, dict) and two.keys() == one.keys():
        return {k: _rows_per_prompt(two[k], one[k]) for k in two}
    return None


def repeat_batch_shaped(value, plan, batch: int, n: int):
    """``value`` (a layer's arguments: tensors in tuples / dicts) with every tensor that ``plan`` marks
    as ``[k·B, ...]`` and that still has ``k·batch`` rows repeated ``n`` times on dim 0 (group-major).
    Where no plan was measured (``None``), a tensor of ``[batch, ...]`` is taken as batch-shaped."""
    if isinstance(value, torch.Tensor):
        k = 1 if plan is None and value.ndim >= 2 else plan
        if isinstance(k, int) and k > 0 and value.shape[0] == k * batch:
            return value.repeat(n, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, (tuple, list)):
        plans = plan if isinstance(plan, tuple) and len(plan) == len(value) else (None,) * len(value)
        items = [repeat_batch_shaped(v, p, batch, n) for v, p in zip(value, plans)]
        return items if isinstance(value, list) else type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        plans = plan if isinstance(plan, dict) else {}
        return {k: repeat_batch_shaped(v, plans.get(k), batch, n) for k, v in value.items()}
    return value


@torch.no_grad()
def batch_plan(model: nn.Module, first_layer: int) -> list:
    """For each decoder layer from ``first_layer`` on, which of its call arguments ``(args, kwargs)``
    carry the batch: measured once per model by running 2 left-padded prompts and then 1 (3 tokens,
    fresh caches) and comparing the arguments each layer receives (:func:`_rows_per_prompt`)."""
    key = ("plan", first_layer, torch.get_default_dtype())
    done = _PROBES.setdefault(model, {})
    if key not in done:
        layers = decoder_layers(model)[first_layer:]
        device = next(model.parameters()).device
        vocab = model.config.get_text_config(decoder=True).vocab_size
        ids = ((torch.arange(6, device=device) * 7 + 3) % vocab).view(2, 3)
        mask = torch.ones_like(ids)
        mask[:, 0] = 0  # both passes left-padded, so both build the same kind of attention mask
        seen: list[list] = []

        def record(module, args, kwargs):
            seen[-1].append((args, kwargs))

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        try:
            for rows in (2, 1):
                seen.append([])
                model(input_ids=ids[:rows], attention_mask=mask[:rows],
                      position_ids=(mask[:rows].cumsum(-1) - 1).clamp(min=0), use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        two, one = seen
        done[key] = [_rows_per_prompt(a, b) for a, b in zip(two, one)] if len(two) == len(one) == len(layers) \
            else [None] * len(layers)
    return done[key]


@torch.no_grad()
def probe_row_groups(model: nn.Module, first_layer: int, static: bool = False) -> dict[int, tuple[int, int]]:
    """Check, once per model, first layer and cache kind (``static``: a transformers ``StaticCache``, else
    the model's default dynamic cache), that perturbed row groups run on ``model`` and leave its cache
    clean; return each attention layer's value geometry ``{layer: (kv_heads, head_dim)}`` as the cache
    really stores it.

    Probe (5 tokens, 2 rows, one left-padded): two caches get the same 3-token prefill; the fourth token runs plainly
    on one and with a perturbed row group (every value rotated by 90°) on the other; then a fifth
    token runs plainly on both. The clean rows of the grouped pass and the last logits must agree
    with the plain run. A model that fails (an exception, or state that leaks between rows) gets a
    one-line ``ValueError``: it is refused before anything is generated.
    """
    key = (first_layer, torch.get_default_dtype(), static)
    done = _PROBES.setdefault(model, {})
    if key in done:
        return done[key]
    name = type(model).__name__

    def fresh():
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=5) if static else None

    device = next(model.parameters()).device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = (torch.arange(5, device=device) * 7 + 3) % vocab
    ids = torch.stack([ids, ids.flip(0)])  # [2, 5]; row 0 is left-padded by one token
    full_mask = torch.ones_like(ids)
    full_mask[0, 0] = 0
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)

    def run(cache, start, stop):
        return model(input_ids=ids[:, start:stop], attention_mask=full_mask[:, :stop],
                     position_ids=positions[:, start:stop], past_key_values=cache, use_cache=True)

    try:
        plain, grouped = run(fresh(), 0, 3).past_key_values, run(fresh(), 0, 3).past_key_values
        if plain is None or not hasattr(plain, "layers"):
            raise ValueError(f"{name} returns no transformers Cache; Phase-Slip needs one")
        check_cache(grouped)
        geometry = {i: (layer.values.shape[1], layer.values.shape[-1]) for i, layer in enumerate(plain.layers)
                    if getattr(layer, "values", None) is not None and layer.values.ndim == 4}
        groups = RowGroups(grouped)
        quarter = torch.zeros(2, 2)
        quarter[0, 1], quarter[1, 0] = -1.0, 1.0  # 90° in the first plane of every head
        rotations = {}
        for layer, (heads, dim) in geometry.items():
            if layer >= first_layer:
                rot = torch.eye(dim, device=device).repeat(1, 1, heads, 1, 1)
                rot[..., :2, :2] = quarter.to(device)
                rotations[layer] = rot
        if not rotations:
            raise ValueError(f"{name} stores no key/value cache at or above layer {first_layer}")
        z_plain = run(plain, 3, 4).logits[:, -1]
        with groups.attach(model, first_layer), groups.row_groups(2, rotations, None):
            z_grouped = run(grouped, 3, 4).logits[:, -1]
        next_plain, next_grouped = run(plain, 4, 5).logits[:, -1], run(grouped, 4, 5).logits[:, -1]
    except Exception as err:  # noqa: BLE001 - any failure means this architecture cannot carry the rows
        text = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if isinstance(err, ValueError) and "Phase-Slip" in text:
            raise ValueError(text) from None
        raise ValueError(f"{name} cannot run Phase-Slip's perturbed rows ({type(err).__name__}: {text}); "
                         "use plain sampling for this architecture") from None
    if z_grouped.shape[0] != 4 or not (torch.allclose(z_grouped[:2], z_plain, rtol=1e-3, atol=1e-3)
                                       and torch.allclose(next_grouped, next_plain, rtol=1e-3, atol=1e-3)):
        raise ValueError(f"{name} keeps state that Phase-Slip's perturbed rows would corrupt (probe mismatch); "
                         "use plain sampling for this architecture")
    done[key] = geometry
    return geometry


class RowGroupCache(DynamicCache):
    """A :class:`transformers.DynamicCache` with :class:`RowGroups` built in (the clean cache itself).

    ``with cache.attach(model, first_layer): ... with cache.row_groups(B, rotations, window): model(...)``
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        self._groups = RowGroups(self)

    def attach(self, model: nn.Module, first_layer: int):
        return self._groups.attach(model, first_layer)

    def row_groups(self, batch: int, rotations: dict[int, torch.Tensor], window: int | None):
        return self._groups.row_groups(batch, rotations, window)
