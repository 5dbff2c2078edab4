"""Head calibration for Phase-Slip: which key/value heads to perturb.

For every KV head h of the searched layers, on a calibration text x_1..x_T (teacher-forced), rotate
that head's value vectors at all positions by a random rotation of angle ``angle`` and measure,
averaged over positions t and over ``samples_per_head`` independent rotations:

* damage     D_h = mean_t [ −log p_h(x_{t+1} | x_≤t) + log p(x_{t+1} | x_≤t) ]   (NLL rise, nats)
* exploration E_h = mean_t KL( p(· | x_≤t) ‖ p_h(· | x_≤t) )                     (nats)

The ``exclude_fraction`` most damaging heads are excluded; of the rest, the ``num_heads`` with the
largest efficiency E_h / (max(D_h, 0) + ε) are selected (ε = 1e-4 nats). All heads are scored in
batched passes: the layers below the first searched layer run once per pass, and each head's
rotation is one row group of the upper layers (:mod:`phaselm.sampling.kv`).

The default ``angle`` (0.5 rad) is larger than typical sampling angles so that every head's effect
stands well above float noise; for small angles D_h and E_h both scale like θ², so the ranking
by efficiency does not depend on it to first order.
"""

from __future__ import annotations

import logging
import math
import numbers
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from phaselm.nn.functional import kl_divergence
from phaselm.sampling.kv import RowGroupCache, attention_layers, kv_geometry
from phaselm.sampling.processors import check_seed
from phaselm.sampling.rotation import random_rotations

DEFAULT_CALIBRATION_TEXT = (
    "The harbour town woke slowly. Fishermen carried their nets down to the water while the baker "
    "opened his shutters and the smell of bread drifted along the narrow street. A girl on a bicycle "
    "rang her bell at a dog that refused to move. Later that morning the council met in the old hall "
    "to argue about the price of a new lighthouse lamp; the treasurer said the town could not afford "
    "it, and the harbour master replied that it could not afford a shipwreck either. By noon the "
    "vote was taken, and the lamp was ordered from a workshop in the capital."
)

EFFICIENCY_EPS = 1e-4
MIN_TOKENS = 32
"""Fewer calibration tokens than this (or than the model's context, if shorter) log a warning: the scores
average over the text's positions, and a few positions give noisy, seed-dependent head choices."""
DEFAULT_SEARCH_LAYERS = 6
DEFAULT_NUM_HEADS = 3


