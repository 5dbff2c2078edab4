"""Phase-Slip inside ``model.generate``: the folder, the callable and ``phase_slip_generate``.

The reference is transformers' own sampling loop: with ``noise_scale=0`` Phase-Slip's fused logits are
the clean logits, so every generate feature must give exactly the tokens of ``model.generate``.
"""
import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from phaselm.sampling import (
    CUSTOM_GENERATE_DIR, PhaseSlipSampler, PhaseSlipStep, phase_slip_decode, phase_slip_generate,
)
from tests.conftest import make_model

PROMPTS = ["the ancient door creaked open and", "a king"]
HEADS = [(2, 0), (3, 1)]
BASE = dict(max_new_tokens=12, do_sample=True, temperature=0.9, pad_token_id=0)


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


def _enc(tokenizer, prompts=PROMPTS):
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


def _run(fn, seed=3, **kw):
    torch.manual_seed(seed)
    return fn(**kw)


FORMS = {
    "function": lambda m, **kw: phase_slip_generate(m, **kw),
    "callable": lambda m, **kw: m.generate(custom_generate=phase_slip_decode, **kw),
    "folder": lambda m, **kw: m.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, **kw),
}


@pytest.mark.parametrize("form", FORMS)
def test_noise_zero_equals_model_generate_sampling_for_a_left_padded_batch(arch_model, tokenizer, form):
    enc = _enc(tokenizer)
    plain = _run(arch_model.generate, **enc, **BASE)
    heads = [(2, 0), (3, 0)]
    ours = _run(lambda **kw: FORMS[form](arch_model, **kw), **enc, **BASE, noise_scale=0.0, heads=heads)
    assert torch.equal(ours, plain)
    assert (enc["attention_mask"] == 0).any()  # the batch really is left-padded
    logits = dict(return_dict_in_generate=True, output_logits=True)
    clean = _run(lambda **kw: FORMS[form](arch_model, **kw), **enc, **BASE, **logits, noise_scale=0.0, heads=heads)
    strong = _run(lambda **kw: FORMS[form](arch_model, **kw), **enc, **BASE, **logits, noise_scale=2.5,
                  heads=[(1, 0), (2, 0), (3, 0)], logit_fusion_alpha=0.0, entropy_center=-10.0)
    assert (strong.logits[0] - clean.logits[0]).abs().max() > 1e-2  # a real rotation changes the logits


FEATURES = {
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.3),
    "min_p": dict(min_p=0.3),
    "temperature": dict(temperature=0.2),
    "repetition_penalty": dict(repetition_penalty=5.0),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
    "bad_words_ids": dict(bad_words_ids=[[t] for t in range(3, 40)]),
    "eos_token_id": dict(eos_token_id=[t for t in range(3, 64) if t % 3 == 0]),
    "max_new_tokens": dict(max_new_tokens=3),
    "greedy": dict(do_sample=False),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_each_generate_feature_acts_as_in_plain_generate(llama, tokenizer, feature):
    enc = _enc(tokenizer)
    kw = {**BASE, **FEATURES[feature]}
    baseline = _run(llama.generate, **enc, **BASE)
    plain = _run(llama.generate, **enc, **kw)
    ours = _run(lambda **k: phase_slip_generate(llama, **k), **enc, **kw, noise_scale=0.0, heads=HEADS)
    assert not torch.equal(plain, baseline), "the feature must change plain generate's output"
    assert torch.equal(ours, plain)
    if feature == "eos_token_id":  # finished rows are padded, as in plain generate
        assert (ours[:, enc["input_ids"].shape[1]:] == 0).any()


