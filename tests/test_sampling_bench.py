"""`phaselm bench sampling` end to end at a tiny size, and its bad-input errors."""
import json

import pytest

from phaselm_cli import main
from phaselm.evaluation import text_metrics as tm
from phaselm.evaluation.sampling_bench import MAIN_METHODS, METRICS
from tests.conftest import make_model


def test_bench_rounds_1_writes_every_method_and_metric(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    judge = tiny_folder  # any causal LM works as judge; the same tiny model keeps the test fast
    assert main(["bench", "sampling", "--model", str(tiny_folder), "--judge", str(judge), "--rounds", "1",
                 "--max-new-tokens", "6", "--human-passages", "10", "--temperatures", "0.5,1.0",
                 "--noise-scales", "0,1.0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(MAIN_METHODS) <= set(res["results"])
    for name in MAIN_METHODS:
        r = res["results"][name]
        for metric in ("unique_word_ratio", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu",
                       "repetition_rate", "perplexity", "judge_perplexity", "tokens_per_second"):
            assert metric in r, (name, metric)
        human = res["human_reference"]["methods"][name]
        assert "human_ppl_distance" in human and "mauve" in human
    assert res["sanity"]["noise0_equals_standard_matched"] is True
    assert res["results"]["phase_slip_noise0"]["perplexity"] == res["results"]["standard_matched"]["perplexity"]
    assert res["curves"] and res["comparisons"]
    assert (out / "report.md").read_text().startswith("# Sampling benchmark")
    assert (out / "frontier.png").stat().st_size > 1000


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "greedy,beam"], "unknown method"),
    (["--metrics", "bleurt"], "unknown metric"),
    (["--rounds", "0"], "rounds"),
    (["--prompts", "EMPTY"], "no prompts"),
    (["--sweeps", "standard_T,beam_T"], "unknown sweep"),
    (["--prompts", "BADJSONL"], "\"prompt\" field"),
    (["--prompts", "/no/such/prompts.txt"], "cannot read"),
    (["--temperatures", "0.5,0"], "temperatures"),
    (["--noise-scales", "4"], "noise scales"),
])
def test_bench_bad_input_is_one_line_and_exit_2(tiny_folder, tmp_path, capsys, extra, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the king"}\n{"text": "no prompt field"}\n')
    extra = [{"EMPTY": str(empty), "BADJSONL": str(bad)}.get(a, a) for a in extra]
    assert main(["bench", "sampling", "--model", str(tiny_folder), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_metric_definitions():
    assert tm.unique_word_ratio("The cat. The dog, the end") == pytest.approx(4 / 6)
    assert tm.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert tm.repetition_rate("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert tm.self_bleu(["the cat sat on the mat", "the cat sat on the mat"]) == pytest.approx(1.0)
    assert tm.self_bleu(["a b c d e", "f g h i j"]) < 0.05
    lo, hi = tm.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert set(METRICS) >= {"mauve", "judge_perplexity", "human_ppl_distance"}


def test_logits_processor_hook_and_sampling_entropy(tokenizer):
    """Sampler.logits_processor runs on each step's logits before the sampling knobs; with
    record_sampling_entropy the entropy of the distribution actually drawn from is recorded."""
    import torch

    from phaselm.sampling import PhaseSlipSampler, Sampler
    from phaselm.sampling.decoding import sampling_entropy
    from phaselm.sampling.processors import SamplingConfig

    model = make_model("llama")
    banned = tokenizer.convert_tokens_to_ids("the")
    seen = []

    def ban(input_ids, scores):
        seen.append(input_ids.shape[-1])
        return scores.index_fill(-1, torch.tensor([banned]), float("-inf"))

    plain = Sampler(model, tokenizer).generate(["the old door", "a dark"], max_new_tokens=8, top_k=20, seed=[3, 4],
                                               return_details=True)
    hooked = Sampler(model, tokenizer, logits_processor=[ban])
    hooked.record_sampling_entropy = True
    out = hooked.generate(["the old door", "a dark"], max_new_tokens=8, top_k=20, seed=[3, 4], return_details=True)
    assert all(banned not in ids for ids in out.token_ids)
    assert seen[1] == seen[0] + 1  # input_ids grow by the generated token
    assert out.diagnostics["sampling_entropy"].shape[0] == 2
    # identity processors leave the tokens unchanged; a Phase-Slip sampler takes them as an attribute
    same = Sampler(model, tokenizer, logits_processor=[lambda i, s: s]).generate(
        ["the old door", "a dark"], max_new_tokens=8, top_k=20, seed=[3, 4], return_details=True)
    assert same.token_ids == plain.token_ids
    ps = PhaseSlipSampler(model, tokenizer, noise_scale=0.0, heads=[(3, 0)])
    ps.logits_processor = [ban]
    assert all(banned not in ids for ids in ps.generate(["the old door"], max_new_tokens=8, top_k=20, seed=1,
                                                        return_details=True).token_ids)
    # definition: entropy of softmax(process(logits)); filtered tokens contribute 0
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = (z / 0.5).softmax(-1)
    assert sampling_entropy(z, SamplingConfig(temperature=0.5))[0] == pytest.approx(float(-(p * p.log()).sum()), 1e-5)
    q = (z[:, :2] / 0.5).softmax(-1)
    assert sampling_entropy(z, SamplingConfig(temperature=0.5, top_k=2))[0] == pytest.approx(
        float(-(q * q.log()).sum()), 1e-5)


@pytest.mark.parametrize("argv, needle", [
    (["generate", "the king", "--input-file", "IN"], "not both"),
    (["generate"], "--input-file"),
    (["generate", "--input-file", "/no/such/file.txt"], "cannot read"),
    (["generate", "--input-file", "EMPTY"], "no prompts"),
    (["generate", "--input-file", "IN", "--batch-size", "0"], "--batch-size"),
    (["generate", "--input-file", "IN", "--output", "/no/such/dir/out.jsonl"], "does not exist"),
])
def test_generate_input_file_bad_input(tiny_folder, tmp_path, capsys, argv, needle):
    (tmp_path / "in.txt").write_text("the king\na dark night\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = [{"IN": str(tmp_path / "in.txt"), "EMPTY": str(tmp_path / "empty.txt")}.get(a, a) for a in argv]
    assert main([*argv, "--model", str(tiny_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_stratified_bootstrap_definition():
    """Draws resample prompts, then rounds within each drawn prompt; every method gets the same
    draws (paired), and the MDE is 2.8 bootstrap SEs."""
    import numpy as np

    from phaselm.evaluation.sampling_bench import MDE_FACTOR, MethodArrays, compare, stratified_indices

    p_idx, r_idx = stratified_indices(6, 3, 500, seed=0)
    assert p_idx.shape == (500, 6) and r_idx.shape == (500, 6, 3)
    assert p_idx.max() < 6 and r_idx.max() < 3
    vals = np.arange(18, dtype=float).reshape(6, 3)
    s = tm.stratified_summary(vals, p_idx, r_idx)
    # one draw's mean is the mean of the drawn prompts' drawn rounds
    assert s["mean"] == pytest.approx(vals.mean())
    lo, hi = s["ci95"]
    boots = np.array([vals[p_idx[b][:, None], r_idx[b]].mean() for b in range(500)])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])))
    # constant within a prompt: the two-stage bootstrap reduces to resampling prompts
    const = np.repeat(np.arange(6, dtype=float)[:, None], 3, 1)
    two = tm.stratified_summary(const, p_idx, r_idx)["ci95"]
    assert two == pytest.approx(list(np.quantile(const[p_idx, 0].mean(1), [0.025, 0.975])))

    rng = np.random.default_rng(1)

    def gens(ppl, ent):
        return [{"prompt_index": i, "round": r, "perplexity": ppl[i, r], "entropy": ent[i, r],
                 "unique_word_ratio": 0.5, "text": f"w{i} x{r} y"} for i in range(6) for r in range(3)]

    base = rng.uniform(2, 6, (6, 3))
    ent = rng.uniform(0.5, 1.5, (6, 3))
    arrays = {"std_a": MethodArrays(gens(base, ent), 6, 3),
              "std_b": MethodArrays(gens(base * 2, ent + 1), 6, 3),
              "cand": MethodArrays(gens(base * 1.1, ent), 6, 3)}   # 10% above std_a, generation by generation
    row = compare(arrays, ["std_a", "std_b"], ["cand"], {"cand": "std_a"}, ["entropy"], 400)[0]
    st = row["same_temperature"]
    # paired draws: every draw sees the same generations for both methods, so the ratio never varies
    assert st["difference"] == pytest.approx(0.1) and st["ci95"] == pytest.approx([0.1, 0.1])
    assert st["se"] == pytest.approx(0.0, abs=1e-12) and st["mde"] == pytest.approx(MDE_FACTOR * st["se"])
    m = row["matched"]["entropy"]
    assert m["difference"] == pytest.approx(0.1) and m["ci95"] == pytest.approx([0.1, 0.1])
    # a candidate identical to a curve point differs by exactly 0
    arrays["twin"] = MethodArrays(gens(base, ent), 6, 3)
    twin = compare(arrays, ["std_a", "std_b"], ["twin"], {}, ["entropy"], 200)[0]["matched"]["entropy"]
    assert twin["difference"] == pytest.approx(0.0) and twin["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_a_later_command_keeps_the_rows_earlier_commands_wrote(tmp_path, capsys):
    """The README's first `bench sampling` command alone (headline methods only) must not drop the baseline rows
    (DRY, XTC, top-nσ) that the second command wrote into the same folder: a tiny fake folder holding the
    committed results.json, then a write of a run without those rows."""
    from pathlib import Path

    from phaselm.evaluation.sampling_report import write_all

    committed = json.loads((Path(__file__).parents[1] / "results" / "sampling" / "results.json").read_text())
    out = tmp_path / "sampling"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(committed))
    baselines = ["dry", "xtc", "top_nsigma"]
    new = json.loads(json.dumps(committed))  # what the headline-only command computes: no baseline rows
    for key in ("results", "methods", "generations", "method_wall_seconds"):
        new[key] = {n: v for n, v in new[key].items() if n not in baselines}
    new["comparisons"] = [r for r in new["comparisons"] if r["method"] not in baselines]
    new["config"] = dict(new["config"], methods=["standard_matched", "phase_slip"])
    new["results"]["phase_slip"] = dict(new["results"]["phase_slip"], describe="rerun")  # a row the new run redid
    write_all(new, out, "phaselm bench sampling --protocol powered --resume --out results/sampling")
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["results"]) and set(merged["results"]) == set(committed["results"])
    assert {r["method"] for r in merged["comparisons"]} == {r["method"] for r in committed["comparisons"]}
    for name in baselines:
        assert merged["results"][name] == committed["results"][name]
    assert merged["results"]["phase_slip"]["describe"] == "rerun"  # the new run's row wins
    assert merged["kept_from_earlier"] == {"methods": baselines, "commands": [committed["command"]]}
    assert set(baselines) <= set(merged["config"]["methods"])
    report = (out / "report.md").read_text()
    assert all(f"`{name}`" in report for name in baselines) and "Kept from earlier commands" in report
    # another setup is refused in one line before any model loads, and the folder is left as it was
    before = (out / "results.json").read_bytes()
    assert main(["bench", "sampling", "--protocol", "powered", "--rounds", "2", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another setup: rounds (4 there, 2 here)" in err[0], err
    assert (out / "results.json").read_bytes() == before
    with pytest.raises(ValueError, match="another setup: heads .*nothing was overwritten"):
        write_all(dict(new, heads=[[1, 0]]), out, "phaselm bench sampling")
    assert (out / "results.json").read_bytes() == before
