"""Static-cache and compiled decoding (issue 22 §2).

Properties: with ``cache_implementation="static"`` every decoding step's logits equal the dynamic
cache's and the full forward's (1e-5) and greedy tokens are equal, for GPT, PhaseGPT (Kuramoto
running sums), PMA (Mamba conv/SSM state and Kuramoto sums) and a pure Mamba stack, on a left-padded batch; the decoding
step compiles into one graph with ``fullgraph=True`` (no graph break) that is traced once for all
steps (no recompile per step) and gives the eager static tokens (inductor, one tiny model per
family); a static cache too short for the prompt is a one-line error.
"""
import pytest
import torch
import torch._dynamo
from transformers import CompileConfig, StaticCache

import phaselm
from tests.conftest import tiny_phaselm

V = 40
KINDS = ["gpt", "gpt_conv", "phasegpt", "pma"]
PROMPT, NEW = 6, 7


def build(kind: str, seed: int = 0):
    return tiny_phaselm(kind, seed, sharpen=True)


def batch():
    """Two prompts, the first left-padded by two tokens."""
    ids = torch.randint(1, V, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def greedy(model, cache: str | None = None, compile_backend: str | None = None):
    ids, mask = batch()
    kwargs = {}
    if compile_backend:
        config = CompileConfig(fullgraph=True, dynamic=False, backend=compile_backend, mode="default")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        kwargs["compile_config"] = config
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, cache_implementation=cache, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


@pytest.mark.parametrize("kind", KINDS + ["mamba"])
def test_static_equals_dynamic_equals_the_full_forward(kind):
    model = build(kind)
    static, dynamic = greedy(model, "static"), greedy(model)
    assert torch.equal(static.sequences, dynamic.sequences)
    _, mask = batch()
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(static.sequences, attention_mask=full_mask).logits  # [B, PROMPT + NEW, V]
    for i, (s, d) in enumerate(zip(static.logits, dynamic.logits)):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=0)
        torch.testing.assert_close(s, full[:, PROMPT - 1 + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_static_forward_by_hand_takes_the_mask_of_cached_plus_new_tokens(kind):
    """A static cache driven by hand (as Phase-Slip does): 2-D masks of past + T columns, chunked."""
    model = build(kind)
    ids, mask = batch()
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        first = model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True).logits
        rest = model(ids[:, 4:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=0)


def test_a_static_cache_too_short_is_a_one_line_error():
    model = build("gpt")
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"^the static cache holds 4 tokens, but 0 cached \+ 6 new") as err:
        model(ids, attention_mask=mask, past_key_values=StaticCache(config=model.config, max_cache_len=4), use_cache=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_the_decoding_step_compiles_to_one_graph_without_breaks(kind):
    """fullgraph=True raises at any graph break; one graph for all steps means no recompile per step
    (dynamo's ``eager`` backend: the tracing without inductor's code generation, which is slow here)."""
    model = build(kind)
    expected = greedy(model, "static").sequences
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = greedy(model, "static", compile_backend="eager")
    assert torch.equal(out.sequences, expected)
    assert hasattr(model, "_compiled_call")  # generate did take the compiled path
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_static_decoding_gives_the_eager_static_tokens(kind):
    """torch.compile with inductor (~10-30 s per model on a loaded 2-core CPU)."""
    model = build(kind)
    expected = greedy(model, "static")
    torch._dynamo.reset()
    out = greedy(model, "static", compile_backend="inductor")
    assert torch.equal(out.sequences, expected.sequences)
    for a, b in zip(out.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
