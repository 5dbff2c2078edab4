"""Phase-Slip sampling: fuse the clean next-token distribution with one computed from a copy of
the KV cache whose value vectors, in a few key/value heads and over the last W positions, are
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
4. temperature / top-k / top-p / min-p and a draw, as in :class:`phaselm.sampling.Sampler`;
5. the perturbed keys/values are discarded: only the clean path's state carries on.

With ``noise_scale=0`` the rotation is exactly the identity, z_p = z_c, and the sampler gives
the same tokens as plain temperature sampling with the same seed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from phaselm.sampling.decoding import Sampler
from phaselm.sampling.kv import RowGroupCache, kv_geometry
from phaselm.sampling.processors import entropy
from phaselm.sampling.rotation import rotations_from_gaussian

log = logging.getLogger("phaselm")

FUSIONS = ("gate", "contrast")


class PhaseSlipSampler(Sampler):
    """Phase-Slip sampler for any transformers decoder-only causal LM.

    Args:
        noise_scale: rotation angle θ in radians applied to each perturbed value vector (>= 0).
        logit_fusion_alpha: α in [0, 1], the clean weight floor of the entropy gate.
        perturbation_window: W >= 1, how many most recent positions are rotated.
        entropy_center: c in nats; the gate gives the perturbed pass weight (1 − α)·sigmoid(H − c).
        heads: the (layer, kv_head) pairs to perturb; ``None`` calibrates on first use
            (:meth:`calibrate_heads` over the last min(6, layers) layers).
        fusion: ``"gate"`` (blend toward the perturbed pass) or ``"contrast"`` (away from it).

    >>> model, tok = phaselm.load_causal_lm()
    >>> sampler = PhaseSlipSampler(model, tok, noise_scale=0.5)
    >>> sampler.calibrate_heads()
    >>> sampler.generate("The ancient door creaked open", max_new_tokens=40, top_k=40, seed=0)
    """

    default_temperature = 0.65

    def __init__(
        self,
        model,
        tokenizer,
        noise_scale: float = 0.03,
        logit_fusion_alpha: float = 0.45,
        perturbation_window: int = 12,
        entropy_center: float = 2.5,
        heads: list[tuple[int, int]] | None = None,
        fusion: str = "gate",
    ):
        super().__init__(model, tokenizer)
        if not (isinstance(noise_scale, (int, float)) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be >= 0 (a rotation angle in radians), got {noise_scale}")
        if not (0 <= logit_fusion_alpha <= 1):
            raise ValueError(f"logit_fusion_alpha must be in [0, 1], got {logit_fusion_alpha}")
        if not (isinstance(perturbation_window, int) and perturbation_window >= 1):
            raise ValueError(f"perturbation_window must be an integer >= 1, got {perturbation_window}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.noise_scale = float(noise_scale)
        self.alpha = float(logit_fusion_alpha)
        self.window = perturbation_window
        self.entropy_center = float(entropy_center)
        self.fusion = fusion
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model)
        self.calibration = None
        self.heads = None if heads is None else self._check_heads(heads)

    def _check_heads(self, heads) -> list[tuple[int, int]]:
        heads = sorted({(int(layer), int(head)) for layer, head in heads})
        if not heads:
            raise ValueError("heads is empty; pass at least one (layer, kv_head) pair or None to calibrate")
        for layer, head in heads:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
                raise ValueError(
                    f"head ({layer}, {head}) is out of range: layers 0..{self.num_layers - 1}, "
                    f"kv heads 0..{self.num_kv_heads - 1}"
                )
        return heads

    def calibrate_heads(self, text: str | None = None, search_layers: int = 6, **kwargs):
        """Score every KV head of the last ``search_layers`` layers and select heads to perturb.

        See :func:`phaselm.sampling.calibration.calibrate_heads` for the scores and the keyword
        arguments. Sets ``self.heads`` and returns the :class:`HeadCalibration` (its ``table()``
        is the score table).
        """
        from phaselm.sampling.calibration import calibrate_heads

        self.calibration = calibrate_heads(self.model, self.tokenizer, text=text, search_layers=search_layers, **kwargs)
        self.heads = self.calibration.selected
        return self.calibration

    # ------------------------------------------------------------------ decoding hooks
    def _make_cache(self):
        return RowGroupCache(config=self.model.config)

    @contextmanager
    def _session(self, cache, seeds):
        if self.heads is None:
            log.info("PhaseSlipSampler: no heads given; calibrating with the defaults")
            self.calibrate_heads(search_layers=min(6, self.num_layers))
        # one rotation stream per seed (per row when seeds are per prompt), apart from the draws
        self._rotation_rngs = [torch.Generator().manual_seed(s + 0x5EED) for s in seeds]
        with cache.attach(self.model, first_layer=min(layer for layer, _ in self.heads)):
            yield

    def _draw_rotations(self) -> dict[int, torch.Tensor]:
        """Per perturbed layer, ``[1, rows, num_kv_heads, d, d]``: fresh rotations of the selected
        heads (one seeded stream per row), identity elsewhere. Gaussians are drawn on the CPU, the
        QR runs once, batched, on the model's device."""
        rows, n_heads, d = len(self._rotation_rngs), len(self.heads), self.head_dim
        if self.noise_scale == 0:
            fresh = torch.eye(d, device=self.device).expand(n_heads, rows, d, d)
        else:
            gauss = torch.stack([torch.randn(n_heads, d, d, generator=g, dtype=torch.float64)
                                 for g in self._rotation_rngs], dim=1)  # [heads, rows, d, d]
            fresh = rotations_from_gaussian(gauss.to(self.device), self.noise_scale).float()
        eye = torch.eye(d, device=self.device)
        rotations: dict[int, torch.Tensor] = {}
        for (layer, head), rot in zip(self.heads, fresh):
            per_layer = rotations.setdefault(layer, eye.repeat(1, rows, self.num_kv_heads, 1, 1))
            per_layer[0, :, head] = rot
        return rotations

    def _next_logits(self, cache, input_ids, attention_mask, position_ids, diagnostics) -> torch.Tensor:
        batch = input_ids.shape[0]
        with cache.row_groups(batch, self._draw_rotations(), self.window):
            logits = self._forward(cache, input_ids, attention_mask, position_ids).logits[:, -1].float()
        z_clean, z_pert = logits[:batch], logits[batch:]
        h = entropy(z_clean)
        clean_weight = self.alpha + (1 - self.alpha) * torch.sigmoid(self.entropy_center - h)
        w = (1 - clean_weight)[:, None]
        # gate: α_eff z_c + (1 − α_eff) z_p, written so that z_p == z_c gives exactly z_c
        fused = z_clean + w * (z_pert - z_clean) if self.fusion == "gate" else z_clean + w * (z_clean - z_pert)
        logp_c, logp_p = z_clean.log_softmax(-1), z_pert.log_softmax(-1)
        diagnostics.setdefault("entropy", []).append(h)
        diagnostics.setdefault("clean_weight", []).append(clean_weight)
        diagnostics.setdefault("kl", []).append((logp_c.exp() * (logp_c - logp_p)).sum(-1))
        diagnostics["heads"] = list(self.heads)
        return fused
