"""PhaseGPT attention: fast SDPA path == explicit formula (forward and gradients), causality, gradient flow."""
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from phaselm.nn.attention import CausalSelfAttention
from phaselm.nn.phase_coupled import PhaseCoupledAttention
from phaselm.models import PhaseGPTConfig, PhaseGPTForCausalLM

SIZES = dict(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=16)


def phase_gpt(phase_layers, **kw):
    return PhaseGPTForCausalLM(PhaseGPTConfig(phase_layers=phase_layers, **SIZES, **kw))


def layer(**kw):
    torch.manual_seed(0)
    return PhaseCoupledAttention(16, 2, n_osc=5, kuramoto_steps=3, **kw).double().eval()


def test_fast_path_equals_the_explicit_formula_forward_and_backward():
    attn = layer()
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    fast, slow = attn(x), attn.explicit_forward(x)
    assert torch.allclose(fast, slow, atol=1e-10)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), [x, *attn.parameters()])
    grads_slow = torch.autograd.grad((slow * g).sum(), [x, *attn.parameters()])
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, atol=1e-9)


def test_phase_gpt_puts_phase_attention_in_the_named_layers_only():
    model = phase_gpt([1], n_osc=4)
    assert type(model.blocks[0].attn) is CausalSelfAttention and isinstance(model.blocks[1].attn, PhaseCoupledAttention)
    assert model.blocks[1].attn.n_osc == 4
    with pytest.raises(StrictDataclassError, match=r"phase_layers \[2\] are outside 0..1"):
        phase_gpt([2])


def test_phase_attention_is_causal_inside_a_model():
    torch.manual_seed(0)
    model = phase_gpt([1], n_osc=4).eval()  # phase coupling in layer 1 only
    x = torch.randint(0, 40, (1, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 40, (1, 8))
    assert torch.allclose(model(x).logits[:, :12], model(y).logits[:, :12], atol=1e-6)


def test_gradients_reach_omega_coupling_and_coherence_and_r_is_recorded():
    attn = layer().train()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    loss = attn(x).pow(2).sum() + attn.last_r.sum()
    loss.backward()
    for name in ("omega", "coupling", "coherence", "phase_proj.weight"):
        grad = dict(attn.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    m = attn.metrics()
    assert 0 <= m["R_mean"] <= 1 and "R_head1" in m