def test_custom_stopping_criteria_and_streamer(llama, tokenizer):
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    enc = _enc(tokenizer, PROMPTS[:1])
    stop = StopAfter()
    stop.length = enc["input_ids"].shape[1] + 5
    streams = []
    outs = []
    for fn in (llama.generate, lambda **k: phase_slip_generate(llama, noise_scale=0.0, heads=HEADS, **k),
               lambda **k: llama.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True,
                                          noise_scale=0.0, heads=HEADS, **k)):
        streamer = Collect()
        outs.append(_run(fn, **enc, **BASE, stopping_criteria=StoppingCriteriaList([stop]), streamer=streamer))
        streams.append(streamer)
    assert outs[0].shape[1] == stop.length
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert streams[1].puts == streams[0].puts == streams[2].puts and len(streams[0].puts) == 1 + 5
    assert all(s.ended for s in streams)


def test_return_dict_scores_logits_and_the_clean_cache(llama, tokenizer):
    enc = _enc(tokenizer)
    kw = dict(**BASE, top_k=10, return_dict_in_generate=True, output_scores=True, output_logits=True)
    plain = _run(llama.generate, **enc, **kw)
    ours = _run(lambda **k: phase_slip_generate(llama, **k), **enc, **kw, noise_scale=0.0, heads=HEADS)
    assert torch.equal(ours.sequences, plain.sequences)
    assert len(ours.scores) == len(ours.logits) == len(plain.scores) == 12
    for a, b in zip(ours.scores, plain.scores):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        assert torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)], atol=1e-5)
    for a, b in zip(ours.logits, plain.logits):
        assert torch.allclose(a, b, atol=1e-5)
    # the cache Phase-Slip hands back is the clean cache: equal to plain generate's
    for lo, lp in zip(ours.past_key_values.layers, plain.past_key_values.layers):
        assert torch.allclose(lo.keys, lp.keys, atol=1e-5) and torch.allclose(lo.values, lp.values, atol=1e-5)
    strong = _run(lambda **k: phase_slip_generate(llama, **k), **enc, **kw, noise_scale=2.0, heads=HEADS,
                  logit_fusion_alpha=0.0, entropy_center=-10.0)
    assert not torch.allclose(strong.logits[0], plain.logits[0], atol=1e-3)  # fused logits really are reported


def test_settings_from_the_generation_config_and_the_short_path_share_the_step(llama, tokenizer, monkeypatch):
    enc = _enc(tokenizer, PROMPTS[:1])
    phase = dict(noise_scale=1.5, heads=HEADS, logit_fusion_alpha=0.1, entropy_center=-2.0, rotation_seed=11)
    by_kwargs = _run(lambda **k: phase_slip_generate(llama, **k), **enc, **BASE, **phase)
    config = GenerationConfig(**BASE, **phase)
    by_config = _run(lambda **k: phase_slip_generate(llama, **k), **enc, generation_config=config)
    assert torch.equal(by_kwargs, by_config)
    # the short path computes the same fused logits with the same rotation stream (seed 11)
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    inside = phase_slip_generate(llama, **enc, **kw, **phase)
    captured = []
    step_call = PhaseSlipStep.__call__
    monkeypatch.setattr(PhaseSlipStep, "__call__", lambda self, *a, **k: captured.append(step_call(self, *a, **k))
                        or captured[-1])
    short = PhaseSlipSampler(llama, tokenizer, noise_scale=1.5, heads=HEADS, logit_fusion_alpha=0.1, entropy_center=-2.0)
    short.generate(PROMPTS[0], max_new_tokens=1, do_sample=False, seed=11)
    assert len(captured) == 1 and torch.allclose(captured[0], inside.logits[0], atol=1e-5)


def test_plausible_only_keeps_noise_zero_exact_and_restricts_draws(llama, tokenizer):
    enc = _enc(tokenizer)
    kw = {**BASE, "top_k": 5}
    plain = _run(llama.generate, **enc, **kw)
    ours = _run(lambda **k: phase_slip_generate(llama, **k), **enc, **kw, noise_scale=0.0, heads=HEADS,
                plausible_only=True)
    assert torch.equal(ours, plain)
    out = _run(lambda **k: phase_slip_generate(llama, **k), **enc, **kw, noise_scale=2.5, heads=HEADS,
               plausible_only=True, logit_fusion_alpha=0.0, entropy_center=-10.0, return_dict_in_generate=True,
               output_logits=True)
    for z in out.logits:  # only the clean pass's top-5 tokens are ever drawable
        assert int(torch.isfinite(z).sum(-1).max()) <= 5