@dataclass
class HeadCalibration:
    """Scores of every searched KV head and the selected ones. ``rows``: one dict per head."""

    rows: list[dict]
    selected: list[tuple[int, int]]
    config: dict

    def table(self) -> str:
        """The scores as a markdown table, most efficient first."""
        lines = [
            "| layer | kv head | damage (ΔNLL, nats) | exploration (KL, nats) | efficiency | status |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for r in sorted(self.rows, key=lambda r: -r["efficiency"]):
            status = "selected" if r["selected"] else ("excluded (damage)" if r["excluded"] else "")
            lines.append(
                f"| {r['layer']} | {r['head']} | {r['damage']:.3e} | {r['exploration']:.3e} | "
                f"{r['efficiency']:.3g} | {status} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _integer(name: str, value, low: int, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in ``[low, high]`` (bools and floats refused), else a one-line ValueError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= (high or value)
    if not ok:
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {span}{hint}, got {value!r}")
    return int(value)


@torch.no_grad()
def calibrate_heads(
    model,
    tokenizer,
    text: str | None = None,
    search_layers: int | None = None,
    num_heads: int | None = None,
    samples_per_head: int = 2,
    angle: float = 0.5,
    exclude_fraction: float = 0.25,
    max_tokens: int = 128,
    groups_per_pass: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> HeadCalibration:
    """Score the KV heads of the last ``search_layers`` layers on ``text``; see the module doc.

    ``search_layers``: default min(6, layers); ``num_heads``: how many heads to select, default
    min(3, heads searched). ``text`` shorter than :data:`MIN_TOKENS` tokens (or the model's context)
    is scored, with a warning logged: its scores are noisy. The model is checked first, as for generating
    (:func:`phaselm.sampling.phase_slip.check_model`): an architecture Phase-Slip refuses is refused here.
    """
    from phaselm.sampling.phase_slip import check_model

    check_model(model)
    num_layers = kv_geometry(model)[0]
    if search_layers is None:
        search_layers = min(DEFAULT_SEARCH_LAYERS, num_layers)
    search_layers = _integer("search_layers", search_layers, 1, num_layers, f" (the model has {num_layers} layers)")
    if num_heads is not None:
        num_heads = _integer("num_heads", num_heads, 1)
    for name, value in (("samples_per_head", samples_per_head), ("groups_per_pass", groups_per_pass),
                        ("max_tokens", max_tokens)):
        _integer(name, value, 1)
    if isinstance(exclude_fraction, bool) or not isinstance(exclude_fraction, numbers.Real) \
            or not 0 <= exclude_fraction < 1:
        raise ValueError(f"exclude_fraction must be in [0, 1), got {exclude_fraction!r}")
    if isinstance(angle, bool) or not isinstance(angle, numbers.Real) or not 0 < angle <= math.pi:
        raise ValueError(f"angle must be a rotation angle in (0, π] radians, got {angle!r}")
    text = DEFAULT_CALIBRATION_TEXT if text is None else text
    if not isinstance(text, str) or not text.strip():
        raise ValueError("calibration text is empty; pass non-empty text or None for the built-in text")
    attention = set(attention_layers(model))
    searched = [layer for layer in range(num_layers - search_layers, num_layers) if layer in attention]
    if not searched:
        raise ValueError(f"the last {search_layers} layers have no attention (values to rotate); raise search_layers "
                         f"(attention layers: {sorted(attention)})")
    geometry = check_model(model, searched[0])  # {layer: (kv heads, head dim)} as the cache stores them
    searched = [layer for layer in searched if layer in geometry]  # e.g. not a cross-attention layer
    candidates = [(layer, head) for layer in searched for head in range(geometry[layer][0])]
    if not candidates:
        raise ValueError(f"the last {search_layers} layers cache no values to rotate; raise search_layers "
                         f"(layers with cached values: {sorted(geometry)})")
    if num_heads is None:  # 3, or every candidate when the searched layers hold fewer (e.g. a one-layer model)
        num_heads = min(DEFAULT_NUM_HEADS, len(candidates))
    if num_heads > len(candidates):
        raise ValueError(f"num_heads={num_heads} but the last {search_layers} layers have only {len(candidates)} "
                         f"kv heads; use num_heads <= {len(candidates)} or raise search_layers")
    seed = check_seed("seed", seed)
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None) or max_tokens  # a small trained model's block
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :min(max_tokens, context)].to(device)
    if ids.shape[1] < 2:
        raise ValueError("calibration text must be at least 2 tokens long")
    if ids.shape[1] < min(MIN_TOKENS, context, max_tokens):
        log.warning("phaselm: the calibration text is %d tokens long, under the minimum of %d for stable head "
                    "scores; pass a longer text (a paragraph or more), or none for the built-in one",
                    ids.shape[1], min(MIN_TOKENS, context, max_tokens))
    targets = ids[0, 1:]

    generator = torch.Generator().manual_seed(seed)
    trials = [c for c in candidates for _ in range(samples_per_head)]
    dims = sorted({geometry[layer][1] for layer in searched})  # one head size, except in a few hybrids
    rotations = {d: random_rotations(len(trials), d, angle, generator=generator) for d in dims}
    damage = torch.zeros(len(candidates), dtype=torch.float64)
    explore = torch.zeros(len(candidates), dtype=torch.float64)
    first_layer = candidates[0][0]
    starts = range(0, len(trials), groups_per_pass)
    for start in tqdm(starts, desc="calibrating heads", disable=not progress, leave=False):
        chunk = list(range(start, min(start + groups_per_pass, len(trials))))
        per_layer: dict[int, torch.Tensor] = {}
        for g, t in enumerate(chunk):
            layer, head = trials[t]
            n_kv, d = geometry[layer]
            rot = per_layer.setdefault(layer, torch.eye(d).repeat(len(chunk), 1, n_kv, 1, 1))
            rot[g, 0, head] = rotations[d][t]
        cache = RowGroupCache(config=model.config)
        with cache.attach(model, first_layer), cache.row_groups(1, {k: v.to(device) for k, v in per_layer.items()}, None):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, :-1].float()
        logp = logits.log_softmax(-1)  # [1 + G, T-1, V]
        nll = -logp.gather(-1, targets.expand(logp.shape[0], -1)[..., None]).squeeze(-1).mean(-1)  # [1 + G]
        kl = kl_divergence(logits[:1], logits[1:]).mean(-1)  # [G]
        for g, t in enumerate(chunk):
            c = candidates.index(trials[t])
            damage[c] += (nll[1 + g] - nll[0]).item() / samples_per_head
            explore[c] += kl[g].item() / samples_per_head

    n_excluded = int(exclude_fraction * len(candidates))
    excluded = set(torch.argsort(damage, descending=True)[:n_excluded].tolist())
    efficiency = explore / (damage.clamp(min=0) + EFFICIENCY_EPS)
    ranked = [i for i in torch.argsort(efficiency, descending=True).tolist() if i not in excluded]
    chosen = set(ranked[:num_heads])
    rows = [
        {
            "layer": layer,
            "head": head,
            "damage": float(damage[i]),
            "exploration": float(explore[i]),
            "efficiency": float(efficiency[i]),
            "excluded": i in excluded,
            "selected": i in chosen,
        }
        for i, (layer, head) in enumerate(candidates)
    ]
    config = dict(
        search_layers=search_layers, num_heads=num_heads, samples_per_head=samples_per_head, angle=angle,
        exclude_fraction=exclude_fraction, tokens=int(ids.shape[1]), seed=seed,
    )
    return HeadCalibration(rows=rows, selected=sorted(candidates[i] for i in chosen), config=config)


