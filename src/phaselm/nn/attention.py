"""Standard attention building blocks and the cache plumbing shared by every attention layer.

Every block takes explicit sizes (width, heads, dropout, ...), not a model's config, and works in
two modes with the same weights:

* a full forward over ``x [B, T, C]`` (training; ``inputs=PLAIN`` means plain causal attention);
* incremental decoding through the transformers Cache API (:class:`LayerInputs` carries the cache,
  the attention mask ``[B, 1, T, S]`` over the S = past + T keys, the position ids and which tokens
  are padding). Keys and values go through ``cache.update(k, v, layer_idx)``; the oscillators'
  running mean fields are a per-layer recurrent state (``cache.get_recurrent_state`` /
  ``update_recurrent_state``, :func:`phasor_sums` / :func:`store_phasor_sums`), so a new token
  costs O(N) for its oscillators.

Attention itself is one call, :func:`attend`, through transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``), so ``attn_implementation="sdpa" | "eager" | "flex_attention"`` switches
it as for Llama; phase-coupled and phase-modulated attention reach it as one dot product over
enlarged query/key features. A static cache (``cache_implementation="static"``) keeps every state in
fixed-shape tensors updated in place, so the decoding step compiles to one graph.

Blocks: :class:`CausalSelfAttention` (softmax(q kᵀ/√d + mask) v), :class:`MLP`,
:class:`Block` (pre-LN). Phase-coupled and phase-modulated attention subclass
:class:`CausalSelfAttention` in :mod:`phaselm.nn.phase_coupled` and :mod:`phaselm.nn.phase_modulated`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from phaselm.nn import oscillators as osc
from phaselm.nn.mamba import CausalConv1d

# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class LayerInputs:
    """What every layer of one forward pass needs besides its hidden state.

    ``cache``: a transformers ``Cache`` (None: no incremental decoding). ``mask``: boolean
    ``[B, 1, T, S]``, True where query i may attend key j (None: plain causal over T keys).
    ``positions``: position ids ``[B, T]`` (None: 0..T−1). ``valid``: ``[B, T]``, 1.0 for a real
    token, 0.0 for padding (None: all real). ``past``: how many tokens the cache held before;
    ``seen``: ``[B]``, how many of them were real tokens (what the running Kuramoto sums of the cache
    hold; None without a cache). ``output_attentions``: attention layers compute their pattern
    explicitly and keep it as ``attention_weights`` ``[B, H, T, S]`` (the eager path).
    ``attn_implementation``: the attention function of transformers' interface (the config's
    ``_attn_implementation``: ``sdpa``, ``eager``, ``flex_attention``; see :func:`attend`).
    """

    cache: object | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    past: int = 0
    seen: torch.Tensor | None = None
    output_attentions: bool = False
    attn_implementation: str = "sdpa"

    @classmethod
    def build(cls, batch: int, length: int, device, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache=None, output_attentions: bool = False,
              attn_implementation: str = "sdpa") -> "LayerInputs":
        """From a 2-D ``attention_mask [B, past + T]`` (1 real, 0 padding; left padding as
        ``generate`` makes it), optional ``position_ids [B, T]`` and the cache. Position ids
        default to the count of real tokens before each one, so a left-padded row computes
        exactly what the same row without padding computes. ``seen`` counts the real tokens of the
        mask's first ``past`` entries (the position id of the first new token is one less than that
        when the new chunk starts with padding, which is why it is not used as the count).

        A static cache (:func:`static_length` S, ``StaticCache``) returns all S key slots, so the
        mask covers S keys: the 2-D mask may be given as ``[B, S]`` (zeros after the filled slots;
        what ``create_masks_for_generate`` passes, one shape for every step, so a compiled step
        never recompiles) or as ``[B, past + T]``; ``past`` is then the cache's 0-d length tensor
        and every index is computed from it as a tensor (no host sync, no graph break)."""
        slots = static_length(cache)
        if slots is not None:
            return cls._build_static(batch, length, device, attention_mask, position_ids, cache, output_attentions,
                                     attn_implementation, slots)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None and cache is None and position_ids is None:
            return cls(output_attentions=output_attentions, attn_implementation=attn_implementation)
        total = past + length
        if attention_mask is not None:
            if attention_mask.shape != (batch, total):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {total}) "
                                 f"= (batch, cached tokens + new tokens)")
            keys = attention_mask.to(device=device, dtype=torch.bool)
        else:
            keys = torch.ones(batch, total, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = (keys.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        q_at = torch.arange(past, total, device=device)[:, None]
        causal = torch.arange(total, device=device)[None, :] <= q_at  # [T, S]
        mask = causal[None] & keys[:, None, :]
        mask |= torch.arange(total, device=device)[None, :] == q_at  # a padding query sees itself (no empty row)
        valid = keys[:, past:].float() if attention_mask is not None else None
        seen = None if cache is None else keys[:, :past].sum(-1).float()  # [B]
        return cls(cache=cache, mask=mask[:, None], positions=position_ids.to(device), valid=valid, past=past,
                   seen=seen, output_attentions=output_attentions, attn_implementation=attn_implementation)

    @classmethod
    def _build_static(cls, batch, length, device, attention_mask, position_ids, cache, output_attentions,
                      attn_implementation, slots):
        """:meth:`build` for a static cache of ``slots`` key slots: the same fields, the mask ``[B, 1, T, slots]``."""
        past = cache.get_seq_length()  # 0 before the first update, then a 0-d tensor
        if not torch.compiler.is_compiling() and int(past) + length > slots:
            raise ValueError(f"the static cache holds {slots} tokens, but {int(past)} cached + {length} new tokens were "
                             f"given; make it longer (max_cache_len, or generate's max_length)")
        slot = torch.arange(slots, device=device)
        new = torch.arange(length, device=device) + past  # [T]: the slots of the new tokens
        if attention_mask is None:
            keys = (slot < past + length).expand(batch, slots)
        else:
            width = attention_mask.shape[-1]
            if width != slots:
                if width != int(past) + length:
                    raise ValueError(f"attention_mask has {width} columns, expected {slots} (the static cache's "
                                     f"slots) or {int(past) + length} (cached tokens + new tokens)")
                attention_mask = F.pad(attention_mask, (0, slots - width))
            keys = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is None:
            position_ids = (keys.long().cumsum(-1) - 1).clamp_min(0).index_select(1, new)
        mask = (slot[None, :] <= new[:, None])[None] & keys[:, None, :]  # [B, T, slots]
        mask |= slot[None, :] == new[:, None]  # a padding query sees itself (no empty row)
        valid = keys.index_select(1, new).float() if attention_mask is not None else None
        seen = (keys & (slot < past)).sum(-1).float()  # [B]
        return cls(cache=cache, mask=mask[:, None], positions=position_ids.to(device), valid=valid, past=past,
                   seen=seen, output_attentions=output_attentions, attn_implementation=attn_implementation)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments for a decoder block, so that hooks which repeat
        batch-shaped arguments (Phase-Slip's row groups) see each tensor."""
        return dict(vars(self))

    @property
    def plain(self) -> bool:
        """No cache, no padding, default positions: the training path."""
        return self.cache is None and self.mask is None and self.positions is None