@pytest.mark.parametrize("kwargs, words", [
    (dict(heads=None), "needs heads"),  # no heads, and no tokenizer to calibrate them with
    (dict(heads=HEADS, noise_scale=4.0), "noise_scale"),
    (dict(heads=HEADS, use_cache=False), "cache"),
    (dict(heads=HEADS, cache_implementation="offloaded"), "offloaded cache"),
    (dict(heads=HEADS, rotation_seed="x"), "rotation_seed"),
])
def test_bad_generate_settings_are_one_line_errors(llama, tokenizer, kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        phase_slip_generate(llama, **_enc(tokenizer), **BASE, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, mode", [
    (dict(num_beams=2), "beam sample"),
    (dict(num_beams=2, do_sample=False), "beam search"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, do_sample=False), "beam search"),
    (dict(penalty_alpha=0.6, top_k=4, do_sample=False), "contrastive search"),
    (dict(prompt_lookup_num_tokens=3), "assisted generation"),
    (dict(dola_layers="high", do_sample=False), "dola generation"),
])
@pytest.mark.parametrize("form", ["function", "folder"])
def test_generation_modes_phase_slip_does_not_implement_are_refused(llama, tokenizer, kwargs, mode, form):
    """Beam search & co. through the custom loop would silently sample rows independently: refused."""
    with pytest.raises(ValueError) as err:
        FORMS[form](llama, **_enc(tokenizer), **{**BASE, **kwargs}, noise_scale=0.5, heads=HEADS)
    message = str(err.value)
    assert "sampling and greedy decoding only" in message and mode in message and "\n" not in message


def test_assistant_model_is_refused(llama, tokenizer):
    with pytest.raises(ValueError, match="assisted generation") as err:
        phase_slip_generate(llama, **_enc(tokenizer), **BASE, heads=HEADS, assistant_model=make_model("llama", seed=1))
    assert "\n" not in str(err.value)


def test_generate_without_heads_calibrates_once_per_model_like_the_sampler(tokenizer, caplog):
    """No heads: both paths run the same automatic calibration (cached per model, logged), so they take
    the same arguments and give the same tokens."""
    import logging

    from phaselm.sampling.calibration import automatic_heads

    model = make_model("llama", seed=4)
    enc = _enc(tokenizer)
    with caplog.at_level(logging.INFO, logger="phaselm"):
        auto = _run(lambda **k: phase_slip_generate(model, **k), **enc, **BASE, noise_scale=0.5, tokenizer=tokenizer)
    assert sum("calibrating" in r.getMessage() for r in caplog.records) == 1
    heads = automatic_heads(model, tokenizer).selected  # cached: no second calibration
    explicit = _run(lambda **k: phase_slip_generate(model, **k), **enc, **BASE, noise_scale=0.5, heads=heads)
    assert torch.equal(auto, explicit)
    sampler = PhaseSlipSampler(model, tokenizer, noise_scale=0.5)
    sampler.generate(PROMPTS[0], max_new_tokens=1)
    assert sampler.heads == heads and sum("calibrating" in r.getMessage() for r in caplog.records) == 1


def test_the_folder_form_without_heads_finds_the_models_own_tokenizer(tiny_folder, tokenizer):
    """The issue's call: model.generate(custom_generate=CUSTOM_GENERATE_DIR, noise_scale=0.5), no heads, no
    tokenizer: a model loaded from a folder calibrates with the tokenizer saved beside it."""
    from transformers import AutoModelForCausalLM

    from phaselm.sampling.calibration import calibrate_heads

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    enc = _enc(tokenizer)
    out = _run(lambda **k: model.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, **k),
               **enc, **BASE, noise_scale=0.5)
    heads = calibrate_heads(model, tokenizer).selected
    assert torch.equal(out, _run(lambda **k: phase_slip_generate(model, **k), **enc, **BASE, noise_scale=0.5,
                                 heads=heads))
