"""Phase-Slip sampling: fuse the clean next-token distribution with one computed from a copy of
the cache whose value vectors, in a few key/value heads and over the last W positions, are
rotated by an exact rotation.

Each step, for the token just chosen (fed once, never twice):

1. clean logits z_c: the ordinary forward pass with the clean cache;
2. perturbed logits z_p: the same token, the same cache, except that in the selected
   (layer, kv_head) pairs the value vectors of the last ``perturbation_window`` positions are
   replaced by ``R v`` with R a random rotation by exactly ``noise_scale`` radians
   (:mod:`phaselm.sampling.rotation`; a fresh R each step). Both paths run in one forward pass:
   below the first perturbed layer they are identical and computed once; from it on they are
   two row groups of one batch (:mod:`phaselm.sampling.kv`);
3. entropy gate, with H the clean entropy in nats:
   α_eff = α + (1 − α)·sigmoid(c − H)
   ``fusion="gate"``:     z = α_eff·z_c + (1 − α_eff)·z_p
   ``fusion="contrast"``: z = z_c + (1 − α_eff)·(z_c − z_p)   (move away from the perturbed pass)
4. the caller's logits processing and draw (phaselm's :class:`~phaselm.sampling.Sampler` knobs, or
   the logits processors of ``model.generate``: :mod:`phaselm.sampling.generation`);
5. the perturbed keys/values and recurrent states are discarded: only the clean state carries on.

With ``noise_scale=0`` the rotation is exactly the identity, z_p = z_c, and the sampler gives
the same tokens as plain sampling with the same seed.

:class:`PhaseSlipStep` is the one implementation of steps 1-3 and 5; :class:`PhaseSlipSampler`
(phaselm's short path) and :func:`phaselm.sampling.phase_slip_generate` (inside transformers'
``generate``) both call it.

Optional plausible set (``plausible_only=True``): the perturbed logits are computed only for the
tokens the caller's filters (top-k / top-p / min-p) keep from the clean logits, and every other
token gets probability 0 — contrastive decoding's plausibility constraint. The LM head of the
perturbed rows then costs |set| rows instead of the vocabulary. It changes which tokens can be
drawn, so it is off by default (``benchmarks/sampler_speed.py`` measures how often it changes a
draw).
"""

from __future__ import annotations

import logging
import math
import numbers
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from phaselm.nn.functional import entropy, kl_divergence
from phaselm.pretrained import unsupported_model_reason
from phaselm.sampling.decoding import Sampler
from phaselm.sampling.kernels import fast_linears
from phaselm.sampling.kv import (
    RowGroupCache, RowGroups, attention_layers, check_cache, decoder_layers, is_static, kv_geometry, probe_row_groups,
)
from phaselm.sampling.rotation import rotations_from_gaussian

log = logging.getLogger("phaselm")

