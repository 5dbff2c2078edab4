"""The loop metric, its statistics and the prompt set, on hand-made inputs."""
import hashlib
import json
import math
from importlib import resources

import numpy as np
import pytest

from phaselm.evaluation.loops import (
    LoopConfig, bootstrap_ci, has_loop, kaplan_meier, km_median, load_prompts, mcnemar_exact, rmst, tokens_to_loop,
    wilson,
)


def test_tokens_to_loop_finds_the_kth_occurrence():
    seq = [9, 1, 2, 1, 2, 1, 2, 7]
    # bigram (1, 2) ends at indices 2, 4, 6: its 3rd occurrence completes at index 6
    assert tokens_to_loop(seq, n=2, k=3) == 6
    # the first bigram to occur twice is (1, 2), again at index 4 ((2, 1) repeats only at 5)
    assert tokens_to_loop(seq, n=2, k=2) == 4
    assert tokens_to_loop(seq, n=3, k=3) is None  # (1, 2, 1) at 3, 5; (2, 1, 2) at 4, 6
    assert tokens_to_loop(seq, n=3, k=2) == 5


def test_tokens_to_loop_counts_overlapping_occurrences():
    assert tokens_to_loop([5] * 10, n=8, k=3) == 9  # the 8-gram of 5s ends at 7, 8, 9
    assert tokens_to_loop([5] * 9, n=8, k=3) is None
    assert tokens_to_loop([], n=8, k=3) is None


def test_has_loop_looks_at_the_last_half_only():
    period = [1, 2, 3, 4, 5]
    looping_end = list(range(100, 130)) + period * 6  # 60 tokens, the last 30 are the loop
    assert has_loop(looping_end, n=8, k=3)
    escaped = period * 6 + list(range(100, 130))  # loops first, then escapes: the last half is fresh
    assert tokens_to_loop(escaped, n=8, k=3) is not None
    assert not has_loop(escaped, n=8, k=3)
    # a sentence repeated twice is not a loop at k = 3; three times is
    sentence = list(range(20, 32))
    assert not has_loop(list(range(40, 64)) + sentence * 2, n=8, k=3)
    assert has_loop(list(range(40, 76)) + sentence * 3, n=8, k=3)


def test_metric_rejects_bad_parameters():
    with pytest.raises(ValueError, match="n must be"):
        has_loop([1, 2], n=0)
    with pytest.raises(ValueError, match="k must be"):
        tokens_to_loop([1, 2], k=1)


def test_wilson_interval():
    lo, hi = wilson(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-3) and hi == pytest.approx(0.1744, abs=1e-3)  # textbook values
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0


def test_kaplan_meier_with_censoring():
    # times 2 (event), 3 (censored), 4 (event), 5 (event): S = 3/4 at 2, then 3/4·(1/2) at 4, then 0 at 5
    km = kaplan_meier([2, 3, 4, 5], [True, False, True, True])
    assert km == [(2.0, 0.75), (4.0, 0.375), (5.0, 0.0)]
    assert km_median([2, 3, 4, 5], [True, False, True, True]) == 4.0
    assert km_median([10, 10], [False, False]) == math.inf
    # RMST to 6: 1·2 + 0.75·2 + 0.375·1 + 0·1
    assert rmst([2, 3, 4, 5], [True, False, True, True], 6) == pytest.approx(2 + 1.5 + 0.375)
    assert rmst([10, 10], [False, False], 8) == 8


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 2 ** 10)


def test_bootstrap_ci_covers_the_mean():
    x = np.arange(100, dtype=float)
    lo, hi = bootstrap_ci(lambda i: x[i].mean(), 100)
    assert lo < 49.5 < hi and hi - lo < 25


def test_prompt_set_is_fixed_and_balanced():
    text = resources.files("phaselm.evaluation").joinpath("data", "loop_prompts.jsonl").read_bytes()
    assert hashlib.sha256(text).hexdigest() == "a97ead68930e6e5cce8e4dc44f7b414a8feb5d102c4e80f42154673213b3965c"
    rows = load_prompts()
    assert len(rows) >= 100 and len({r["id"] for r in rows}) == len(rows)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"narrative", "expository", "list", "code"}
    assert all(sum(r["kind"] == kd for r in rows) >= 25 for kd in kinds)
    assert all(set(r) == {"id", "kind", "prompt"} and r["prompt"].strip() for r in rows)
    few = load_prompts(5)
    assert len(few) == 5 and {r["kind"] for r in few} == kinds
    assert json.dumps(few[0]) == json.dumps(rows[0])


def test_bad_config():
    with pytest.raises(ValueError, match="unknown method"):
        LoopConfig(methods=["greedy", "nope"]).validate()
    with pytest.raises(ValueError, match="greedy"):
        LoopConfig(methods=["dry"]).validate()
    with pytest.raises(ValueError, match="--prompts"):
        load_prompts(0)


def test_runner_end_to_end_on_a_tiny_model(tmp_path):
    import torch
    from tqdm import tqdm

    from phaselm.evaluation.loops import METHODS, LoopBench
    from tests.conftest import make_model, make_tokenizer

    model, tok = make_model("llama"), make_tokenizer()
    cfg = LoopConfig(prompts=4, max_new_tokens=12, batch_size=3, human_passages=0,
                     methods=["greedy", "phase_slip_1", "repetition_penalty_1.3"])
    bench = LoopBench(model, tok, cfg, str(tmp_path), progress=False)
    prompts = [r["prompt"] for r in bench.items]
    # the perplexity taken from generate's raw logits equals the teacher-forced one
    run = bench._generate(METHODS["repetition_penalty_1.3"], prompts, 0, tqdm(disable=True))
    fast = [g.pop("perplexity") for g in run["generations"]]
    bench._score(prompts, run["generations"])
    assert fast == pytest.approx([g["perplexity"] for g in run["generations"]], rel=1e-4)
    res = bench.run("test")
    assert set(res["results"]) == set(cfg.methods)
    assert {"loop_rate", "rmst", "perplexity_mean", "by_kind"} <= set(res["results"]["phase_slip_1"])
    assert (tmp_path / "report.md").read_text().startswith("# Loop benchmark")
    with pytest.raises(ValueError, match="--resume"):
        LoopBench(model, tok, cfg, str(tmp_path), progress=False).run("again")
    again = LoopBench(model, tok, cfg, str(tmp_path), progress=False).run("again", resume=True)  # nothing to redo
    assert again["results"]["greedy"]["loop_rate"] == res["results"]["greedy"]["loop_rate"]
    torch.testing.assert_close(torch.tensor(again["results"]["greedy"]["perplexity_mean"]),
                               torch.tensor(res["results"]["greedy"]["perplexity_mean"]))
