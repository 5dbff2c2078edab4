"""Error analysis of trained models on selective copying (L256, vocabulary 16): which answers they miss.

The task (``phaselm.data.tasks.SelectiveCopy``): k = 16 content tokens c_1..c_k at sorted positions
p_1 < … < p_k of a sequence of blanks, a marker at L − k − 1, then k blank inputs whose targets are
c_1..c_k in order; the answer c_i is due at input position a_i = L − k − 1 + i. So a model must
find the i-th content token, counting. Rebuilds the bench's data (``TaskData.build``: num_train
12,800, num_test 2,000, data_seed 0), checks that each model's test accuracy equals the committed one
in ``results/tasks/selective_copy/runs/<run>.json``, then splits the test answers by:

* ``index``: i (1–16), binned; ``source``: p_i, binned;
* ``gap``: the smaller distance to a neighbouring content token, min(p_i − p_{i−1}, p_{i+1} − p_i)
  (1 = adjacent), binned;
* ``repeat``: whether c_i equals c_{i−1} or c_{i+1} (then a slip to that neighbour cannot show).

``errors`` classifies the wrong predictions: ``previous`` (c_{i−1}), ``next`` (c_{i+1}), ``two_back``
/ ``two_ahead`` (c_{i∓2}), ``other_content`` (another content token of the sequence), ``other``
(a token the sequence's content lacks). A slip of one place in the count shows as ``previous`` or
``next``. ``examples_wrong``: how many test examples hold at least one wrong answer.

    OMP_NUM_THREADS=1 python experiments/selective_copy_errors.py --runs runs/tasks/selective_copy/L256__gpt__w64__seed4 [...] \\
        --out results/tasks/selective_copy/errors.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fuzzy_recall_errors import predict  # experiments/ is on sys.path when run as a script
from phaselm.data.tasks import TaskData, make_task

NUM_TRAIN, NUM_TEST, DATA_SEED = 12_800, 2_000, 0


def features(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """One entry per answer (row-major order of ``y >= 0``): row, index i, source p_i, gap, repeat,
    target and the row's content ``[n, k]`` (module docstring)."""
    n, L = x.shape
    k = int((y[0] >= 0).sum())
    blank = int(x[0, L - 1])  # the inputs after the marker are blanks
    src = np.stack([np.flatnonzero(row[:L - k - 1] != blank) for row in x])  # p_1..p_k, [n, k]
    content = np.take_along_axis(x, src, axis=1)
    assert (content == y[:, L - k:]).all(), "targets are the content tokens in order"
    pad = np.full((n, 1), 10 ** 6)
    gaps = np.diff(np.concatenate([-pad, src, L + pad], axis=1), axis=1)  # [n, k + 1]
    same = content[:, 1:] == content[:, :-1]  # c_i == c_{i+1}, [n, k − 1]
    no = np.zeros((n, 1), dtype=bool)
    return {"row": np.repeat(np.arange(n), k), "index": np.tile(np.arange(1, k + 1), n), "source": src.ravel(),
            "gap": np.minimum(gaps[:, :-1], gaps[:, 1:]).ravel(),
            "repeat": (np.concatenate([no, same], 1) | np.concatenate([same, no], 1)).ravel(),
            "target": content.ravel(), "content": content}


def error_kinds(f: dict, pred: np.ndarray) -> dict[str, int]:
    """What the wrong predictions are (module docstring), checked in the order listed there."""
    content, k = f["content"], f["content"].shape[1]
    kinds = Counter()
    for r, i, p, t in zip(f["row"], f["index"] - 1, pred, f["target"]):
        if p == t:
            continue
        near = {"previous": i - 1, "next": i + 1, "two_back": i - 2, "two_ahead": i + 2}
        kind = next((name for name, j in near.items() if 0 <= j < k and content[r, j] == p), None)
        kinds[kind or ("other_content" if p in content[r] else "other")] += 1
    return dict(kinds)


