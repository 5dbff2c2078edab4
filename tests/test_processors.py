import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from phaselm.nn.functional import entropy
from phaselm.sampling.processors import SamplingConfig, choose_tokens, process_logits


def _reference(z, cfg):
    for warper in [TemperatureLogitsWarper(cfg.temperature)] + (
        [TopKLogitsWarper(cfg.top_k)] if cfg.top_k else []) + (
        [TopPLogitsWarper(cfg.top_p)] if cfg.top_p else []) + (
        [MinPLogitsWarper(cfg.min_p)] if cfg.min_p else []):
        z = warper(None, z)
    return z


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=0.8, top_k=40, top_p=0.92),
    SamplingConfig(temperature=1.3, top_p=0.5),
    SamplingConfig(temperature=0.65, min_p=0.1),
    SamplingConfig(temperature=1.0, top_k=5, min_p=0.05),
])
def test_filters_match_transformers_warpers(cfg):
    z = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    ours, ref = process_logits(z, cfg), _reference(z.clone(), cfg)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    keep = ~torch.isinf(ref)
    assert torch.allclose(ours[keep], ref[keep], atol=1e-5)


def test_each_filter_actually_restricts_the_draws():
    z = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    best = int(z.argmax())
    for cfg in [SamplingConfig(top_k=1), SamplingConfig(top_p=1e-6), SamplingConfig(min_p=0.999)]:
        g = torch.Generator().manual_seed(0)
        draws = {int(choose_tokens(z, cfg, [g])) for _ in range(50)}
        assert draws == {best}, cfg
    g = torch.Generator().manual_seed(0)
    assert len({int(choose_tokens(z, SamplingConfig(temperature=5.0), [g])) for _ in range(50)}) > 10


def test_entropy_in_nats():
    assert torch.allclose(entropy(torch.zeros(1, 8)), torch.tensor([torch.log(torch.tensor(8.0))]))
    # tokens removed with -inf (after top-k, say) contribute 0: four equal survivors give log 4
    masked = torch.tensor([[0.0, 0.0, 0.0, 0.0] + [float("-inf")] * 4])
    assert torch.allclose(entropy(masked), torch.tensor([torch.log(torch.tensor(4.0))]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(min_p=1.0), "min_p"),
])
def test_bad_sampling_knobs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)
