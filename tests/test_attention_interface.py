"""Attention goes through transformers' attention interface (issue 22 §3).

Properties: ``attn_implementation`` = ``eager`` and ``sdpa`` give the same logits (1e-5; plain causal
path, left-padded batch, cached greedy decoding) and the same gradients, for GPT, PhaseGPT (coherence
bias as 2N extra q/k features) and PMA (modulation as 3× q/k features); the choice is made by the
config, as for Llama (``from_pretrained(..., attn_implementation=...)``, ``set_attn_implementation``),
and a function registered with ``AttentionInterface`` is the one called, once per attention layer;
``flex_attention`` equals sdpa (inference: FlexAttention has no CPU backward); ``max_position_embeddings``
is ``block_size`` (what lm-eval reads as the context length).
"""
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

import phaselm
from tests.conftest import tiny_phaselm

V = 40
KINDS = ["gpt", "phasegpt", "pma"]


def build(kind: str, seed: int = 0):
    return tiny_phaselm(kind, seed, n_ssm=1, sharpen=True)


def batch():
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def with_implementation(model, name):
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_eager_equals_sdpa_in_logits_and_gradients(kind):
    model = build(kind)
    ids, mask = batch()
    results = {}
    for name in ("sdpa", "eager"):
        with_implementation(model, name)
        model.zero_grad()
        plain = model(ids, labels=ids)
        plain.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            padded = model(ids, attention_mask=mask).logits
        results[name] = (plain.logits.detach(), padded, grads)
    for a, b in zip(results["sdpa"][:2], results["eager"][:2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(results["sdpa"][2]) == len(results["eager"][2]) > 0
    for a, b in zip(results["sdpa"][2], results["eager"][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", [None, "static"])
def test_eager_and_sdpa_decode_the_same_tokens(kind, cache):
    model = build(kind)
    ids, mask = batch()
    out = {}
    for name in ("sdpa", "eager"):
        out[name] = with_implementation(model, name).generate(
            ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
            cache_implementation=cache, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out["sdpa"].sequences, out["eager"].sequences)
    for a, b in zip(out["sdpa"].logits, out["eager"].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_config_chooses_the_function_as_for_llama(kind, tmp_path):
    model = build(kind)
    model.save_pretrained(tmp_path)
    ids, mask = batch()
    calls = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("phaselm_test_counting", counting)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="phaselm_test_counting")
    assert loaded.config._attn_implementation == "phaselm_test_counting"
    with torch.no_grad():
        logits = loaded(ids, attention_mask=mask).logits
        reference = model(ids, attention_mask=mask).logits
    attention_layers = [i for i, b in enumerate(model.blocks) if hasattr(b, "attn") or hasattr(b, "pma")]
    assert calls == attention_layers
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_flex_attention_equals_sdpa_for_the_pma_modulation():
    """FlexAttention compiles its kernel (~30 s on this CPU) and has no CPU backward: inference only."""
    model = build("pma")
    ids, mask = batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        flex = with_implementation(model, "flex_attention")(ids, attention_mask=mask).logits
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_max_position_embeddings_is_the_context_length(kind):
    config = build(kind).config
    assert config.max_position_embeddings == config.block_size == 32


def test_flex_attention_without_a_mask_equals_sdpa_and_training_on_the_cpu_is_one_line():
    """Without an attention mask the causal BlockMask is broadcast over the batch (a batch-1 mask
    for a batch of 2 indexed out of bounds inside the kernel); FlexAttention has no CPU backward, so
    a training forward on the CPU is refused before the kernel, naming the fix."""
    model = build("gpt")
    ids = batch()[0]
    with torch.no_grad():
        reference = model(ids).logits
        flex = with_implementation(model, "flex_attention")
        torch.testing.assert_close(flex(ids).logits, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no backward on the CPU.*train with 'sdpa'"):
        flex.train()(ids, labels=ids)
