"""The GPT baseline: causality, tied weights, loss at init, attention chosen per layer, config errors."""
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from phaselm.nn.attention import CausalSelfAttention
from phaselm.models.gpt import GPTConfig, GPTForCausalLM, GPTModel


def tiny(**kw):
    torch.manual_seed(0)
    return GPTForCausalLM(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def test_changing_later_tokens_never_changes_earlier_logits():
    model = tiny()
    x = torch.randint(0, 50, (2, 24))
    base = model(x).logits
    for t in (0, 7, 22):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 50, y[:, t + 1:].shape)
        other = model(y).logits
        assert torch.allclose(base[:, : t + 1], other[:, : t + 1], atol=1e-6)
        assert not torch.allclose(base[:, t + 1:], other[:, t + 1:], atol=1e-4)


def test_tied_head_and_loss_near_uniform_at_init():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    x, y = torch.randint(0, 50, (2, 4, 32))
    assert abs(model(x, targets=y).loss.item() - math.log(50)) < 0.1
    # transformers' labels convention (shifted inside) gives the same loss on the same pairs
    both = torch.cat([x, y[:, -1:]], dim=1)[:, :32]
    assert torch.allclose(model(both, labels=both).loss, model(both[:, :-1], targets=both[:, 1:]).loss, atol=1e-6)


def test_attention_is_chosen_per_layer():
    built = []

    class Traced(GPTModel):
        def make_attention(self, i):
            built.append(i)
            return CausalSelfAttention(self.config.n_embd, self.config.n_head, layer_idx=i)

    Traced(GPTConfig(vocab_size=10, block_size=8, n_layer=3, n_head=2, n_embd=8))
    assert built == [0, 1, 2]


def test_config_errors_name_the_key():
    with pytest.raises(StrictDataclassError, match="n_embd"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 40, dtype=torch.long))


def test_the_short_convolution_is_the_causal_padded_conv1d_in_front_of_attention():
    import torch.nn.functional as F

    model = tiny(short_conv=3)
    block, x = model.model.blocks[0], torch.randn(2, 10, 32)
    h = block.ln_1(x)
    reference = F.conv1d(F.pad(h.transpose(1, 2), (2, 0)), block.conv.weight, block.conv.bias, groups=32).transpose(1, 2)
    assert torch.allclose(block.attention_input(x), reference, atol=1e-6)
    assert model.config.layer_types == ["hybrid", "hybrid"]  # KV + the conv state in the cache
    with pytest.raises(StrictDataclassError, match="short_conv"):
        GPTConfig(short_conv=-1)
