"""Every causal-LM architecture of the installed transformers: Phase-Slip works, or refuses first.

For each model type in transformers' causal-LM mapping, a tiny random model is built offline from a
shrunk default config (:func:`tiny_config`; types that cannot be built that way, or whose
plain ``generate`` fails on a left-padded batch, are skipped with the reason). Then either

* Phase-Slip refuses it with a one-line ``ValueError`` before any token is generated, and head
  calibration refuses it with the same line (one rule for both), or
* with ``noise_scale=0`` it gives exactly the tokens of ``model.generate(do_sample=True)`` for the
  same seed, for a left-padded batch and for a single row; head calibration runs; with a strong
  rotation the clean rows' logits of every step equal a full forward of the sequence without a cache
  (the perturbed rows never leak into the clean KV entries or recurrent / convolutional states); and
  the tensors the attention really consumes (captured inside transformers' attention functions)
  move exactly as the method says: in the perturbed rows, the value vectors of the chosen
  (layer, kv head) pairs over the last W positions are R·v of the clean ones, and nothing else of
  the cached past moves (keys, the other heads' values, the other layers).

The perturbed heads sit in the lowest and the highest attention layer, so every layer above the
lowest one (attention, recurrent and convolutional alike) carries perturbed rows. The module prints
one line with the counts: works / refused / fails / not built.
"""
import sys
import warnings
from collections import Counter

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from phaselm.sampling import PhaseSlipStep, calibrate_heads, phase_slip_generate
from phaselm.sampling.kv import attention_layers, kv_geometry, probe_row_groups
from phaselm.sampling.phase_slip import unsupported_reason
from tests.conftest import make_tokenizer

# ---------------------------------------------------------------- tiny models
# tiny_config shrinks an architecture's default config (a few layers, width 32, vocabulary 64); build
# returns the model or the one-line reason it could not be built offline from that config.
VOCAB = 64
MAX_PARAMS = 2_000_000

TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_embd=32, n_layer=4, n_head=4, n_positions=128,
    n_inner=64, d_model=32, ffn_dim=64, d_ff=64, num_layers=4, n_layers=4, n_heads=4,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, expert_intermediate_size=32,
    kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
    state_size=4, mamba_d_state=4, ssm_state_size=4, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2,
    mamba_d_conv=4, conv_kernel=4, time_step_rank=4, linear_num_key_heads=2, linear_num_value_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, block_size=128,
    mamba_d_ssm=64, mamba_chunk_size=8, chunk_size=8, n_groups=1, n_group=1, topk_group=1, mamba_n_groups=1, mamba_dt_rank=4,
    attention_head_dim=16, n_mamba_heads=2, use_mamba_kernels=False, attn_layer_period=2, attn_layer_offset=1,
    expert_layer_period=2, expert_layer_offset=1, attn_layer_indices=[1, 3], num_heads=4, time_step_min=0.001,
    sliding_window=16, attention_window_size=16, rotary_dim=4, partial_rotary_factor=0.5,
    pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False, use_cache=True,
)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    text = cfg.get_text_config(decoder=True)
    for key, value in TINY.items():
        for c in {id(cfg): cfg, id(text): text}.values():
            if key in ("pad_token_id", "eos_token_id", "bos_token_id") or hasattr(c, key):
                try:
                    setattr(c, key, value)
                except Exception:  # noqa: BLE001 - some attributes are derived / per layer
                    pass
    try:  # multi-head latent attention: the rotary part of the key is its own head size
        if getattr(text, "kv_lora_rank", None) and getattr(text, "qk_rope_head_dim", None) and hasattr(text, "head_dim"):
            text.head_dim = text.qk_rope_head_dim
            text.num_key_value_heads = text.num_attention_heads  # keys are expanded to every head
    except Exception:  # noqa: BLE001 - per-layer attributes
        pass
    for key in ("layer_types", "layers_block_type"):
        layer_types = getattr(text, key, None)
        if isinstance(layer_types, (list, tuple)) and layer_types and len(layer_types) != text.num_hidden_layers:
            kinds = list(dict.fromkeys(layer_types))  # one of each kind, attention kinds last
            kinds.sort(key=lambda t: t in ("full_attention", "sliding_attention", "hybrid", "attention"))
            if len(kinds) == 1 and kinds[0] == "linear_attention" and getattr(text, "num_attention_heads", None):
                kinds = ["linear_attention", "full_attention"]  # a hybrid whose default has no attention yet
            try:
                setattr(text, key, (kinds * 4)[:4] if len(kinds) > 1 else kinds * 4)
            except Exception:  # noqa: BLE001 - derived attribute
                pass
    return cfg


