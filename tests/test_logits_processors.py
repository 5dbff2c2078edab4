"""DRY, XTC and top-nσ against their definitions on hand-made inputs, and inside ``model.generate``."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from phaselm.sampling.logits_processors import (
    DRYLogitsProcessor, TopNSigmaLogitsProcessor, XTCLogitsProcessor, sequence_breaker_ids,
)

V = 10


def ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------- DRY
def test_dry_penalty_value_for_a_repeated_suffix():
    # context "1 2 3 4 | 1 2 3": suffix 1 2 3 (length 3) occurred before, followed by 4
    dry = DRYLogitsProcessor(multiplier=0.8, base=1.75, allowed_length=2)
    out = dry(ids([1, 2, 3, 4, 1, 2, 3]), torch.zeros(1, V))
    expected = torch.zeros(1, V)
    expected[0, 4] = -0.8 * 1.75 ** (3 - 2)
    torch.testing.assert_close(out, expected)


def test_dry_llama_cpp_worked_example():
    # llama.cpp's comment: context a b c c b c y a b c; repeats ending before c (3), b (1), y (2)
    a, b, c, y = 1, 2, 3, 7
    dry = DRYLogitsProcessor(multiplier=1.0, base=2.0, allowed_length=1)
    out = dry(ids([a, b, c, c, b, c, y, a, b, c]), torch.zeros(1, V))
    expected = torch.zeros(1, V)
    expected[0, c] = -(2.0 ** (3 - 1))
    expected[0, b] = -(2.0 ** (1 - 1))
    expected[0, y] = -(2.0 ** (2 - 1))
    torch.testing.assert_close(out, expected)


def test_dry_takes_the_longest_match_per_token():
    # 5 follows "3" (match length 1) and "2 3" ... the longest earlier match ending before a 5 wins
    dry = DRYLogitsProcessor(multiplier=1.0, base=3.0, allowed_length=1)
    out = dry(ids([9, 3, 5, 2, 3, 5, 8, 2, 3]), torch.zeros(1, V))
    # suffix "2 3": earlier "2 3" at positions 3-4 (length 2, followed by 5); "3" at 1 (length 1, followed by 5)
    assert out[0, 5].item() == pytest.approx(-(3.0 ** (2 - 1)))
    assert torch.count_nonzero(out) == 1


def test_dry_allowed_length_boundary():
    scores = torch.zeros(1, V)
    # repeated suffix "1 2" has length 2: penalised at allowed_length 2 (base^0), not at 3
    ctx = ids([1, 2, 6, 1, 2])
    assert DRYLogitsProcessor(multiplier=0.5, allowed_length=2)(ctx, scores)[0, 6].item() == pytest.approx(-0.5)
    assert torch.equal(DRYLogitsProcessor(multiplier=0.5, allowed_length=3)(ctx, scores), scores)
    # a context no longer than allowed_length is left alone
    assert torch.equal(DRYLogitsProcessor(allowed_length=2)(ids([1, 1]), scores), scores)


def test_dry_sequence_breaker_stops_a_match():
    scores = torch.zeros(1, V)
    ctx = ids([1, 2, 3, 4, 1, 2, 3])
    # a breaker inside the repeated suffix caps the match at the tokens after it: "3" only, < allowed 2
    assert torch.equal(DRYLogitsProcessor(allowed_length=2, sequence_breakers=[2])(ctx, scores), scores)
    # with the breaker 1 at the suffix start the match is "2 3" (length 2): base^0
    out = DRYLogitsProcessor(multiplier=0.8, allowed_length=2, sequence_breakers=[1])(ctx, scores)
    assert out[0, 4].item() == pytest.approx(-0.8)
    # a breaker token itself is never penalised
    assert torch.equal(DRYLogitsProcessor(allowed_length=2, sequence_breakers=[4])(ctx, scores), scores)


def test_dry_penalty_last_n_limits_the_search():
    scores = torch.zeros(1, V)
    ctx = ids([1, 2, 3, 4, 8, 8, 9, 1, 2, 3])
    assert DRYLogitsProcessor(allowed_length=2)(ctx, scores)[0, 4].item() < 0
    assert torch.equal(DRYLogitsProcessor(allowed_length=2, penalty_last_n=6)(ctx, scores), scores)


def test_dry_rows_are_independent():
    dry = DRYLogitsProcessor(multiplier=0.8, allowed_length=2)
    rows = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 7, 8, 9, 0, 5]]
    scores = torch.randn(2, V)
    both = dry(ids(*rows), scores)
    for b, row in enumerate(rows):
        torch.testing.assert_close(both[b], dry(ids(row), scores[b:b + 1])[0])


def test_dry_exponent_is_capped():
    out = DRYLogitsProcessor(multiplier=1.0, base=1.75, allowed_length=1)(ids([1] * 400), torch.zeros(1, V))
    assert torch.isfinite(out).all() and out[0, 1] < -1e30


def test_sequence_breaker_ids_from_text():
    class Tok:
        vocab = ["a", "b:", "\n", "cd", '"x']

        def __len__(self):
            return len(self.vocab)

        def decode(self, t):
            return self.vocab[t[0]]

    assert sequence_breaker_ids(Tok()) == [1, 2, 4]


@pytest.mark.parametrize("kwargs, word", [
    (dict(multiplier=-1), "multiplier"), (dict(base=0.5), "base"), (dict(allowed_length=0), "allowed_length"),
    (dict(sequence_breakers="\n"), "sequence_breakers"), (dict(penalty_last_n=0), "penalty_last_n"),
    (dict(multiplier=float("nan")), "multiplier"),
])
def test_dry_bad_parameters(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        DRYLogitsProcessor(**kwargs)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- XTC
def test_xtc_keeps_exactly_the_least_likely_token_above_threshold():
    probs = torch.tensor([[0.35, 0.05, 0.25, 0.15, 0.12, 0.08]])
    out = XTCLogitsProcessor(threshold=0.1, probability=1.0)(None, probs.log())
    removed = torch.isinf(out[0]).nonzero().flatten().tolist()
    assert sorted(removed) == [0, 2, 3]  # above 0.1: 0.35, 0.25, 0.15, 0.12 -> keep 0.12 only
    kept = torch.isfinite(out[0])
    torch.testing.assert_close(out[0][kept], probs.log()[0][kept])


def test_xtc_does_nothing_at_p0_or_with_fewer_than_two_above():
    logits = torch.tensor([[0.35, 0.05, 0.25, 0.15, 0.12, 0.08]]).log()
    assert torch.equal(XTCLogitsProcessor(threshold=0.1, probability=0.0)(None, logits), logits)
    one_above = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]]).log()
    assert torch.equal(XTCLogitsProcessor(threshold=0.3, probability=1.0)(None, one_above), one_above)
    # threshold > 0.5: at most one token can be above
    assert torch.equal(XTCLogitsProcessor(threshold=0.6, probability=1.0)(None, logits), logits)


def test_xtc_ties_keep_exactly_one():
    logits = torch.tensor([[0.3, 0.3, 0.3, 0.1]]).log()
    out = XTCLogitsProcessor(threshold=0.2, probability=1.0)(None, logits)
    assert torch.isfinite(out[0, :3]).sum() == 1 and torch.isfinite(out[0, 3])


def test_xtc_min_keep():
    logits = torch.tensor([[0.5, 0.5, float("-inf")]]).log_softmax(-1)
    assert torch.equal(XTCLogitsProcessor(threshold=0.2, probability=1.0, min_keep=2)(None, logits), logits)


def test_xtc_probability_is_a_seeded_coin_per_row():
    logits = torch.tensor([[0.35, 0.05, 0.25, 0.15, 0.12, 0.08]]).log().repeat(400, 1)
    a = XTCLogitsProcessor(threshold=0.1, probability=0.3, seed=7)(None, logits)
    b = XTCLogitsProcessor(threshold=0.1, probability=0.3, seed=7)(None, logits)
    assert torch.equal(a, b)
    acted = torch.isinf(a).any(-1).float().mean().item()
    assert abs(acted - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400)
    coins = torch.rand(400, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.isinf(a).any(-1), coins < 0.3)


def test_xtc_rows_are_independent():
    x = XTCLogitsProcessor(threshold=0.1, probability=1.0)
    rows = torch.tensor([[0.35, 0.05, 0.25, 0.15, 0.12, 0.08], [0.9, 0.02, 0.02, 0.02, 0.02, 0.02]]).log()
    both = x(None, rows)
    for b in range(2):
        assert torch.equal(both[b], XTCLogitsProcessor(threshold=0.1, probability=1.0)(None, rows[b:b + 1])[0])


@pytest.mark.parametrize("kwargs, word", [
    (dict(threshold=0), "threshold"), (dict(threshold=1.5), "threshold"), (dict(probability=-0.1), "probability"),
    (dict(min_keep=0), "min_keep"), (dict(seed=-1), "seed"), (dict(probability=True), "probability"),
])
def test_xtc_bad_parameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        XTCLogitsProcessor(**kwargs)


# ---------------------------------------------------------------------------- top-nσ
@pytest.mark.parametrize("n", [0.0, 0.5, 1.0, 2.0])
def test_top_n_sigma_keep_set_equals_the_formula(n):
    torch.manual_seed(0)
    z = torch.randn(3, 50) * 3
    out = TopNSigmaLogitsProcessor(n)(None, z)
    for b in range(3):
        row = z[b].double()
        sigma = math.sqrt(((row - row.mean()) ** 2).mean().item())  # population std
        keep = row >= row.max() - n * sigma
        assert torch.equal(torch.isfinite(out[b]), keep)
        assert torch.equal(out[b][keep], z[b][keep])


def test_top_n_sigma_is_temperature_invariant_and_ignores_masked_logits():
    torch.manual_seed(1)
    z = torch.randn(2, 40)
    p = TopNSigmaLogitsProcessor(1.0)
    assert torch.equal(torch.isfinite(p(None, z)), torch.isfinite(p(None, z / 0.3)))
    masked = z.clone()
    masked[:, 20:] = float("-inf")
    expected = torch.isfinite(p(None, z[:, :20]))
    assert torch.equal(torch.isfinite(p(None, masked))[:, :20], expected)


def test_top_n_sigma_bad_parameter():
    with pytest.raises(ValueError, match="n must be"):
        TopNSigmaLogitsProcessor(-1)


# ---------------------------------------------------------------------------- inside generate
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, eos_token_id=None,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def test_processors_inside_generate(tiny):
    inputs = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    greedy = tiny.generate(input_ids=inputs, attention_mask=mask, do_sample=False, max_new_tokens=30)
    procs = LogitsProcessorList([DRYLogitsProcessor(multiplier=5.0, base=2.0, allowed_length=2)])
    dry = tiny.generate(input_ids=inputs, attention_mask=mask, do_sample=False, max_new_tokens=30,
                        logits_processor=procs, output_scores=True, return_dict_in_generate=True)
    assert dry.sequences.shape == greedy.shape
    # each greedy DRY step is the argmax of the DRY-processed logits
    for t, s in enumerate(dry.scores):
        assert torch.equal(s.argmax(-1), dry.sequences[:, inputs.shape[1] + t])
    # the tiny random model loops under greedy; a strong DRY penalty changes the text
    assert not torch.equal(dry.sequences, greedy)
    torch.manual_seed(0)
    out = tiny.generate(input_ids=inputs, attention_mask=mask, do_sample=True, max_new_tokens=10,
                        logits_processor=LogitsProcessorList([TopNSigmaLogitsProcessor(1.0),
                                                              XTCLogitsProcessor(0.1, 0.5, seed=0)]),
                        output_scores=True, return_dict_in_generate=True)
    for t, s in enumerate(out.scores):
        chosen = out.sequences[:, inputs.shape[1] + t]
        assert torch.isfinite(s.gather(-1, chosen[:, None])).all()