PLAIN = LayerInputs()


def static_length(cache) -> int | None:
    """The number of key slots of a cache with fixed-size key/value layers (transformers'
    ``StaticCache``: ``max_cache_len``), else None (a dynamic cache, or none)."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    slots = [layer.max_cache_len for layer in cache.layers if hasattr(layer, "max_cache_len")]
    return max(slots) if slots else None


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``eager`` attention function (transformers' attention interface signature), the definition:
    A = softmax(q·kᵀ·scaling + mask) ``[B, H, T, S]``, y = A v. ``query [B, H, T, D]``, ``key [B, H, S, D]``,
    ``value [B, H, S, Dv]``; ``attention_mask``: boolean ``[B, 1, T, S]`` (True = may attend), or an
    additive float mask. Returns ``(y [B, T, H, Dv], A)``."""
    scores = (query @ key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    att = scores.float().softmax(-1).to(query.dtype)
    y = F.dropout(att, dropout, training=dropout > 0) @ value
    return y.transpose(1, 2), att


def attention_mask_for(implementation: str, inputs: LayerInputs, q: torch.Tensor, k: torch.Tensor):
    """The mask in the form an attention function wants: None for ``sdpa`` on the plain causal path
    (it then takes ``is_causal``); otherwise the boolean ``[B, 1, T, S]`` mask (causal over the last
    T of S keys when ``inputs.mask`` is None), as a ``BlockMask`` for ``flex_attention`` (its float
    score-mask path crashes on the CPU in torch 2.13)."""
    mask = inputs.mask
    if mask is None:
        if implementation == "sdpa":
            return None
        t, s = q.shape[-2], k.shape[-2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        if mask.shape[0] == 1:  # one mask for every row: a BlockMask broadcast over the batch (B=None)
            return create_block_mask(lambda b, h, i, j: mask[0, 0, i, j], None, None, q.shape[-2], k.shape[-2],
                                     device=q.device)
        return create_block_mask(lambda b, h, i, j: mask[b, 0, i, j], mask.shape[0], None, q.shape[-2], k.shape[-2],
                                 device=q.device)
    return mask


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: LayerInputs,
           scale: float | None = None, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q·kᵀ·scale + mask) v through transformers' attention interface
    (``ALL_ATTENTION_FUNCTIONS``, chosen by ``inputs.attn_implementation``: ``sdpa``, ``eager``
    (:func:`eager_attention`), ``flex_attention``, or any registered function): ``q [B, H, T, Dk]``,
    ``k [B, H, T, Dk]``, ``v [B, H, T, Dv]`` (Dv ≤ Dk; v is zero-padded to Dk for the call, since SDPA
    kernels want one head size, and the output cropped) → ``(y [B, H, T, Dv], A or None)``. With a cache,
    k and v are first appended to layer ``module.layer_idx`` of it and the queries attend to every
    cached key the mask allows. With ``inputs.output_attentions`` the eager function runs and the
    pattern A ``[B, H, T, S]`` is returned (scale None: 1/√Dk)."""
    if inputs.cache is not None:
        k, v = inputs.cache.update(k, v, module.layer_idx)
    implementation = "eager" if inputs.output_attentions else inputs.attn_implementation
    if implementation == "flex_attention" and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("attn_implementation='flex_attention' has no backward on the CPU (FlexAttention); train with "
                         "'sdpa' or 'eager', or on a GPU (inference under torch.no_grad() works)")
    function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    y, att = function(module, q, k, v, attention_mask_for(implementation, inputs, q, k),
                      scaling=q.shape[-1] ** -0.5 if scale is None else scale, dropout=dropout_p)
    return y.transpose(1, 2)[..., :dv], att


def phasor_sums(inputs: LayerInputs, layer_idx: int, like: torch.Tensor) -> osc.PhasorSums | None:
    """The running Kuramoto sums of earlier tokens from the cache (None without a cache).

    The state is stored batch-first, ``[B, E, H, N, 2]`` (E mean-field evaluations); the number of
    earlier real tokens is ``inputs.seen``."""
    if inputs.cache is None:
        return None
    fresh = not torch.is_tensor(inputs.past) and not inputs.past  # a static cache's length is a tensor
    state = None if fresh else inputs.cache.get_recurrent_state(layer_idx)
    count = inputs.seen if inputs.seen is not None else torch.full((like.shape[0],), float(inputs.past))
    count = count.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))
    return osc.PhasorSums(None if state is None else state.movedim(1, 0), count)


def store_phasor_sums(inputs: LayerInputs, layer_idx: int, sums: osc.PhasorSums | None) -> None:
    """Write the new totals as the layer's recurrent state. transformers' cache layers report a
    recurrent state only once a conv state was written (``has_previous_state``); these layers have
    no conv state, so the flag is set here."""
    if sums is not None and sums.totals:
        inputs.cache.update_recurrent_state(sums.stacked().movedim(0, 1).contiguous(), layer_idx)
        layer = inputs.cache.layers[layer_idx]
        if hasattr(layer, "has_previous_state"):
            layer.has_previous_state[0] = True


def token_weight(inputs: LayerInputs, ndim: int) -> torch.Tensor | None:
    """``valid [B, T]`` shaped ``[B, 1, T, 1, ...]`` for a ``[B, H, T, ...]`` tensor of ``ndim`` axes."""
    if inputs.valid is None:
        return None
    return inputs.valid.view(inputs.valid.shape[0], 1, inputs.valid.shape[1], *([1] * (ndim - 3)))


# ---------------------------------------------------------------------------------------------- standard
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(q kᵀ/√d + causal mask) v, through SDPA."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False, layer_idx: int = 0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head, self.dropout, self.layer_idx = n_head, dropout, layer_idx
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.attention_weights: torch.Tensor | None = None  # A [B, H, T, S] of the last forward with output_attentions
        self.is_causal, self.num_key_value_groups = True, 1  # what transformers' attention functions read

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` → q, k, v each ``[B, H, T, C/H]``."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        return tuple(z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, H, T, D]`` → output projection of ``[B, T, H·D]``."""
        b, h, t, d = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, h * d)))

    def attn_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        y, self.attention_weights = attend(self, q, k, v, inputs, dropout_p=self.attn_dropout())
        return self.merge_heads(y)


