"""Every causal-LM architecture of the installed transformers: Phase-Slip works, or refuses first.

For each model type in transformers' causal-LM mapping, a tiny random model is built offline from a
shrunk default config (:mod:`tests.arch_sweep_models`; types that cannot be built that way, or whose
plain ``generate`` fails on a left-padded batch, are skipped with the reason). Then either

* Phase-Slip refuses it with a one-line ``ValueError`` before any token is generated, or
* with ``noise_scale=0`` it gives exactly the tokens of ``model.generate(do_sample=True)`` for the
  same seed, and with a strong rotation the clean rows' logits of every step equal a full forward of
  the sequence without a cache (the perturbed rows never leak into the clean KV entries or recurrent
  / convolutional states), while the fused logits do move.

The perturbed heads sit in the lowest and the highest attention layer, so every layer above the
lowest one (attention, recurrent and convolutional alike) carries perturbed rows.
"""
import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from phaselm.pretrained import unsupported_model_reason
from phaselm.sampling import PhaseSlipStep, phase_slip_generate
from phaselm.sampling.kv import attention_layers, kv_geometry, probe_row_groups
from tests.arch_sweep_models import build

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
    reason = unsupported_model_reason(model)
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
            PhaseSlipStep(model, heads=None) if unsupported_model_reason(model) else phase_slip_generate(
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