def bins(f: dict) -> dict[str, np.ndarray]:
    i, s, g = f["index"], f["source"], f["gap"]
    return {"index": np.select([i == 1, i <= 4, i <= 12, i < 16], ["1", "2-4", "5-12", "13-15"], "16"),
            "source": np.select([s < 64, s < 128, s < 192], ["<64", "64-127", "128-191"], "192+"),
            "gap": np.select([g == 1, g <= 3, g <= 8], ["1", "2-3", "4-8"], "9+"),
            "repeat": f["repeat"].astype(str)}


def table(ok: np.ndarray, f: dict) -> dict:
    out = {}
    for key, by in bins(f).items():
        out[key] = {str(v): {"n": int((by == v).sum()), "wrong": int((~ok[by == v]).sum())} for v in np.unique(by)}
    return out


def markdown(report: dict, command: str) -> str:
    """The table of ``report`` (one row per run) with the command that made it."""
    d = report["data"]
    gap = d["answers_by"]["gap"]
    lines = ["# Selective copying: which answers the models miss", "",
             f"`{command}` (test set: {d['num_test']:,} examples, {d['test_answers']:,} answers; "
             f"every run's count of wrong answers equals its committed one: "
             f"{all(r['reproduced'] for r in report['runs'].values())}).", "",
             "Slips: the content token one place before or after the right one (c_{i−1}, c_{i+1}). Adjacent: "
             f"answers whose content token sits right next to another content token (gap 1; {gap['1']:,} of "
             f"{d['test_answers']:,} answers, {gap['1'] / d['test_answers']:.0%}). Error rates per 1,000 answers.", "",
             "| run | wrong | examples with one | slips | other content | other | wrong per 1,000 adjacent | "
             "per 1,000 at gap 9+ | answers 13–15 among the wrong |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        e, by = r["errors"], r["by"]
        slips = e.get("previous", 0) + e.get("next", 0)
        per_k = lambda b: 1000 * by["gap"].get(b, {"wrong": 0})["wrong"] / gap[b]  # noqa: E731
        lines.append(f"| {name} | {r['wrong']} | {r['examples_wrong']} | {slips} | "
                     f"{e.get('other_content', 0) + e.get('two_back', 0) + e.get('two_ahead', 0)} | {e.get('other', 0)} | "
                     f"{per_k('1'):.1f} | {per_k('9+'):.2f} | {by['index'].get('13-15', {'wrong': 0})['wrong']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="trained model folders (Hugging Face format)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--results", default="results/tasks/selective_copy/runs", help="committed run JSONs")
    ap.add_argument("--md", help="also write this markdown table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    data = TaskData.build(make_task("selective_copy", seq_len=256), NUM_TRAIN, NUM_TEST, DATA_SEED)
    x, y = data.test
    f = features(x, y)
    by = bins(f)
    report = {"data": {"num_train": NUM_TRAIN, "num_test": NUM_TEST, "data_seed": DATA_SEED, "test_answers": len(f["row"]),
                       "answers_by": {k: {str(v): int((b == v).sum()) for v in np.unique(b)} for k, b in by.items()}},
              "runs": {}}
    for folder in map(Path, args.runs):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        committed = json.loads((Path(args.results) / f"{folder.name}.json").read_text())["test"]
        pred = predict(model, x, y)
        ok = pred == f["target"]
        res = {"correct": int(ok.sum()), "answers": int(len(ok)), "wrong": int((~ok).sum()),
               "examples_wrong": int((np.bincount(f["row"], weights=~ok, minlength=len(x)) > 0).sum()),
               "errors": error_kinds(f, pred), "by": table(ok, f),
               "committed_correct": committed["correct"], "reproduced": int(ok.sum()) == committed["correct"]}
        report["runs"][folder.name] = res
        print(f"{folder.name}: {res['wrong']} wrong (committed {committed['answers'] - committed['correct']}), "
              f"{res['errors']}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report, "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv)))


if __name__ == "__main__":
    main()