FUSIONS = ("gate", "contrast")
# Configs whose logits are not head(h): the plausible-set option cannot compute them row by row.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _real(name: str, value, hint: str) -> float:
    """``value`` as a finite float (Python or NumPy real scalars), else a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shape = getattr(value, "shape", None)
        what = f"an array of shape {tuple(shape)}" if shape is not None else type(value).__name__
        raise ValueError(f"{name} must be a real number ({hint}), got {what}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number ({hint}), got {value}")
    return value


def _check_heads(heads, num_layers: int, num_kv_heads: int, attention: list[int] | None = None) -> list[tuple[int, int]]:
    """``heads`` as a sorted list of distinct in-range ``(layer, kv_head)`` integer pairs, each in an
    attention layer (``attention``: the layers that keep keys/values; ``None``: all). The head index is
    checked against the config's KV head count here, and against the heads the cache really stores
    when decoding starts (:meth:`PhaseSlipStep.session`)."""
    example = "e.g. heads=[(2, 0), (3, 1)]"
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(f"heads must be a list of (layer, kv_head) pairs ({example}), got {heads!r}")
    pairs = list(heads)
    if not pairs:
        raise ValueError("heads is empty; pass at least one (layer, kv_head) pair or None to calibrate")
    out = set()
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2 or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in pair
        ):
            raise ValueError(f"heads must be a list of (layer, kv_head) integer pairs ({example}), got {heads!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < num_layers and 0 <= head < num_kv_heads):
            raise ValueError(
                f"head ({layer}, {head}) is out of range: layers 0..{num_layers - 1}, kv heads 0..{num_kv_heads - 1}"
            )
        if attention is not None and layer not in attention:
            raise ValueError(f"head ({layer}, {head}): layer {layer} has no attention (no values to rotate); "
                             f"attention layers: {attention}")
        out.add((layer, head))
    return sorted(out)


def unsupported_reason(model, name: str | None = None) -> str | None:
    """Why Phase-Slip cannot drive ``model`` (one line), or ``None``: it must be a decoder-only
    causal LM (:func:`phaselm.pretrained.unsupported_model_reason`) with at least one attention
    layer whose cached values are the values its attention reads (not multi-head latent attention,
    DeepSeek-V2/V3 style, whose cache holds a latent and the rotary keys). Checked from the object
    alone (no forward pass); :func:`check_model` adds the one-time probe."""
    reason = unsupported_model_reason(model, name)
    if reason:
        return reason
    label = f"'{name}'" if name else type(model).__name__
    cfg = model.config.get_text_config(decoder=True)
    try:
        latent = getattr(cfg, "kv_lora_rank", None)
    except Exception:  # noqa: BLE001 - a per-layer attribute: heterogeneous latent attention
        latent = True
    if latent:
        return (f"{label} ({model.config.model_type}) uses multi-head latent attention: its cache holds a compressed "
                "latent and the rotary part of the keys, not the value vectors the attention reads, so Phase-Slip "
                "cannot rotate them; use plain sampling for this architecture")
    try:
        attn = attention_layers(model)
    except Exception as err:  # noqa: BLE001
        return f"{label}: cannot read its layer structure for Phase-Slip ({str(err).splitlines()[0]})"
    if not attn:
        return (f"{label} ({model.config.model_type}) has no attention layers with a key/value cache, so Phase-Slip "
                "has no value vectors to rotate (e.g. a pure state-space model); use plain sampling")
    return None


def check_model(model, first_layer: int | None = None, static: bool = False) -> dict[int, tuple[int, int]] | None:
    """Raise ``ValueError`` (one line) unless Phase-Slip can drive ``model``: :func:`unsupported_reason`,
    then, given the lowest perturbed layer, the one-time probe (:func:`~phaselm.sampling.kv.probe_row_groups`,
    on a static cache where ``static``), whose value geometry ``{layer: (kv_heads, head_dim)}`` is returned. The one rule for generating
    and calibrating, checked before either runs."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(reason)
    return None if first_layer is None else probe_row_groups(model, first_layer, static)


