"""Bad input to the sampler and the loader: each case is one line naming the problem, raised before
any model is loaded or any token generated ("Sampler and loader").

Each case: (id, what to call, expected exception, words the message must contain).
"""
import math

import numpy as np
import pytest
import torch

from phaselm import ModelLoadError, PhaseSlipSampler, load_causal_lm
from phaselm.sampling import PhaseSlipStep, phase_slip_generate
from tests.conftest import make_model, make_tokenizer

TOK = make_tokenizer()


def sampler(**kw):
    return lambda tmp: PhaseSlipSampler(make_model("llama"), TOK, **kw)


def model_object(build):
    return lambda tmp: PhaseSlipSampler(build(), TOK, heads=[(0, 0)])


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))


def _bert(cls_name, **extra):
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, **extra)
    return lambda: getattr(transformers, cls_name)(cfg)


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2))


def _saved(tmp, model=None):
    folder = tmp / "model"
    (model or make_model("llama")).save_pretrained(folder)
    TOK.save_pretrained(folder)
    return folder


def _damaged_weights(tmp, how):
    folder = _saved(tmp)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)
    return load_causal_lm(folder)


def _bad_config(tmp):
    folder = _saved(tmp)
    (folder / "config.json").write_text("{ not json")
    return load_causal_lm(folder)


def _bad_gguf(tmp, content):
    path = tmp / "broken.gguf"
    path.write_bytes(content)
    return load_causal_lm(path)


def _generate(**kw):
    def call(tmp):
        enc = TOK(["the king"], return_tensors="pt")
        return phase_slip_generate(make_model("llama"), **enc, max_new_tokens=2, pad_token_id=0, **kw)

    return call


