"""Error analysis of trained models on fuzzy recall (L128, vocabulary 16): which answer tokens they miss.

Rebuilds the bench's data (``TaskData.build``: num_train 12,800, num_test 2,000, data_seed 0; see
``phaselm.evaluation.tasks_bench``), checks that each model's test accuracy equals the committed
one in ``results/tasks/fuzzy_recall/runs/<run>.json``, then splits the answer tokens (argmax right or
not) of the test set and of ``--train-examples`` training examples by:

* ``index``: the answer's place in its value (1st / 2nd / 3rd value token), and ``value_len``;
* ``key_len`` (1–3; held-out keys are all 3 tokens) and ``shown``: times the key was shown before;
* ``distance``: tokens back to the same value token at the key's last earlier occurrence;
* ``position``: the answer's position in the sequence; ``probe``: in the last motif or not;
* ``overlap``: the most key tokens the query key shares with another, different, key shown
  earlier in the sequence (``3`` = the same tokens in another order); ``shared``: which
  right-aligned key positions such a key agrees on (``last2`` = the same last two tokens, then
  ``first2``, ``ends``, ``last1``, ``none``); ``rival_nearer``: whether a ``last2`` key was shown
  more recently than the query key;
* ``context``: the fewest tokens ending at the answer's input position whose every earlier
  occurrence in the sequence is followed by the answer (2: matching the last two tokens suffices;
  3 or 4+: two tokens also occur earlier followed by something else), also crossed with ``index``
  and ``key_len``;
* ``first_ok`` (2nd/3rd value tokens): whether the model got the value's 1st token right.

Each table row is ``{"n", "acc"}`` (answer tokens, their accuracy); ``errors`` classifies the
wrong predictions: ``bigram_copy`` (a token that follows an earlier occurrence of the two tokens
before the answer), else a token of the right value, of another value, or anything else.

    OMP_NUM_THREADS=1 python experiments/fuzzy_recall_errors.py --runs runs/tasks/fuzzy_recall/L128__gpt__w64__seed2 [...] \
        --out results/tasks/fuzzy_recall/errors.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from phaselm.data.tasks import TaskData, make_task

NUM_TRAIN, NUM_TEST, DATA_SEED = 12_800, 2_000, 0
KEY_END, PAD = 7, 15  # keys are tokens 0..6, values 7..14, pad 15 (vocabulary 16)


def motifs(row: np.ndarray) -> list[tuple[tuple, tuple, int]]:
    """The (key, value, start of the value) motifs of one full sequence (runs of key / value tokens)."""
    out, t, n = [], 0, len(row)
    while t < n and row[t] == PAD:
        t += 1
    while t < n:
        k0 = t
        while row[t] < KEY_END:
            t += 1
        v0 = t
        while t < n and KEY_END <= row[t] < PAD:
            t += 1
        out.append((tuple(row[k0:v0]), tuple(row[v0:t]), v0))
    return out


def context_needed(seq: np.ndarray, t: int) -> int:
    """The fewest tokens ending at ``t`` whose every earlier occurrence is followed by ``seq[t + 1]``
    (what an n-gram "induction" copy needs to be right; 6 = none up to 5 suffices)."""
    for n in range(1, 6):
        ctx = seq[t - n + 1:t + 1]
        if all(seq[s + 1] == seq[t + 1] for s in range(n - 1, t) if (seq[s - n + 1:s + 1] == ctx).all()):
            return n
    return 6


def shared(key: tuple, others: list[tuple]) -> str:
    """Which right-aligned positions of ``key`` another key agrees on (the first pattern that holds)."""
    def agree(pos):
        return any(len(k) >= max(pos) and len(key) >= max(pos) and all(k[-p] == key[-p] for p in pos) for k in others)
    for name, pos in (("last2", (1, 2)), ("first2", (2, 3)), ("ends", (1, 3)), ("last1", (1,))):
        if agree(pos):
            return name
    return "none"


def features(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """One entry per answer token (row-major order of ``y >= 0``): its features (module docstring)."""
    full = np.concatenate([x, y[:, -1:]], axis=1)  # the inputs lack the last value token
    rows = defaultdict(list)
    for i, seq in enumerate(full):
        ms, seen, last_at = motifs(seq), {}, {}
        for m, (key, value, v0) in enumerate(ms):
            if key in seen:
                others = [k for k in last_at if k != key]  # different keys shown earlier
                overlap = max((len(set(key) & set(k)) for k in others), default=0)
                rivals = [last_at[k] for k in others if len(k) >= 2 and k[-2:] == key[-2:]]
                nearer = "n/a" if not rivals else str(max(rivals) > last_at[key])
                for j in range(len(value)):
                    t = v0 + j - 1  # the input position whose target is value[j]
                    for name, val in (("row", i), ("t", t), ("target", value[j]), ("index", j + 1),
                                      ("value_len", len(value)), ("key_len", len(key)), ("shown", seen[key]),
                                      ("distance", v0 - last_at[key]), ("probe", m == len(ms) - 1),
                                      ("overlap", overlap), ("shared", shared(key, others)),
                                      ("rival_nearer", nearer), ("context", context_needed(seq, t))):
                        rows[name].append(val)
            seen[key] = seen.get(key, 0) + 1
            last_at[key] = v0  # the key's last occurrence so far (start of its value)
    f = {k: np.array(v) for k, v in rows.items()}
    assert len(f["t"]) == int((y >= 0).sum()) and (y[f["row"], f["t"]] == f["target"]).all()
    return f


@torch.no_grad()
def predict(model, x: np.ndarray, y: np.ndarray, batch: int = 100) -> np.ndarray:
    """Argmax predictions at the answer positions (row-major order of ``y >= 0``)."""
    preds = []
    for i in range(0, len(x), batch):
        xb, yb = torch.from_numpy(x[i:i + batch]), torch.from_numpy(y[i:i + batch])
        out = model(xb, yb, head_at_targets=True)  # logits at y >= 0, as evaluate_answers computes them
        preds.append(out.logits.argmax(-1).numpy())
    return np.concatenate(preds)


def error_kinds(x, y, f, pred) -> dict[str, int]:
    """What the wrong predictions are: ``bigram_copy``, a token that follows an earlier occurrence
    of the two tokens before the answer (what matching only them would copy); else a token of the
    right value (wrong place), a token of another value in the sequence, or anything else."""
    full = np.concatenate([x, y[:, -1:]], axis=1)
    kinds = defaultdict(int)
    for i, t, p, tgt in zip(f["row"], f["t"], pred, f["target"]):
        if p == tgt:
            continue
        seq = full[i]
        follows = {seq[s + 1] for s in range(1, t) if seq[s - 1] == seq[t - 1] and seq[s] == seq[t]}
        ms = motifs(seq)
        mine = next(v for k, v, v0 in ms if v0 <= t + 1 < v0 + len(v))
        others = {tok for k, v, v0 in ms if v0 <= t for tok in v}
        kinds["bigram_copy" if p in follows else "same_value" if p in mine else
              "other_value_in_seq" if p in others else "other"] += 1
    return dict(kinds)


def bins(f: dict) -> dict[str, np.ndarray]:
    """The split variables (binned)."""
    d = f["distance"]
    return {"index": f["index"], "value_len": f["value_len"], "key_len": f["key_len"],
            "shown": np.minimum(f["shown"], 3), "probe": f["probe"], "overlap": f["overlap"], "shared": f["shared"],
            "rival_nearer": f["rival_nearer"], "context": np.minimum(f["context"], 4),
            "context_x_index": np.char.add(np.minimum(f["context"], 4).astype(str), np.char.add("_", f["index"].astype(str))),
            "context_x_key_len": np.char.add(np.minimum(f["context"], 4).astype(str), np.char.add("_", f["key_len"].astype(str))),
            "distance": np.select([d < 16, d < 32, d < 64], ["<16", "16-31", "32-63"], "64+"),
            "position": np.select([f["t"] < 64, f["t"] < 96], ["<64", "64-95"], "96+"),
            "first_ok": f["first_ok"]}


def table(ok: np.ndarray, f: dict, keys: list[str]) -> dict:
    by, out = bins(f), {}
    for key in keys:
        out[key] = {str(v): {"n": int((by[key] == v).sum()), "acc": round(float(ok[by[key] == v].mean()), 4)}
                    for v in np.unique(by[key])}
    return out


def first_ok(f: dict, ok: np.ndarray) -> np.ndarray:
    """Per answer token: whether the 1st token of its value was predicted right ("n/a" for 1st tokens)."""
    first = {(r, t - i + 1): o for r, t, i, o in zip(f["row"], f["t"], f["index"], ok) if i == 1}
    return np.array(["n/a (1st token)" if i == 1 else str(first[(r, t - i + 1)])
                     for r, t, i in zip(f["row"], f["t"], f["index"])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="trained model folders (Hugging Face format)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--results", default="results/tasks/fuzzy_recall/runs", help="committed run JSONs")
    ap.add_argument("--train-examples", type=int, default=2000, help="training examples to split the same way")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    data = TaskData.build(make_task("fuzzy_recall", seq_len=128), NUM_TRAIN, NUM_TEST, DATA_SEED)
    sets = {"test": data.test, "train": tuple(a[:args.train_examples] for a in data.train)}
    feats = {name: features(*xy) for name, xy in sets.items()}
    split_keys = ["index", "value_len", "key_len", "shown", "distance", "position", "probe", "overlap",
                  "shared", "rival_nearer", "context", "context_x_index", "context_x_key_len", "first_ok"]
    report = {"data": {"num_train": NUM_TRAIN, "num_test": NUM_TEST, "data_seed": DATA_SEED,
                       "train_examples_analysed": args.train_examples,
                       "test_answers": int(len(feats["test"]["t"]))}, "runs": {}}
    for name, f in feats.items():  # how often two tokens of context do not pin the answer down
        hard = np.bincount(f["row"], weights=f["context"] >= 3, minlength=len(sets[name][0]))
        report["data"][f"{name}_answers_context_3plus"] = round(float((f["context"] >= 3).mean()), 4)
        report["data"][f"{name}_examples_without_context_3plus"] = round(float((hard == 0).mean()), 4)
    for folder in map(Path, args.runs):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        committed = json.loads((Path(args.results) / f"{folder.name}.json").read_text())["test"]
        res = {}
        for name, (x, y) in sets.items():
            f = feats[name]
            pred = predict(model, x, y)
            ok = pred == f["target"]
            f["first_ok"] = first_ok(f, ok)
            per_ex = np.bincount(f["row"], weights=~ok, minlength=len(x)) == 0
            res[name] = {"accuracy": round(float(ok.mean()), 4), "correct": int(ok.sum()), "answers": int(len(ok)),
                         "exact": round(float(per_ex.mean()), 4), "by": table(ok, f, split_keys),
                         "errors": error_kinds(x, y, f, pred)}
        res["committed_test"] = {k: committed[k] for k in ("accuracy", "correct", "answers", "exact")}
        res["reproduced"] = res["test"]["correct"] == committed["correct"] and res["test"]["answers"] == committed["answers"]
        report["runs"][folder.name] = res
        print(f"{folder.name}: test {res['test']['accuracy']:.4f} ({res['test']['correct']}/{res['test']['answers']}, "
              f"committed {committed['correct']}), train {res['train']['accuracy']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