class PhaseSlipStep:
    """One Phase-Slip step (module doc, steps 1-3 and 5), shared by every decoding loop.

    Args:
        model: a transformers decoder-only causal LM.
        noise_scale: rotation angle θ in radians, 0 <= θ <= π, applied to each perturbed value vector.
        logit_fusion_alpha: α in [0, 1], the clean weight floor of the entropy gate.
        perturbation_window: W >= 1, how many most recent positions are rotated.
        entropy_center: c in nats; the gate gives the perturbed pass weight (1 − α)·sigmoid(H − c).
        heads: the (layer, kv_head) pairs to perturb, or ``None`` (set later, e.g. by calibration).
        fusion: ``"gate"`` (blend toward the perturbed pass) or ``"contrast"`` (away from it).
        plausible_only: compute the perturbed logits only over the clean pass's plausible set.

    Use: ``with step.session(cache, seeds): fused = step(run_forward, batch, diagnostics)``.
    """

    def __init__(self, model, noise_scale=0.03, logit_fusion_alpha=0.45, perturbation_window=12,
                 entropy_center=2.5, heads=None, fusion="gate", plausible_only=False):
        check_model(model)
        self.model = model
        self.noise_scale = _real("noise_scale", noise_scale, "a rotation angle in radians, 0 <= noise_scale <= π")
        if not (0 <= self.noise_scale <= math.pi):
            raise ValueError(
                f"noise_scale must be in [0, π] (a rotation angle in radians; θ and 2π − θ turn vectors equally), "
                f"got {self.noise_scale}"
            )
        self.alpha = _real("logit_fusion_alpha", logit_fusion_alpha, "the gate's clean weight floor in [0, 1]")
        if not (0 <= self.alpha <= 1):
            raise ValueError(f"logit_fusion_alpha must be in [0, 1], got {self.alpha}")
        if isinstance(perturbation_window, bool) or not isinstance(perturbation_window, numbers.Integral) \
                or perturbation_window < 1:
            raise ValueError(f"perturbation_window must be an integer >= 1, got {perturbation_window!r}")
        self.window = int(perturbation_window)
        self.entropy_center = _real("entropy_center", entropy_center, "the gate's centre in nats, e.g. 2.5")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.plausible_only = bool(plausible_only)
        cfg = model.config.get_text_config(decoder=True)
        if self.plausible_only and any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING):
            raise ValueError("plausible_only needs logits = lm_head(h), but this model post-processes its logits; "
                             "use plausible_only=False")
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model)
        self.attention_layers = attention_layers(model)
        self.heads = None if heads is None else self.check_heads(heads)
        self._groups: RowGroups | None = None

    def check_heads(self, heads) -> list[tuple[int, int]]:
        """Validated ``heads`` for this model (see :func:`_check_heads`)."""
        return _check_heads(heads, self.num_layers, self.num_kv_heads, self.attention_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ session
    @contextmanager
    def session(self, cache, seeds: list[int], rows: int):
        """Around a whole decode: route ``cache`` through row groups from the first perturbed layer,
        seed one rotation stream per entry of ``seeds`` (one for all rows, or one per row) and pick
        the matmul form of the suffix's linear layers for ``2 · rows`` rows (:mod:`.kernels`)."""
        if self.heads is None:
            raise ValueError("no heads to perturb; pass heads=[(layer, kv_head), ...] or calibrate first")
        first = min(layer for layer, _ in self.heads)
        check_cache(cache)
        self._geometry = check_model(self.model, first, is_static(cache))  # refuses a model that cannot carry the rows
        for layer, head in self.heads:
            if layer not in self._geometry or head >= self._geometry[layer][0]:
                raise ValueError(f"head ({layer}, {head}) does not exist in the cache: it stores "
                                 f"{self._geometry.get(layer, (0, 0))[0]} kv heads at layer {layer}")
        self._rotation_rngs = [torch.Generator().manual_seed((int(s) + 0x5EED) % 2**63) for s in seeds]
        groups = RowGroups(cache) if not isinstance(cache, RowGroupCache) else cache._groups
        head = self.model.get_output_embeddings()
        suffix = [m for layer in decoder_layers(self.model)[first:] for m in layer.modules()]
        with ExitStack() as stack:
            stack.enter_context(groups.attach(self.model, first_layer=first))
            if not self.plausible_only:
                suffix.append(head)
            stack.enter_context(fast_linears(suffix, 2 * rows))
            self._groups = groups
            try:
                yield self
            finally:
                self._groups = None

    @contextmanager
    def rebind(self, cache):
        """Inside a :meth:`session`: route another, fresh ``cache`` through row groups for the block (a
        window recomputed past the model's context), keeping the session's rotation streams. The
        session's own hooks stay installed and pass through (their groups hold one row group)."""
        groups = cache._groups if isinstance(cache, RowGroupCache) else RowGroups(cache)
        outer = self._groups
        with groups.attach(self.model, first_layer=min(layer for layer, _ in self.heads)):
            self._groups = groups
            try:
                yield
            finally:
                self._groups = outer

    def _draw_rotations(self, rows: int) -> dict[int, torch.Tensor]:
        """Per perturbed layer, ``[1, streams, kv_heads, d, d]`` (one stream for all rows, or one per
        row): fresh rotations of the selected heads, identity elsewhere; ``kv_heads`` and ``d`` are the
        layer's cached value geometry. Gaussians come from the seeded CPU streams; the QR runs on the
        model's device."""
        streams, device = len(self._rotation_rngs), self.device
        rotations: dict[int, torch.Tensor] = {}
        for layer, head in self.heads:
            n_kv, d = self._geometry[layer]
            if layer not in rotations:
                rotations[layer] = torch.eye(d, device=device).repeat(1, streams, n_kv, 1, 1)
            if self.noise_scale == 0:
                continue  # exactly the identity
            gauss = torch.stack([torch.randn(d, d, generator=g, dtype=torch.float64) for g in self._rotation_rngs])
            rotations[layer][0, :, head] = rotations_from_gaussian(gauss.to(device), self.noise_scale).float()
        return rotations

    # ------------------------------------------------------------------ the step
    def __call__(self, run_forward: Callable[[], object], batch: int, diagnostics: dict | None = None,
                 plausible: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Fused next-token logits ``[B, V]`` (float32).

        ``run_forward()`` runs the model on the step's inputs (B rows) with the session's cache and
        returns its output (``.logits [B', q, V]``). ``plausible(z_clean) -> bool [B, V]`` gives the
        plausible set when ``plausible_only`` is on. ``diagnostics`` (a dict) gets per-step ``[B]``
        tensors appended: ``entropy`` H, ``clean_weight`` α_eff, ``kl`` KL(clean ‖ perturbed).
        """
        with ExitStack() as stack:
            stack.enter_context(self._groups.row_groups(batch, self._draw_rotations(batch), self.window))
            hidden = stack.enter_context(self._split_head(batch)) if self.plausible_only else None
            logits = run_forward().logits[:, -1].float()
        z_clean = logits[:batch]
        if hidden is None:
            z_pert, keep = logits[batch:], None
        else:
            keep = plausible(z_clean)
            z_pert = self._head_over(hidden["h"], keep, z_clean)
        h = entropy(z_clean)
        clean_weight = self.alpha + (1 - self.alpha) * torch.sigmoid(self.entropy_center - h)
        w = (1 - clean_weight)[:, None]
        # gate: α_eff z_c + (1 − α_eff) z_p, written so that z_p == z_c gives exactly z_c
        fused = z_clean + w * (z_pert - z_clean) if self.fusion == "gate" else z_clean + w * (z_clean - z_pert)
        if keep is not None:
            fused = fused.masked_fill(~keep, float("-inf"))
        if diagnostics is not None:
            diagnostics.setdefault("entropy", []).append(h)
            diagnostics.setdefault("clean_weight", []).append(clean_weight)
            diagnostics.setdefault("kl", []).append(kl_divergence(z_clean, z_pert))
            diagnostics["heads"] = list(self.heads)
        return fused

    @contextmanager
    def _split_head(self, batch: int):
        """During the pass the LM head computes the clean rows only; the perturbed rows' last hidden
        state ``[B, D]`` is kept in the yielded dict (``["h"]``) for :meth:`_head_over`."""
        head = self.model.get_output_embeddings()
        kept: dict = {}

        def forward(x):  # x [n·B, q, D]
            kept["h"] = x[batch:, -1]
            z = F.linear(x[:batch], head.weight, head.bias)
            return z.repeat(x.shape[0] // batch, *([1] * (z.ndim - 1)))

        head.forward = forward
        try:
            yield kept
        finally:
            del head.forward

    def _head_over(self, h: torch.Tensor, keep: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
        """Perturbed logits ``[B, V]``: ``head(h)`` on the union of the rows' plausible sets, the clean
        logits elsewhere (those tokens are masked out of the fused logits anyway)."""
        head = self.model.get_output_embeddings()
        idx = keep.any(0).nonzero().squeeze(-1)
        bias = None if head.bias is None else head.bias[idx]
        sub = F.linear(h.to(head.weight.dtype), head.weight[idx], bias).float()  # [B, K]
        return z_clean.index_copy(-1, idx, sub)


class PhaseSlipSampler(Sampler):
    """Phase-Slip sampler for any transformers decoder-only causal LM (phaselm's short path).

    Args: see :class:`PhaseSlipStep` (``cache_implementation``: :class:`~phaselm.sampling.Sampler`'s);
    ``heads=None`` calibrates on first use, after the request's
    arguments are checked (:func:`phaselm.sampling.calibration.automatic_heads`: :meth:`calibrate_heads`'s
    defaults, once per model, shared with ``model.generate`` without ``heads=``).

    >>> model, tok = phaselm.load_causal_lm()
    >>> sampler = PhaseSlipSampler(model, tok, noise_scale=0.5)
    >>> sampler.calibrate_heads()
    >>> sampler.generate("The ancient door creaked open", max_new_tokens=40, top_k=40, seed=0)

    The same sampler inside ``model.generate`` (logits processors, stopping criteria, streamers):
    :func:`phaselm.sampling.phase_slip_generate`.
    """

    default_temperature = 0.65

    def __init__(self, model, tokenizer, noise_scale: float = 0.03, logit_fusion_alpha: float = 0.45,
                 perturbation_window: int = 12, entropy_center: float = 2.5,
                 heads: list[tuple[int, int]] | None = None, fusion: str = "gate", plausible_only: bool = False,
                 cache_implementation: str | None = None):
        self.step = PhaseSlipStep(model, noise_scale, logit_fusion_alpha, perturbation_window, entropy_center,
                                  heads, fusion, plausible_only)
        super().__init__(model, tokenizer, cache_implementation=cache_implementation)
        self.calibration = None

    # settings live on the step (one copy); these read them
    noise_scale = property(lambda self: self.step.noise_scale)
    alpha = property(lambda self: self.step.alpha)
    window = property(lambda self: self.step.window)
    entropy_center = property(lambda self: self.step.entropy_center)
    fusion = property(lambda self: self.step.fusion)
    num_layers = property(lambda self: self.step.num_layers)
    num_kv_heads = property(lambda self: self.step.num_kv_heads)
    head_dim = property(lambda self: self.step.head_dim)

    @property
    def heads(self):
        return self.step.heads

    @heads.setter
    def heads(self, value):
        self.step.heads = None if value is None else self.step.check_heads(value)

    def calibrate_heads(self, text: str | None = None, search_layers: int | None = None, **kwargs):
        """Score every KV head of the last ``search_layers`` layers (default min(6, layers)) and select
        heads to perturb.

        See :func:`phaselm.sampling.calibration.calibrate_heads` for the scores and the keyword
        arguments. Sets ``self.heads`` and returns the :class:`HeadCalibration` (its ``table()``
        is the score table).
        """
        from phaselm.sampling.calibration import calibrate_heads

        self.calibration = calibrate_heads(self.model, self.tokenizer, text=text, search_layers=search_layers, **kwargs)
        self.heads = self.calibration.selected
        return self.calibration

    # ------------------------------------------------------------------ decoding hooks
    def _make_cache(self, max_len: int):
        static = self.cache_implementation == "static"
        return super()._make_cache(max_len) if static else RowGroupCache(config=self.model.config)

    @contextmanager
    def _session(self, cache, seeds, batch):
        if self.heads is None:  # the same automatic calibration as model.generate without heads= (cached per model)
            from phaselm.sampling.calibration import automatic_heads

            self.calibration = automatic_heads(self.model, self.tokenizer)
            self.heads = self.calibration.selected
        with self.step.session(cache, seeds, batch):
            yield

    def _window_logits(self, input_ids, attention_mask, diagnostics, cfg=None) -> torch.Tensor:
        """Past the context: a fresh cache gets the window's tokens but the last, then the Phase-Slip step
        feeds the last one (the perturbed rows need cached values to rotate)."""
        cache = RowGroupCache(config=self.model.config)
        position_ids = None if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        mask = attention_mask
        with self.step.rebind(cache):
            if input_ids.shape[1] > 1:
                extra = {"logits_to_keep": 1} if self._forward_takes_logits_to_keep else {}
                self._forward(cache, input_ids[:, :-1], None if mask is None else mask[:, :-1], position_ids[:, :-1],
                              **extra)
            return self._next_logits(cache, input_ids[:, -1:], mask, position_ids[:, -1:], diagnostics, cfg)

    def _next_logits(self, cache, input_ids, attention_mask, position_ids, diagnostics, cfg=None) -> torch.Tensor:
        from phaselm.sampling.processors import process_logits

        def run():
            return self._forward(cache, input_ids, attention_mask, position_ids)

        plausible = (lambda z: torch.isfinite(process_logits(z, cfg))) if cfg is not None else None
        return self.step(run, input_ids.shape[0], diagnostics, plausible)