def build(model_type: str):
    """``(model, None)`` or ``(None, reason)``."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = tiny_config(model_type)
            with torch.device("meta"):
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
            if size > MAX_PARAMS:
                return None, f"the generic tiny config still has {size / 1e6:.1f}M parameters"
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():
                out = model(torch.tensor([[3, 4, 5, 6, 7]]), use_cache=True)
            if getattr(out, "past_key_values", None) is None and getattr(out, "cache_params", None) is None:
                return None, f"{type(model).__name__} returns no cache"
        except Exception as err:  # noqa: BLE001 - any failure means "does not build from a tiny config"
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
            return None, f"{type(err).__name__}: {first}"
    with torch.no_grad():  # sharper next-token distributions than the default init
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            head.weight.mul_(8.0)
    return model, None


# ---------------------------------------------------------------- the sweep
IDS = torch.tensor([[0, 0, 3, 4, 5, 6], [3, 9, 10, 11, 12, 13]])  # row 0 left-padded
MASK = (IDS != 0).long()
NEW = 3
WINDOW = 3  # shorter than the context, so some cached positions lie outside the rotated window
TOK = make_tokenizer()
CALIBRATION_TEXT = "the king said the sea was dark and the ship came to the town"
OUTCOMES: Counter = Counter()


@pytest.fixture(autouse=True, scope="module")
def one_thread(pytestconfig):
    """Tiny matmuls: one thread is 10-30x faster than two on a shared 2-core machine. Prints the counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and OUTCOMES:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\narchitecture sweep: " + ", ".join(
                f"{OUTCOMES[k]} {k}" for k in ("work", "refused", "fail", "not built / plain generate fails")))


def _refusal(model) -> str | None:
    """The one-line reason Phase-Slip refuses ``model``, or None."""
    reason = unsupported_reason(model)
    if reason is None:
        try:
            probe_row_groups(model, attention_layers(model)[0])
        except ValueError as err:
            reason = str(err)
    return reason


def _heads(model):
    geometry = probe_row_groups(model, attention_layers(model)[0])
    layers = sorted(geometry)
    last_head = min(geometry[layers[-1]][0], kv_geometry(model)[1]) - 1  # valid for the config and the cache
    return [(layers[0], 0), (layers[-1], last_head)]


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_architecture_works_or_is_refused_before_generating(model_type, monkeypatch):
    OUTCOMES["not built / plain generate fails"] += 1
    model, why = build(model_type)
    if model is None:
        pytest.skip(f"not built from a tiny config: {why}")
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.0, pad_token_id=0)
    try:
        torch.manual_seed(0)
        plain = model.generate(input_ids=IDS, attention_mask=MASK, **kw)
        torch.manual_seed(0)
        plain_one = model.generate(input_ids=IDS[1:], **kw)
    except Exception as err:  # noqa: BLE001 - transformers itself cannot sample this tiny model
        pytest.skip(f"plain generate fails: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
    OUTCOMES["not built / plain generate fails"] -= 1
    OUTCOMES["fail"] += 1

    reason = _refusal(model)
    if reason is not None:
        assert "\n" not in reason
        with pytest.raises(ValueError) as err:
            PhaseSlipStep(model, heads=None) if unsupported_reason(model) else phase_slip_generate(
                model, input_ids=IDS, attention_mask=MASK, noise_scale=0.0, heads=[(attention_layers(model)[0], 0)], **kw)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError) as err:  # calibration is refused by the same rule, with the same line
            calibrate_heads(model, TOK, text=CALIBRATION_TEXT)
        assert str(err.value) == reason
        OUTCOMES["fail"] -= 1
        OUTCOMES["refused"] += 1
        return

    heads = _heads(model)
    torch.manual_seed(0)
    ours = phase_slip_generate(model, input_ids=IDS, attention_mask=MASK, noise_scale=0.0, heads=heads, **kw)
    assert torch.equal(ours, plain), f"{model_type}: noise 0 differs from plain sampling"
    torch.manual_seed(0)
    ours_one = phase_slip_generate(model, input_ids=IDS[1:], noise_scale=0.0, heads=heads, **kw)
    assert torch.equal(ours_one, plain_one), f"{model_type}: noise 0 differs from plain sampling for one row"
    assert calibrate_heads(model, TOK, text=CALIBRATION_TEXT, samples_per_head=1).selected
    _check_clean_logits_and_what_moves(model, heads, monkeypatch)
    OUTCOMES["fail"] -= 1
    OUTCOMES["work"] += 1


def _capture_consumed_kv(model, cache, monkeypatch) -> tuple[list, dict]:
    """Record the keys and values that the attention really consumes: ``(layer_idx or None, key, value)``
    per call of transformers' attention functions (sdpa and the model's eager function), and, for
    models that attend outside those functions, what the cache hands the attention
    (``{layer: (keys, values)}`` from ``cache.update``, i.e. :meth:`RowGroups.update`)."""
    from transformers.modeling_utils import AttentionInterface

    calls, from_cache = [], {}

    def wrap(fn):
        def capture(module, query, key, value, *args, **kwargs):
            calls.append((getattr(module, "layer_idx", None), key.detach().clone(), value.detach().clone()))
            return fn(module, query, key, value, *args, **kwargs)
        return capture

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", wrap(AttentionInterface._global_mapping["sdpa"]))
    modeling = sys.modules[type(model).__module__]
    if hasattr(modeling, "eager_attention_forward"):
        monkeypatch.setattr(modeling, "eager_attention_forward", wrap(modeling.eager_attention_forward))
    update = cache.update  # RowGroups.update, installed on the cache by the session

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        from_cache[layer_idx] = (keys.detach().clone(), values.detach().clone())
        return keys, values

    monkeypatch.setattr(cache, "update", recording_update)
    return calls, from_cache


