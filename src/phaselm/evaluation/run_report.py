"""Summarise a training run for ``results/``: one ``summary.json`` with the final and best val loss,
the final checkpoint's loss on the whole test split, the curves a grid plot needs (val loss and the
logged order parameter R of every phase layer against iteration) and the largest loss spike.

    phaselm report run RUN_DIR OUT_DIR --command "the command that made the run"
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from phaselm.training import checkpoint as ckpt
from phaselm.utils import atomic_write, provenance, read_jsonl


def loss_spike(train_losses: list[float]) -> float:
    """max_t (loss_t − min_{s<t} loss_s); 0 for a monotone curve, large for a run that destabilises."""
    best, spike = math.inf, 0.0
    for loss in train_losses:
        spike = max(spike, loss - best)
        best = min(best, loss)
    return spike


def curves(rows: list[dict]) -> dict:
    """From metrics.jsonl rows: ``val_loss`` [[iter, loss], ...] and ``R`` {"layer{L}": [[iter, R], ...]}
    (the train rows' ``layer{L}.R_mean``)."""
    out: dict = {"val_loss": [[r["iter"], r["loss"]] for r in rows if r.get("split") == "val"], "R": {}}
    for r in rows:
        if r.get("split") == "train":
            for key, value in r.items():
                if key.startswith("layer") and key.endswith(".R_mean"):
                    out["R"].setdefault(key.split(".")[0], []).append([r["iter"], value])
    return out


def summarize_run(run_dir: str | Path, out_dir: str | Path, command: str = "") -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass a run folder made by phaselm train")
    rows = read_jsonl(metrics)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not val:
        raise ValueError(f"{metrics} has no val rows yet; summarise a run after its first evaluation")
    state = ckpt.read_state(ckpt.latest_checkpoint(run_dir))
    best = min(val, key=lambda r: r["loss"])
    from phaselm.training.trainer import evaluate_split

    test = evaluate_split(run_dir, "test")
    summary = {
        "command": command, "config": state["config"], "provenance": provenance(),
        "iters": state["step"], "final_val_loss": val[-1]["loss"], "final_val_ppl": val[-1]["ppl"],
        "best_val_loss": best["loss"], "best_val_iter": best["iter"], "val_tokens": val[-1].get("tokens"),
        "final_test_loss": test["loss"], "final_test_ppl": test["ppl"], "test_tokens": test["tokens"],
        "mean_train_tokens_per_s": sum(r["tokens_per_s"] for r in train) / max(1, len(train)),
        "loss_spike": loss_spike([r["loss"] for r in train if "loss" in r]), "curves": curves(rows),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
