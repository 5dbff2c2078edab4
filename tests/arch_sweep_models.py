"""Tiny random models of every causal-LM architecture of the installed transformers (for the sweep).

:func:`tiny_config` shrinks an architecture's default config (a few layers, width 32-64, vocabulary 64);
:func:`build` returns the model or the one-line reason it could not be built offline from that config
(too big, the config cannot be shrunk this generically, a forward pass with a cache fails).
"""
from __future__ import annotations

import warnings

import torch

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
            if getattr(out, "past_key_values", None) is None:
                return None, f"{type(model).__name__} returns no cache"
        except Exception as err:  # noqa: BLE001 - any failure means "does not build from a tiny config"
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
            return None, f"{type(err).__name__}: {first}"
    with torch.no_grad():  # sharper next-token distributions than the default init
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            head.weight.mul_(8.0)
    return model, None
