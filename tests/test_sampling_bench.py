"""`phaselm bench sampling` end to end at a tiny size, and its bad-input errors."""
import json

import pytest

from phaselm.cli import main
from phaselm.evaluation import text_metrics as tm
from phaselm.evaluation.sampling_bench import MAIN_METHODS, METRICS
from tests.conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


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
])
def test_bench_bad_input_is_one_line_and_exit_2(tiny_folder, tmp_path, capsys, extra, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    extra = [str(empty) if a == "EMPTY" else a for a in extra]
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
