"""Bad input to the sampler and the loader: each case is one line naming the problem, raised before
any model is loaded or any token generated ("Sampler and loader").

Each case: (id, what to call, expected exception, words the message must contain).
"""
import math

import numpy as np
import pytest
import torch

from phaselm import ModelLoadError, PhaseSlipSampler, Sampler, load_causal_lm
from phaselm.sampling import PhaseSlipStep, calibrate_heads, phase_slip_generate
from tests.conftest import make_model, make_tokenizer

TOK = make_tokenizer()
TEXT = "the king said the sea was dark and the ship came to the town"


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


def _roformer():
    from transformers import RoFormerConfig, RoFormerForCausalLM

    return RoFormerForCausalLM(RoFormerConfig(vocab_size=64, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64))


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


def _generate(build=lambda: make_model("llama"), **kw):
    def call(tmp):
        enc = TOK(["the king"], return_tensors="pt")
        return phase_slip_generate(build(), **enc, max_new_tokens=2, pad_token_id=0, **kw)

    return call


def sample(prompt="the king", sampler=Sampler, **kw):
    """``sampler(tiny llama).generate(prompt, **kw)``; a PhaseSlipSampler without heads would calibrate
    first, so an argument error must come before that (the calibration is made to fail loudly)."""
    def call(tmp):
        s = sampler(make_model("llama"), TOK)
        s.calibrate_heads = lambda *a, **k: pytest.fail("calibrated before checking the arguments")
        return s.generate(prompt, max_new_tokens=kw.pop("max_new_tokens", 2), **kw)

    return call


def calibrate(build=lambda: make_model("llama"), **kw):
    return lambda tmp: calibrate_heads(build(), TOK, text=kw.pop("text", TEXT), **kw)


