"""Model loading errors, the CLI's one-line errors, and end-to-end runs on the embedded model."""
import subprocess
import sys

import pytest

from phaselm import ModelLoadError, PhaseSlipSampler, Sampler, load_causal_lm
from phaselm_cli import main
from tests.conftest import make_model, make_tokenizer


@pytest.fixture
def tiny_folder(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_local_folder_loads_and_generates(tiny_folder):
    model, tok = load_causal_lm(tiny_folder)
    assert not model.training
    out = PhaseSlipSampler(model, tok, heads=[(3, 0)]).generate("the king", max_new_tokens=4, seed=0)
    assert isinstance(out, str)


def test_unreachable_hub_name_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder") as err:
        load_causal_lm("no-such-org/no-such-model-xyz")
    assert "\n" not in str(err.value)


def test_missing_gguf_and_encoder_only_models_are_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_causal_lm(tmp_path / "missing.gguf")
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="causal|cache|decoder"):
        load_causal_lm(folder)


def test_cli_bad_input_prints_one_line_and_exits_2(tiny_folder, capsys):
    cases = [
        ["generate", "", "--model", str(tiny_folder)],
        ["generate", "the king", "--model", str(tiny_folder), "--top-p", "1.5"],
        ["generate", "the king", "--model", str(tiny_folder), "--noise-scale", "-1"],
        ["generate", "the king", "--model", str(tiny_folder), "--window", "0"],
        ["generate", "the king", "--model", str(tiny_folder), "--sampler", "standard", "--temperature", "0"],
        ["calibrate", "--model", str(tiny_folder), "--search-layers", "99"],
        ["generate", "the king", "--model", "/no/such/folder.gguf"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("phaselm ") and "error:" in err[0], (argv, err)


def test_cli_generate_and_calibrate_on_a_local_model(tiny_folder, capsys):
    assert main(["generate", "the king", "--model", str(tiny_folder), "--max-new-tokens", "5",
                 "--search-layers", "2", "--num-heads", "1", "--diagnostics"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["calibrate", "--model", str(tiny_folder), "--search-layers", "2"]) == 0
    assert "selected (layer, kv_head)" in capsys.readouterr().out


@pytest.mark.embedded
def test_embedded_model_end_to_end(embedded):
    model, tok = embedded
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    prompt = "The ancient door creaked open"
    greedy = Sampler(model, tok).generate(prompt, max_new_tokens=12, do_sample=False, return_details=True)
    ref = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert greedy.token_ids[0] == ref[0, -12:].tolist()
    sampler = PhaseSlipSampler(model, tok, noise_scale=0.0)
    cal = sampler.calibrate_heads(search_layers=6)
    assert len(cal.rows) == 18 and len(cal.selected) == 3 and all(l >= 24 for l, _ in cal.selected)
    kw = dict(max_new_tokens=16, top_k=40, seed=11, return_details=True, stop_at_eos=False)
    zero = sampler.generate([prompt, "Once upon a time"], **kw)
    plain = Sampler(model, tok).generate([prompt, "Once upon a time"], temperature=0.65, **kw)
    assert zero.token_ids == plain.token_ids
    strong = PhaseSlipSampler(model, tok, noise_scale=1.0, heads=cal.selected).generate(prompt, **kw)
    assert strong.diagnostics["kl"].mean() > 1e-4


@pytest.mark.embedded
def test_demo_command_runs(embedded):
    proc = subprocess.run([sys.executable, "-m", "phaselm", "demo", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tok/s") == 4 and "greedy" in proc.stdout and "phase-slip" in proc.stdout


# ---------------------------------------------------------------- generating past a learned-position context
def _tiny_gpt(block_size=16):
    import torch

    import phaselm
    from phaselm.data.datasets import char_tokenizer

    torch.manual_seed(0)
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz :")
    cfg = phaselm.GPTConfig(vocab_size=len(tok), block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    model = phaselm.GPTForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # tied with wte: less uniform next-token distributions
    return model, tok


def _nanogpt_loop(model, tok, prompt, steps, seed, temperature):
    """nanoGPT's generate: crop to the last block_size tokens, full forward, logits of the last position,
    a draw from softmax(logits / T) with the generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([tok(prompt)["input_ids"]])
    block = model.config.block_size
    with torch.no_grad():
        for _ in range(steps):
            logits = model(idx[:, -block:], logits_to_keep=1).logits[:, -1] / temperature
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)], dim=1)
    return idx[0, -steps:].tolist()


def test_learned_positions_generate_past_the_context_like_nanogpt(caplog):
    """A GPT with a 16-token context continues a prompt for 40 tokens: the cached steps, then a sliding window
    over the last 16 tokens, give exactly the tokens of nanoGPT's crop-and-recompute loop, with one log line;
    Phase-Slip at noise 0 too; a padded batch gives each row its unbatched tokens."""
    from phaselm.sampling.decoding import sliding_window_context

    model, tok = _tiny_gpt()
    assert sliding_window_context(model) == 16 and sliding_window_context(make_model("llama")) is None
    assert sliding_window_context(make_model("gpt2")) == 128
    ref = _nanogpt_loop(model, tok, "ab:", 40, seed=3, temperature=0.8)  # never stops at EOS
    kw = dict(return_details=True, stop_at_eos=False)
    sampler = Sampler(model, tok)
    with caplog.at_level("WARNING", logger="phaselm"):
        for _ in range(2):
            assert sampler.generate("ab:", max_new_tokens=40, seed=3, temperature=0.8, **kw).token_ids[0] == ref
    assert len([r for r in caplog.records if "slides a window" in r.getMessage()]) == 1
    assert len(set(ref)) > 5  # not a constant continuation
    zero = PhaseSlipSampler(model, tok, noise_scale=0.0, heads=[(1, 0)])
    assert zero.generate("ab:", max_new_tokens=40, seed=3, temperature=0.8, **kw).token_ids[0] == ref
    prompts, seeds = ["ab:", "a long prompt of many chars"], [3, 4]  # the second is longer than the context
    batched = sampler.generate(prompts, max_new_tokens=30, seed=seeds, **kw).token_ids
    assert batched == [sampler.generate(p, max_new_tokens=30, seed=s, **kw).token_ids[0] for p, s in zip(prompts, seeds)]
    strong = PhaseSlipSampler(model, tok, noise_scale=1.0, heads=[(1, 0)])
    out = strong.generate(prompts, max_new_tokens=30, seed=seeds, **kw)
    assert [len(t) for t in out.token_ids] == [30, 30] and out.diagnostics["kl"].shape == (2, 30)
    assert bool((out.diagnostics["kl"][:, -10:] > 1e-9).all())  # the rotation acts in the windowed steps too


def test_rotary_models_still_refuse_beyond_their_context():
    with pytest.raises(ValueError, match="max_new_tokens <= "):
        Sampler(make_model("llama"), make_tokenizer()).generate("the king", max_new_tokens=200)


def _batched_equals_unbatched_greedy(model, tok, prompts, steps):
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][:, 0].tolist().count(0) >= 1 and enc["attention_mask"][:, -1].all()  # padded left
    batched = model.generate(**enc, max_new_tokens=steps, do_sample=False)
    for i, prompt in enumerate(prompts):
        one = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=steps, do_sample=False)[0]
        new = one[len(tok(prompt)["input_ids"]):].tolist()
        assert batched[i, enc["input_ids"].shape[1]:][: len(new)].tolist() == new, prompt


def test_loaded_tokenizers_pad_on_the_left(tiny_folder):
    """load_causal_lm's tokenizer pads on the left (the README's left-padded batches), so a padded batch fed
    to model.generate gives each row the tokens of its own unbatched greedy generation."""
    model, tok = load_causal_lm(tiny_folder)
    assert tok.padding_side == "left"
    _batched_equals_unbatched_greedy(model, tok, ["the king said the sea was dark", "a ship"], 8)


@pytest.mark.embedded
def test_embedded_tokenizer_pads_on_the_left(embedded):
    model, tok = embedded
    assert tok.padding_side == "left"
    _batched_equals_unbatched_greedy(model, tok, ["The ancient door creaked open and", "Once"], 6)
