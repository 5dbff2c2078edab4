"""Every causal-LM architecture of the installed transformers: Phase-Slip works, or refuses first.

For each model type in transformers' causal-LM mapping, a tiny random model is built offline from a
shrunk default config (:func:`tiny_config`; types that cannot be built that way, or whose
plain ``generate`` fails on a left-padded batch, are skipped with the reason). Then either

* Phase-Slip refuses it with a one-line ``ValueError`` before any token is generated, or
* with ``noise_scale=0`` it gives exactly the tokens of ``model.generate(do_sample=True)`` for the
  same seed, and with a strong rotation the clean rows' logits of every step equal a full forward of
  the sequence without a cache (the perturbed rows never leak into the clean KV entries or recurrent
  / convolutional states), while the fused logits do move.

The perturbed heads sit in the lowest and the highest attention layer, so every layer above the
lowest one (attention, recurrent and convolutional alike) carries perturbed rows.
"""
import warnings

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from phaselm.sampling.phase_slip import unsupported_reason
from phaselm.sampling import PhaseSlipStep, phase_slip_generate
from phaselm.sampling.kv import attention_layers, kv_geometry, probe_row_groups

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
    mamba_d_ssm=64, mamba_chunk_size=8, chunk_size=8, n_groups=1, mamba_n_groups=1, mamba_dt_rank=4,
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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is 10-30x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def test_architecture_works_or_is_refused_before_generating(model_type):
    model, why = build(model_type)
    if model is None:
        pytest.skip(f"not built from a tiny config: {why}")
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.0, pad_token_id=0)
    try:
        torch.manual_seed(0)
        plain = model.generate(input_ids=IDS, attention_mask=MASK, **kw)
    except Exception as err:  # noqa: BLE001 - transformers itself cannot sample this tiny model
        pytest.skip(f"plain generate fails: {type(err).__name__}: {str(err).splitlines()[0][:100]}")

    reason = _refusal(model)
    if reason is not None:
        assert "\n" not in reason
        with pytest.raises(ValueError) as err:
            PhaseSlipStep(model, heads=None) if unsupported_reason(model) else phase_slip_generate(
                model, input_ids=IDS, attention_mask=MASK, noise_scale=0.0, heads=[(attention_layers(model)[0], 0)], **kw)
        assert "\n" not in str(err.value)
        return

    heads = _heads(model)
    torch.manual_seed(0)
    ours = phase_slip_generate(model, input_ids=IDS, attention_mask=MASK, noise_scale=0.0, heads=heads, **kw)
    assert torch.equal(ours, plain), f"{model_type}: noise 0 differs from plain sampling"
    _check_clean_logits_equal_full_forward(model, heads)


@torch.no_grad()
def _check_clean_logits_equal_full_forward(model, heads):
    b = IDS.shape[0]
    step = PhaseSlipStep(model, noise_scale=1.5, heads=heads, logit_fusion_alpha=0.0, entropy_center=-10.0)
    seq, mask = IDS, MASK
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                  use_cache=True).past_key_values
    moved = 0.0
    with step.session(cache, [0], b):
        for _ in range(NEW):
            out = {}

            def run():
                out["o"] = model(input_ids=seq[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                                 past_key_values=cache, use_cache=True)
                return out["o"]

            fused = step(run, b)
            clean = out["o"].logits[:b, -1].float()
            full = model(input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
            torch.testing.assert_close(clean, full, atol=2e-4, rtol=1e-4)
            moved = max(moved, float((fused - clean).abs().max()))
            seq = torch.cat([seq, clean.argmax(-1, keepdim=True)], dim=-1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=-1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=-1)
    assert moved > 1e-6, "the rotation never changed the fused logits"