CASES = [
    # noise_scale: a rotation angle in [0, π]
    ("noise inf", sampler(noise_scale=math.inf), ValueError, "noise_scale"),
    ("noise nan", sampler(noise_scale=math.nan), ValueError, "noise_scale"),
    ("noise above pi", sampler(noise_scale=4.0), ValueError, "[0, π]"),
    ("noise negative", sampler(noise_scale=-0.1), ValueError, "noise_scale"),
    ("noise string", sampler(noise_scale="0.1"), ValueError, "real number"),
    ("noise numpy array", sampler(noise_scale=np.array([0.1, 0.2])), ValueError, "array of shape (2,)"),
    ("noise bool", sampler(noise_scale=True), ValueError, "noise_scale"),
    # heads: a list of (layer, kv_head) integer pairs in attention layers
    ("heads one pair not in a list", sampler(heads=(2, 0)), ValueError, "list of (layer, kv_head)"),
    ("heads short tuple", sampler(heads=[(2,)]), ValueError, "pairs"),
    ("heads float layer", sampler(heads=[(2.5, 0)]), ValueError, "integer pairs"),
    ("heads string", sampler(heads="2,0"), ValueError, "heads"),
    ("heads layer out of range", sampler(heads=[(9, 0)]), ValueError, "out of range"),
    ("heads negative layer", sampler(heads=[(-1, 0)]), ValueError, "out of range"),
    ("heads kv head out of range", sampler(heads=[(2, 5)]), ValueError, "kv heads 0..1"),
    ("heads empty", sampler(heads=[]), ValueError, "empty"),
    ("heads number", sampler(heads=3), ValueError, "heads"),
    # the gate
    ("entropy_center nan", sampler(entropy_center=math.nan), ValueError, "entropy_center"),
    ("entropy_center inf", sampler(entropy_center=-math.inf), ValueError, "entropy_center"),
    ("entropy_center None", sampler(entropy_center=None), ValueError, "entropy_center"),
    ("alpha nan", sampler(logit_fusion_alpha=math.nan), ValueError, "logit_fusion_alpha"),
    ("alpha above 1", sampler(logit_fusion_alpha=1.5), ValueError, "logit_fusion_alpha"),
    ("window zero", sampler(perturbation_window=0), ValueError, "perturbation_window"),
    ("window float", sampler(perturbation_window=2.5), ValueError, "perturbation_window"),
    ("window bool", sampler(perturbation_window=True), ValueError, "perturbation_window"),
    ("fusion unknown", sampler(fusion="blend"), ValueError, "fusion"),
    # model objects that are not decoder-only causal LMs
    ("encoder-decoder object", model_object(_t5), ValueError, "encoder-decoder"),
    ("masked-LM object", model_object(_bert("BertForMaskedLM")), ValueError, "not a causal LM"),
    ("encoder as causal LM without is_decoder", model_object(_bert("BertLMHeadModel")), ValueError, "is_decoder"),
    ("state-space model object", model_object(_mamba), ValueError, "no attention layers"),
    ("not a model", model_object(lambda: torch.nn.Linear(4, 4)), ValueError, "not a transformers model"),
    ("a name instead of a model", model_object(lambda: "gpt2"), ValueError, "not a transformers model"),
    ("step on an encoder-decoder", lambda tmp: PhaseSlipStep(_t5()), ValueError, "encoder-decoder"),
    # Phase-Slip inside model.generate
    ("generate without heads", _generate(), ValueError, "needs heads"),
    ("generate noise above pi", _generate(heads=[(2, 0)], noise_scale=3.5), ValueError, "noise_scale"),
    ("generate without cache", _generate(heads=[(2, 0)], use_cache=False), ValueError, "cache"),
    ("generate static cache", _generate(heads=[(2, 0)], cache_implementation="static"), ValueError, "dynamic cache"),
    ("generate rotation_seed list", _generate(heads=[(2, 0)], rotation_seed=[1, 2, 3]), ValueError, "rotation_seed"),
    ("generate kv head out of range", _generate(heads=[(2, 7)]), ValueError, "out of range"),
    # the loader: damaged files and devices, before any model loads
    ("truncated safetensors", lambda tmp: _damaged_weights(tmp, "truncated"), ModelLoadError, "damaged"),
    ("garbage safetensors", lambda tmp: _damaged_weights(tmp, "garbage"), ModelLoadError, "damaged"),
    ("config not json", _bad_config, ModelLoadError, "could not load"),
    ("garbage gguf", lambda tmp: _bad_gguf(tmp, b"GGUF" + b"\xff" * 200), ModelLoadError, "GGUF"),
    ("empty gguf", lambda tmp: _bad_gguf(tmp, b""), ModelLoadError, "GGUF"),
    ("text file named gguf", lambda tmp: _bad_gguf(tmp, b"hello world\n" * 10), ModelLoadError, "GGUF"),
    ("device foo", lambda tmp: load_causal_lm("/no/such/folder", device="foo"), ModelLoadError, "device 'foo'"),
    ("device cuda index", lambda tmp: load_causal_lm("/no/such/folder", device="cuda:7"), ModelLoadError, "cuda:7"),
    ("device number", lambda tmp: load_causal_lm("/no/such/folder", device=3.5), ModelLoadError, "device"),
    ("saved encoder-decoder", lambda tmp: load_causal_lm(_saved(tmp, _t5())), ModelLoadError, "causal"),
    ("saved masked LM", lambda tmp: load_causal_lm(_saved(tmp, _bert("BertForMaskedLM")())), ModelLoadError, "causal"),
]


@pytest.mark.parametrize("case, call, error, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(tmp_path, case, call, error, words):
    with pytest.raises(error) as err:
        call(tmp_path)
    message = str(err.value)
    assert words in message, message
    assert "\n" not in message and len(message) < 400, message


def test_cli_device_foo_is_exit_2_before_loading(capsys):
    from phaselm_cli import main

    assert main(["generate", "the king", "--model", "/no/such/folder", "--device", "foo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "device 'foo'" in err and len(err.splitlines()) == 1


def test_numpy_scalars_are_numbers():
    """NumPy scalars are accepted wherever a number is (only arrays and non-numbers are refused)."""
    model = make_model("llama")
    s = PhaseSlipSampler(model, TOK, noise_scale=np.float32(0.5), logit_fusion_alpha=np.float64(0.3),
                         perturbation_window=np.int64(4), entropy_center=np.float32(2.0),
                         heads=[(np.int64(2), np.int32(0))])
    assert (s.noise_scale, s.window, s.heads) == (0.5, 4, [(2, 0)])
    assert isinstance(s.generate("the king", max_new_tokens=3, seed=0), str)
