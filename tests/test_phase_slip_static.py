"""Phase-Slip with a static cache (``cache_implementation="static"``) and a compiled step.

A static cache writes in place, so the perturbed rows get copies of the entries they read (``kv.write_slots``);
the clean cache must stay exactly what plain decoding leaves, and a compiled step must give the eager tokens.
"""
import pytest
import torch
from transformers import CompileConfig, MistralConfig, MistralForCausalLM

from phaselm.sampling import CUSTOM_GENERATE_DIR, PhaseSlipSampler, PhaseSlipStep, Sampler, phase_slip_generate
from tests.conftest import make_model

PROMPTS = ["the ancient door creaked open and", "a king"]
BASE = dict(max_new_tokens=12, do_sample=True, temperature=0.9, pad_token_id=0)
STRONG = dict(noise_scale=2.5, heads=[(1, 0), (2, 0), (3, 1)], logit_fusion_alpha=0.0, entropy_center=-10.0,
              perturbation_window=3)
LOGITS = dict(return_dict_in_generate=True, output_logits=True)


def _sliding_mistral():
    """A tiny Mistral with a 5-token sliding window: its static cache rolls (``StaticSlidingWindowLayer``)."""
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64, max_position_embeddings=128, eos_token_id=1, pad_token_id=0, bos_token_id=1,
        sliding_window=5))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


MODELS = {"llama": lambda: make_model("llama"), "sliding-mistral": _sliding_mistral}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return MODELS[request.param]()


def _enc(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert (enc["attention_mask"] == 0).any()
    return enc


def _run(fn, seed=3, **kw):
    torch.manual_seed(seed)
    return fn(**kw)


@pytest.mark.parametrize("form", ["function", "folder"])
def test_noise_zero_static_equals_model_generate_static(model, tokenizer, form):
    enc = _enc(tokenizer)
    plain = _run(model.generate, **enc, **BASE, cache_implementation="static")
    call = phase_slip_generate if form == "function" else \
        lambda m, **kw: m.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, **kw)
    ours = _run(lambda **kw: call(model, **kw), **enc, **BASE, cache_implementation="static", noise_scale=0.0,
                heads=[(2, 0), (3, 1)])
    assert torch.equal(ours, plain)


def test_static_clean_logits_equal_a_full_forward_and_static_equals_dynamic(model, tokenizer, monkeypatch):
    """With a strong rotation: each step's clean logits (row group 0) equal a full forward of the sequence so
    far (the perturbed rows never write the static cache), and static and dynamic Phase-Slip agree."""
    enc = _enc(tokenizer)
    clean = []
    original = PhaseSlipStep.__call__

    def spy(self, run_forward, batch, diagnostics=None, plausible=None):
        def run():
            out = run_forward()
            clean.append(out.logits[:batch, -1].float())
            return out
        return original(self, run, batch, diagnostics, plausible)

    monkeypatch.setattr(PhaseSlipStep, "__call__", spy)
    static = _run(phase_slip_generate, model=model, **enc, **BASE, **STRONG, **LOGITS, cache_implementation="static")
    monkeypatch.setattr(PhaseSlipStep, "__call__", original)
    dynamic = _run(phase_slip_generate, model=model, **enc, **BASE, **STRONG, **LOGITS)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits):
        assert torch.allclose(a, b, atol=1e-5)
    width = enc["input_ids"].shape[1]
    seq = static.sequences
    mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), seq.shape[1] - width, dtype=torch.long)], -1)
    with torch.no_grad():
        full = model(seq, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
    assert len(clean) == BASE["max_new_tokens"]
    for t, z in enumerate(clean):
        assert torch.allclose(z, full[:, width - 1 + t], atol=1e-4)
    assert (static.logits[0] - clean[0]).abs().max() > 1e-2  # the rotation really moved the fused logits


def test_sampler_with_a_static_cache_equals_the_dynamic_one(tokenizer):
    model = make_model("llama")
    kw = dict(max_new_tokens=10, temperature=0.9, seed=5, stop_at_eos=False, return_details=True)
    plain = Sampler(model, tokenizer).generate(PROMPTS, **kw)
    assert Sampler(model, tokenizer, cache_implementation="static").generate(PROMPTS, **kw).token_ids == plain.token_ids
    settings = dict(noise_scale=2.5, heads=[(1, 0), (3, 1)], logit_fusion_alpha=0.0, entropy_center=-10.0)
    dynamic = PhaseSlipSampler(model, tokenizer, **settings).generate(PROMPTS, **kw)
    static = PhaseSlipSampler(model, tokenizer, **settings, cache_implementation="static").generate(PROMPTS, **kw)
    assert static.token_ids == dynamic.token_ids
    assert torch.allclose(static.diagnostics["kl"], dynamic.diagnostics["kl"], atol=1e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(cache_implementation="quantized", cache_config={"backend": "fp8"}), "cannot copy layer 0"),
    (dict(cache_implementation="offloaded"), "offloaded cache"),
])
def test_caches_phase_slip_cannot_copy_are_refused_in_one_line(tokenizer, kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        phase_slip_generate(make_model("llama"), **_enc(tokenizer), **BASE, heads=[(2, 0)], **kwargs)
    assert "\n" not in str(err.value)


def test_compiled_static_step_gives_the_eager_tokens(tokenizer):
    """The compiled decoding step (transformers' ``get_compiled_call``, where ``generate`` would compile it)
    gives the eager step's tokens; a 2-layer model keeps the compile short."""
    model = make_model("llama", layers=2)
    compile_config = CompileConfig(fullgraph=False)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only unless told
    kw = dict(**_enc(tokenizer), **BASE, **STRONG, **LOGITS, cache_implementation="static")
    kw["heads"], kw["max_new_tokens"] = [(1, 0), (1, 1)], 6
    eager = _run(phase_slip_generate, model=model, **kw)
    compiled = _run(phase_slip_generate, model=model, **kw, compile_config=compile_config)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits):
        assert torch.allclose(a, b, atol=1e-4)