def _tiny(model_type, **extra):
    """A tiny random model of a transformers architecture (only the sizes that matter set)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _bigcode():
    return _tiny("gpt_bigcode", n_embd=32, n_layer=2, n_head=4, n_positions=128)


def _deepseek():
    return _tiny("deepseek_v3", num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                 qk_nope_head_dim=4, v_head_dim=8, head_dim=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                 topk_group=1, moe_intermediate_size=32)


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
    ("generate without heads or a tokenizer", _generate(), ValueError, "needs heads"),
    ("generate num_beams", _generate(heads=[(2, 0)], num_beams=2), ValueError, "beam search"),
    ("generate contrastive search", _generate(heads=[(2, 0)], penalty_alpha=0.5, top_k=4), ValueError,
     "contrastive search"),
    ("generate num_beams before calibrating", _generate(num_beams=2, tokenizer=TOK), ValueError, "sampling and greedy"),
    ("generate rotation_seed too large", _generate(heads=[(2, 0)], rotation_seed=2**64), ValueError, "rotation_seed"),
    ("generate rotation_seed float", _generate(heads=[(2, 0)], rotation_seed=1.5), ValueError, "rotation_seed"),
    ("generate on latent attention", _generate(_deepseek, heads=[(1, 0)]), ValueError, "latent attention"),
    ("generate on GPTBigCode", _generate(_bigcode, heads=[(1, 0)]), ValueError, "GPTBigCode"),
    ("generate noise above pi", _generate(heads=[(2, 0)], noise_scale=3.5), ValueError, "noise_scale"),
    ("generate without cache", _generate(heads=[(2, 0)], use_cache=False), ValueError, "cache"),
    ("generate offloaded cache", _generate(heads=[(2, 0)], cache_implementation="offloaded"), ValueError, "offloaded cache"),
    ("generate rotation_seed list", _generate(heads=[(2, 0)], rotation_seed=[1, 2, 3]), ValueError, "rotation_seed"),
    ("generate kv head out of range", _generate(heads=[(2, 7)]), ValueError, "out of range"),
    # generate's request: checked before calibrating or generating
    ("prompt None", sample(None), ValueError, "string or a list of strings"),
    ("prompt number in a list", sample(["the king", 3]), ValueError, "prompt 1 is not a string (got int)"),
    ("temperature inf", sample(temperature=math.inf), ValueError, "temperature"),
    ("temperature nan", sample(temperature=math.nan), ValueError, "temperature"),
    ("temperature string", sample(temperature="0.7"), ValueError, "temperature"),
    ("top_k float", sample(top_k=2.5), ValueError, "top_k"),
    ("top_k bool", sample(top_k=True), ValueError, "top_k"),
    ("top_p nan", sample(top_p=math.nan), ValueError, "top_p"),
    ("min_p string", sample(min_p="0.1"), ValueError, "min_p"),
    ("do_sample string", sample(do_sample="no"), ValueError, "do_sample"),
    ("max_new_tokens True", sample(max_new_tokens=True), ValueError, "max_new_tokens"),
    ("max_new_tokens float", sample(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    ("max_new_tokens beyond the context", sample(max_new_tokens=100000), ValueError, "max_new_tokens <= "),
    ("seed float", sample(seed=1.5), ValueError, "seed must be an integer"),
    ("seed 2**64", sample(seed=2**64), ValueError, "seed must be an integer in [0, 2**63 - 1]"),
    ("seed negative", sample(seed=-1), ValueError, "seed must be an integer"),
    ("seed string", sample(seed="abc"), ValueError, "seed must be an integer"),
    ("seed list with a float", sample(["a", "b"], seed=[1, 2.5]), ValueError, "seed must be an integer"),
    ("seed bool", sample(seed=True), ValueError, "seed"),
    ("phase-slip temperature inf before calibrating", sample(sampler=PhaseSlipSampler, temperature=math.inf),
     ValueError, "temperature"),
    ("phase-slip too long before calibrating", sample(sampler=PhaseSlipSampler, max_new_tokens=100000), ValueError,
     "context"),
    ("phase-slip seed string before calibrating", sample(sampler=PhaseSlipSampler, seed="abc"), ValueError, "seed"),
    ("tokenizer None", lambda tmp: PhaseSlipSampler(make_model("llama"), None), ValueError, "tokenizer"),
    # the plain sampler refuses what is not a decoder-only causal LM, as Phase-Slip does
    ("plain sampler on a masked LM", lambda tmp: Sampler(_bert("BertForMaskedLM")(), TOK), ValueError,
     "not a causal LM"),
    ("plain sampler on an encoder without is_decoder", lambda tmp: Sampler(_bert("BertLMHeadModel")(), TOK),
     ValueError, "is_decoder"),
    ("plain sampler on an encoder-decoder", lambda tmp: Sampler(_t5(), TOK), ValueError, "encoder-decoder"),
    ("RoFormer without is_decoder", lambda tmp: Sampler(_roformer(), TOK), ValueError, "is_decoder"),
    # head calibration: the same refusals as generating, and its own arguments
    ("calibrate GPTBigCode", calibrate(_bigcode), ValueError, "GPTBigCode"),
    ("calibrate latent attention", calibrate(_deepseek), ValueError, "latent attention"),
    ("calibrate a state-space model", calibrate(_mamba), ValueError, "no attention layers"),
    ("calibrate search_layers above the layers", calibrate(search_layers=5), ValueError, "search_layers"),
    ("calibrate search_layers float", calibrate(search_layers=2.5), ValueError, "search_layers"),
    ("calibrate num_heads above the heads", calibrate(search_layers=1, num_heads=3), ValueError, "num_heads <= 2"),
    ("calibrate num_heads zero", calibrate(num_heads=0), ValueError, "num_heads"),
    ("calibrate seed float", calibrate(seed=0.5), ValueError, "seed"),
    ("calibrate angle above pi", calibrate(angle=4.0), ValueError, "angle"),
    ("calibrate empty text", calibrate(text="  "), ValueError, "empty"),
    ("calibrate exclude_fraction 1", calibrate(exclude_fraction=1.0), ValueError, "exclude_fraction"),
    # the loader: damaged files and devices, before any model loads
    ("empty model name", lambda tmp: load_causal_lm(""), ModelLoadError, "model name is empty"),
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


def test_one_layer_model_calibrates_automatically_without_arguments():
    """Automatic calibration never complains about a num_heads or search_layers the user did not pass."""
    sampler = PhaseSlipSampler(make_model("llama", layers=1), TOK, noise_scale=0.5)
    assert isinstance(sampler.generate("the king", max_new_tokens=2, seed=0), str)
    assert sampler.heads == [(0, 0), (0, 1)]


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_state_space_models_decode_through_the_plain_sampler_like_a_full_forward(arch):
    """Mamba / Mamba-2 take their cache as cache_params: the Sampler passes it there, so greedy tokens of a
    left-padded batch equal recomputing each prompt from scratch (they differed silently before)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    model = _mamba() if arch == "mamba" else Mamba2ForCausalLM(Mamba2Config(
        vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=1,
        chunk_size=8, pad_token_id=0, eos_token_id=1, bos_token_id=1))
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    prompts = ["the ancient door creaked open and", "a king"]
    out = Sampler(model, TOK).generate(prompts, max_new_tokens=6, do_sample=False, stop_at_eos=False,
                                       return_details=True)
    for prompt, got in zip(prompts, out.token_ids):
        seq = TOK(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert got == seq[0, -6:].tolist()


@pytest.mark.parametrize("extra", [[], ["--input-file"]])
def test_cli_request_beyond_the_context_is_refused_before_calibrating(tiny_folder, tmp_path, capsys, monkeypatch, extra):
    """`phaselm generate ... --max-new-tokens 100000` is refused from the arguments and the model's context,
    before the heads are calibrated (it took 22 s of calibration before)."""
    from phaselm_cli import main

    monkeypatch.setattr(PhaseSlipSampler, "calibrate_heads", lambda *a, **k: pytest.fail("calibrated first"))
    prompt = ["the king"]
    if extra:
        (tmp_path / "prompts.txt").write_text("the king\na dark sea\n")
        prompt = ["--input-file", str(tmp_path / "prompts.txt")]
    code = main(["generate", *prompt, "--model", str(tiny_folder), "--sampler", "phase-slip",
                 "--max-new-tokens", "100000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "max_new_tokens <= " in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_cli_seed_out_of_range_is_refused_before_loading(capsys, seed):
    from phaselm_cli import main

    assert main(["generate", "the king", "--model", "/no/such/folder", "--seed", seed]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seed must be an integer in [0, 2**63 - 1]" in err and len(err.splitlines()) == 1, err
