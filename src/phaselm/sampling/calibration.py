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

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from phaselm.nn.functional import kl_divergence
from phaselm.sampling.kv import RowGroupCache, attention_layers, kv_geometry
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


@torch.no_grad()
def calibrate_heads(
    model,
    tokenizer,
    text: str | None = None,
    search_layers: int = 6,
    num_heads: int | None = 3,
    samples_per_head: int = 2,
    angle: float = 0.5,
    exclude_fraction: float = 0.25,
    max_tokens: int = 128,
    groups_per_pass: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> HeadCalibration:
    """Score the KV heads of the last ``search_layers`` layers on ``text``; see the module doc."""
    num_layers, num_kv, head_dim = kv_geometry(model)
    if not (isinstance(search_layers, int) and 1 <= search_layers <= num_layers):
        raise ValueError(f"search_layers must be an integer in [1, {num_layers}] (the model has {num_layers} layers), got {search_layers}")
    attention = set(attention_layers(model))
    searched = [layer for layer in range(num_layers - search_layers, num_layers) if layer in attention]
    if not searched:
        raise ValueError(f"the last {search_layers} layers have no attention (values to rotate); raise search_layers "
                         f"(attention layers: {sorted(attention)})")
    candidates = [(layer, head) for layer in searched for head in range(num_kv)]
    if num_heads is None:  # 3, or every candidate when the searched layers hold fewer (e.g. a small PMA)
        num_heads = min(3, len(candidates))
    if not (isinstance(num_heads, int) and 1 <= num_heads <= len(candidates)):
        raise ValueError(f"num_heads must be an integer in [1, {len(candidates)}], got {num_heads}")
    if not (0 <= exclude_fraction < 1):
        raise ValueError(f"exclude_fraction must be in [0, 1), got {exclude_fraction}")
    if not (samples_per_head >= 1 and groups_per_pass >= 1 and angle > 0):
        raise ValueError("samples_per_head and groups_per_pass must be >= 1 and angle > 0")
    text = DEFAULT_CALIBRATION_TEXT if text is None else text
    if not text.strip():
        raise ValueError("calibration text is empty; pass non-empty text or None for the built-in text")
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None) or max_tokens  # a small trained model's block
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :min(max_tokens, context)].to(device)
    if ids.shape[1] < 2:
        raise ValueError("calibration text must be at least 2 tokens long")
    targets = ids[0, 1:]

    generator = torch.Generator().manual_seed(seed)
    trials = [c for c in candidates for _ in range(samples_per_head)]
    rotations = random_rotations(len(trials), head_dim, angle, generator=generator)
    damage = torch.zeros(len(candidates), dtype=torch.float64)
    explore = torch.zeros(len(candidates), dtype=torch.float64)
    first_layer = candidates[0][0]
    eye = torch.eye(head_dim)
    starts = range(0, len(trials), groups_per_pass)
    for start in tqdm(starts, desc="calibrating heads", disable=not progress, leave=False):
        chunk = list(range(start, min(start + groups_per_pass, len(trials))))
        per_layer: dict[int, torch.Tensor] = {}
        for g, t in enumerate(chunk):
            layer, head = trials[t]
            rot = per_layer.setdefault(layer, eye.repeat(len(chunk), 1, num_kv, 1, 1))
            rot[g, 0, head] = rotations[t]
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