def _check_what_moves(consumed: list, cached: dict, rotations: dict, heads, batch: int, width: int) -> None:
    """One decoding step. ``consumed``: ``(layer, keys, values)`` per attention call, ``[2B, heads', T, d]``
    (clean rows, then perturbed rows); ``cached[layer] = (keys, values)`` ``[2B, kv_heads, T, d]`` as the
    cache handed them out; ``rotations[layer] [1, 1, kv_heads, d, d]``.

    Each consumed value head is traced to the cached KV head it reads (equal clean values: GQA repeats,
    DiffLlama's split heads); in the perturbed rows, over the cached past (and, in the first perturbed
    layer, the new position too: its input is the clean one), the values read from a chosen head must
    be R·v of the clean ones over the last ``width`` positions, and every other consumed key and value
    must equal the clean one. A chosen layer whose attention reads values that are not the cached ones
    (e.g. expanded from a latent) fails."""
    first = min(layer for layer, _ in heads)
    rotated = set()  # the chosen heads whose rotated values some attention call read
    for layer, keys, values in consumed:
        if layer < first:
            assert keys.shape[0] == batch, f"layer {layer} is below the perturbed layers but carries perturbed rows"
            continue
        assert keys.shape[0] == values.shape[0] == 2 * batch, f"layer {layer}: {keys.shape[0]} rows, not clean + perturbed"
        past = slice(None) if layer == first else slice(0, keys.shape[-2] - 1)  # above: the new token's input moved
        k_clean, k_pert = keys[:batch, :, past], keys[batch:, :, past]
        v_clean, v_pert = values[:batch, :, past], values[batch:, :, past]
        torch.testing.assert_close(k_pert, k_clean, atol=1e-6, rtol=0, msg=f"layer {layer}: the keys moved")
        expected = v_clean.clone()
        chosen = [h for lay, h in heads if lay == layer]
        m = min(width if layer == first else width - 1, v_clean.shape[-2])  # rotated positions within `past`
        if chosen and m > 0:
            source = cached[layer][1][:batch, :, past]  # [B, kv_heads, T', d]: the clean cached values
            for j in range(values.shape[1]):
                reads = [h for h in range(source.shape[1]) if source.shape[-1] == v_clean.shape[-1]
                         and torch.allclose(v_clean[:, j], source[:, h], atol=1e-6, rtol=0)]
                assert reads, f"layer {layer}: the attention reads values that are not the cached ones (head {j})"
                if reads[0] in chosen:
                    rot = rotations[layer][0, 0, reads[0]]
                    expected[:, j, -m:] = torch.einsum("bwd,ed->bwe", v_clean[:, j, -m:], rot)
                    rotated.add((layer, reads[0]))
        torch.testing.assert_close(v_pert, expected, atol=1e-5, rtol=1e-5,
                                   msg=f"layer {layer}: the perturbed values are not R·v of the chosen heads only")
    assert rotated == set(heads), f"the attention never read the rotated values of {sorted(set(heads) - rotated)}"


@torch.no_grad()
def _check_clean_logits_and_what_moves(model, heads, monkeypatch):
    b = IDS.shape[0]
    step = PhaseSlipStep(model, noise_scale=1.5, heads=heads, logit_fusion_alpha=0.0, entropy_center=-10.0,
                         perturbation_window=WINDOW)
    seq, mask = IDS, MASK
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                  use_cache=True).past_key_values
    drawn = []
    draw = step._draw_rotations
    monkeypatch.setattr(step, "_draw_rotations", lambda rows: drawn.append(draw(rows)) or drawn[-1])
    moved = 0.0
    with step.session(cache, [0], b):
        for i in range(NEW):
            out = {}

            def run():
                out["o"] = model(input_ids=seq[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                                 past_key_values=cache, use_cache=True)
                return out["o"]

            if i == 0:  # the first step: which tensors does the attention consume?
                with monkeypatch.context() as patch:
                    calls, from_cache = _capture_consumed_kv(model, cache, patch)
                    fused = step(run, b)
                seen = {layer for layer, _, _ in calls}
                consumed = calls if None not in seen and set(from_cache) <= seen else [
                    (layer, k, v) for layer, (k, v) in from_cache.items()]  # attention outside transformers' functions
                _check_what_moves(consumed, from_cache, drawn[-1], heads, b, WINDOW)
            else:
                fused = step(run, b)
            clean = out["o"].logits[:b, -1].float()
            full = model(input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
            torch.testing.assert_close(clean, full, atol=2e-4, rtol=1e-4)
            moved = max(moved, float((fused - clean).abs().max()))
            seq = torch.cat([seq, clean.argmax(-1, keepdim=True)], dim=-1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=-1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=-1)
    assert moved > 1e-6, "the rotation never changed the fused logits"