class MLP(nn.Module):
    """GELU MLP ``[B, T, C]`` → ``[B, T, C]`` with a 4C hidden layer."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(GradientCheckpointingLayer):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)). With ``short_conv`` = k > 0
    the attention reads a causal depthwise convolution of its input, x + attn(conv_k(LN(x))) (Mamba's
    :class:`~phaselm.nn.mamba.CausalConv1d`; the short convolution Zoology's recall models put in
    front of attention, which hands each position its predecessors' features), whose last k inputs
    the cache keeps as layer ``layer_idx``'s conv state. With the model's
    ``gradient_checkpointing_enable()`` its forward is recomputed in the backward (transformers'
    ``GradientCheckpointingLayer``; the RNG state is restored, so phase noise and dropout repeat)."""

    def __init__(self, n_embd: int, attn: nn.Module, dropout: float = 0.0, bias: bool = False,
                 short_conv: int = 0, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.conv = CausalConv1d(n_embd, short_conv) if short_conv else None
        self.layer_idx = layer_idx
        self.attn = attn
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def attention_input(self, x: torch.Tensor, inputs: LayerInputs = PLAIN) -> torch.Tensor:
        """What the attention reads, LN(x) or conv_k(LN(x)) ``[B, T, C]`` (updating the cache's conv state)."""
        h = self.ln_1(x)
        return h if self.conv is None else self.conv.step(h, inputs.cache, self.layer_idx, inputs.valid)

    def forward(self, x, **inputs):
        """``x [B, T, C]``; ``inputs``: the fields of :class:`LayerInputs` (none: plain causal)."""
        inputs = LayerInputs(**inputs)
        x = x + self.attn(self.attention_input(x, inputs), inputs)
        return x + self.mlp(self.ln_2(x))
