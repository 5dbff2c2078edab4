"""First-class models: GPT, PhaseGPT and PMA save, load, cache and generate like transformers models.

Properties: cache == no cache (token by token, float32 1e-5, left-padded batch with its mask); a
left-padded row computes what the row alone computes; save → load is bit-exact (Auto classes, char
tokenizer); generate's decoding options run and greedy decoding equals recomputing the whole
context; parameters that must not be decayed are tagged and the trainer leaves them out.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, TextIteratorStreamer

import phaselm
from phaselm.data.datasets import get_tokenizer
from phaselm.training.trainer import optimizer_groups

V = 40


def build(kind: str, seed: int = 0, heads: int = 2):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=V, block_size=48, n_head=heads, n_embd=16)
    if kind in ("gpt", "gpt_conv"):
        model = phaselm.GPTForCausalLM(phaselm.GPTConfig(n_layer=2, short_conv=3 if kind == "gpt_conv" else 0, **sizes))
    elif kind.startswith("phasegpt"):
        model = phaselm.PhaseGPTForCausalLM(phaselm.PhaseGPTConfig(
            n_layer=3, phase_layers=[1, 2], n_osc=4, integrator="rk4" if kind.endswith("rk4") else "euler",
            short_conv=4 if kind.endswith("conv") else 0, **sizes))
    else:
        layout = {"pma": dict(n_layer=3, n_ssm=2), "pma_interleaved": dict(n_layer=4, n_ssm=2, layout="interleaved"),
                  "mamba": dict(n_layer=2, n_ssm=2), "pma_no_ssm": dict(n_layer=2, n_ssm=0)}[kind]
        model = phaselm.PMAForCausalLM(phaselm.create_tiny_config(d_state=4, **layout, **sizes))
    with torch.no_grad():  # spread the phases, so the oscillators matter
        for m in model.phase_layers().values():
            m.phase_proj.weight.normal_(0, 1.0)
    return model.eval()


KINDS = ["gpt", "gpt_conv", "phasegpt", "phasegpt_rk4", "phasegpt_conv", "pma", "pma_interleaved", "mamba", "pma_no_ssm"]


def decode_stepwise(model, ids, mask, prefill):
    cache = DynamicCache(config=model.config)
    outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t: t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                          use_cache=True).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_the_full_forward_with_left_padding(kind):
    model = build(kind)
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :11] = 0, 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        step = decode_stepwise(model, ids, mask, prefill=12)
        alone = model(ids[1:2, 5:]).logits  # row 1 without its padding
    real = mask.bool()
    assert (step - full)[real].abs().max() < 1e-5
    assert (full[1, 5:] - alone[0]).abs().max() < 1e-5
    # no mask at all: the plain training path
    with torch.no_grad():
        plain = model(ids[:1]).logits
        assert (decode_stepwise(model, ids[:1], torch.ones_like(ids[:1]), prefill=1) - plain).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["gpt", "gpt_conv", "phasegpt", "pma"])
def test_save_and_load_are_bit_exact_through_the_auto_classes(kind, tmp_path):
    model = build(kind)
    tok = get_tokenizer("char", "ROMEO: hello, world\n")
    model.save_pretrained(tmp_path)
    tok.tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config.to_diff_dict() == model.config.to_diff_dict()
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # still tied
    ids = torch.randint(0, V, (2, 12))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("ROMEO: hello")["input_ids"] == tok.encode("ROMEO: hello")
    assert get_tokenizer(str(tmp_path)).to_json() == tok.to_json()


@pytest.mark.parametrize("kind", ["gpt", "gpt_conv", "phasegpt", "pma", "mamba"])
def test_generate_runs_with_the_usual_options_and_greedy_equals_recomputing(kind):
    model = build(kind)
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for options in (dict(do_sample=True, top_p=0.9), dict(do_sample=True, min_p=0.1),
                    dict(do_sample=True, top_k=5, repetition_penalty=1.3)):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **options)
        assert out.shape == (2, 13) and torch.equal(out[:, :7], ids)
    greedy = model.generate(input_ids=ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq = ids[:1]
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, seq)


def test_generate_streams_text_with_a_char_tokenizer():
    model = build("pma")
    tok = get_tokenizer("char", "".join(chr(65 + i) for i in range(V)))
    streamer = TextIteratorStreamer(tok.tok)
    enc = tok.tok("ABC", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0])


def test_a_context_longer_than_block_size_is_a_clear_error():
    model = build("phasegpt")
    with pytest.raises(ValueError, match="exceeds block_size 48"):
        model.generate(input_ids=torch.ones(1, 40, dtype=torch.long), max_new_tokens=20, do_sample=False)


@pytest.mark.parametrize("kind, tagged", [("phasegpt", ".attn.omega"), ("pma", ".pma.phi_pos"), ("mamba", ".ssm.A_log")])
def test_phase_and_ssm_matrices_are_tagged_and_not_decayed(kind, tagged):
    model = build(kind)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer_groups(model, 0.1)
    decayed = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith(tagged) for n in (names[id(p)] for p in no_decay["params"]))
    assert not any(n.endswith(tagged) for n in decayed)
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])  # only weight matrices decay


@pytest.mark.parametrize("kind", ["phasegpt", "pma", "pma_interleaved", "gpt_conv"])
def test_phase_slip_runs_on_phaselm_models_and_noise_zero_is_plain_sampling(kind):
    model = build(kind, heads=4)  # 4 heads: see the closing note of the session on 2-head models
    tok = get_tokenizer("char", "".join(chr(65 + i) for i in range(V))).tok
    # value vectors of the phase layers' attention (every layer's for the GPT, whose cache also holds conv states)
    heads = [(layer, 1) for layer in (model.phase_layers() or range(model.config.n_layer))]
    common = dict(max_new_tokens=12, seed=3, temperature=1.0, return_details=True)
    clean = phaselm.Sampler(model, tok).generate("ABCDEF", **common).token_ids
    same = phaselm.PhaseSlipSampler(model, tok, noise_scale=0.0, heads=heads).generate("ABCDEF", **common)
    assert same.token_ids == clean
    moved = phaselm.PhaseSlipSampler(model, tok, noise_scale=1.5, heads=heads).generate("ABCDEF", **common)
    assert float(moved.diagnostics["kl"].mean()) > 0