_AUTOMATIC: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
log = logging.getLogger("phaselm")


def automatic_heads(model, tokenizer=None, **kwargs) -> HeadCalibration:
    """The calibration Phase-Slip runs when no ``heads`` are given (:class:`phaselm.PhaseSlipSampler` on
    first use, and ``model.generate(custom_generate=...)`` without ``heads=``): :func:`calibrate_heads`
    with its defaults (``kwargs`` override them), run once per model and these settings, cached, logged.

    ``tokenizer``: tokenises the calibration text; ``None`` loads the model's own from
    ``model.name_or_path`` when that is a local folder (or a cached hub model).
    """
    key = tuple(sorted((k, v) for k, v in kwargs.items() if k != "progress"))
    done = _AUTOMATIC.setdefault(model, {})
    if key not in done:
        from phaselm.sampling.phase_slip import check_model

        check_model(model)  # an architecture Phase-Slip refuses is refused before a tokenizer is looked for
        if tokenizer is None:
            tokenizer = _own_tokenizer(model)
        log.info("Phase-Slip: no heads given; calibrating %s once (%s)", type(model).__name__,
                 ", ".join(f"{k}={v!r}" for k, v in key) or "defaults")
        done[key] = calibrate_heads(model, tokenizer, **kwargs)
        log.info("Phase-Slip: calibrated heads %s", done[key].selected)
    return done[key]


def _own_tokenizer(model):
    from transformers import AutoTokenizer

    name = getattr(model, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer saved with the model
        raise ValueError("Phase-Slip needs heads=[(layer, kv_head), ...] or a tokenizer to calibrate them: pass "
                         "tokenizer=... to generate (or heads from PhaseSlipSampler(model, tok).calibrate_heads())") from None
