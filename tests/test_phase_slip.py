"""Phase-Slip mechanism tests on tiny random GPT-2 / Llama / Qwen2 / Mistral models."""
import copy

import pytest
import torch
from transformers import DynamicCache

from phaselm import PhaseSlipSampler, Sampler
from phaselm.sampling.kv import RowGroupCache, kv_geometry, probe_row_groups
from phaselm.sampling.rotation import random_rotations

PROMPTS = ["the ancient door creaked open and", "a king"]


def test_batched_cached_greedy_equals_uncached_full_forward_per_prompt(arch_model, tokenizer):
    ours = Sampler(arch_model, tokenizer).generate(PROMPTS, max_new_tokens=12, do_sample=False, stop_at_eos=False,
                                                   return_details=True)
    for prompt, got in zip(PROMPTS, ours.token_ids):
        seq = tokenizer(prompt, return_tensors="pt")["input_ids"]  # no padding, no cache: the definition
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, arch_model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert got == seq[0, -12:].tolist()


def test_noise_zero_reproduces_plain_sampling_token_for_token(arch_model, tokenizer):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_k=20, seed=7, stop_at_eos=False, return_details=True)
    plain = Sampler(arch_model, tokenizer).generate(PROMPTS, **kwargs)
    phase = PhaseSlipSampler(arch_model, tokenizer, noise_scale=0.0, heads=[(2, 0), (3, 0)]).generate(PROMPTS, **kwargs)
    assert phase.token_ids == plain.token_ids
    strong = PhaseSlipSampler(arch_model, tokenizer, noise_scale=2.5, logit_fusion_alpha=0.0, entropy_center=-10,
                              heads=[(1, 0), (2, 0), (3, 0)]).generate(PROMPTS, **kwargs)
    assert strong.diagnostics["kl"].max() > 1e-4  # a real rotation changes the distribution


class _ReferencePerturbedCache(DynamicCache):
    """Independent oracle: a full copy of the clean cache whose update returns the values of the
    selected heads rotated over the last W positions (stored values stay unrotated)."""

    def __init__(self, clean: DynamicCache, rotations: dict, window: int):
        super().__init__()
        self.layers = copy.deepcopy(clean.layers)
        self.rot, self.window = rotations, window

    def update(self, k, v, layer_idx, *args, **kwargs):
        keys, values = super().update(k, v, layer_idx, *args, **kwargs)
        if layer_idx in self.rot:
            values = values.clone()
            w = min(self.window, values.shape[-2])
            values[..., -w:, :] = torch.einsum("bhwd,hed->bhwe", values[..., -w:, :], self.rot[layer_idx][0, 0])
        return keys, values


@pytest.mark.parametrize("window", [3, 50])
def test_row_groups_equal_a_full_perturbed_copy_and_leave_the_clean_cache_untouched(arch_model, tokenizer, window):
    model = arch_model
    n_layers, n_kv, d = kv_geometry(model)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    plain, grouped = DynamicCache(config=model.config), RowGroupCache(config=model.config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), grouped.attach(model, first_layer=2):
        for cache in (plain, grouped):
            model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], past_key_values=cache, use_cache=True)
        token, step_mask, step_pos = ids[:, -1:], mask, pos[:, -1:]
        for _ in range(4):
            rot = {layer: torch.eye(d).repeat(1, 1, n_kv, 1, 1) for layer in (2, 3)}
            rot[2][0, 0, 0] = random_rotations(1, d, 1.0, generator=gen)[0]
            rot[3][0, 0, n_kv - 1] = random_rotations(1, d, 1.0, generator=gen)[0]
            oracle = _ReferencePerturbedCache(plain, rot, window)
            z_oracle = model(token, attention_mask=step_mask, position_ids=step_pos, past_key_values=oracle).logits[:, -1]
            z_plain = model(token, attention_mask=step_mask, position_ids=step_pos, past_key_values=plain).logits[:, -1]
            with grouped.row_groups(len(PROMPTS), rot, window):
                z = model(token, attention_mask=step_mask, position_ids=step_pos, past_key_values=grouped).logits[:, -1]
            b = len(PROMPTS)
            assert torch.allclose(z[:b], z_plain, atol=1e-5), "clean group differs from the plain model"
            assert torch.allclose(z[b:], z_oracle, atol=1e-5), "perturbed group differs from the oracle"
            assert not torch.allclose(z[b:], z_plain, atol=1e-4), "the rotation had no effect"
            for layer_p, layer_g in zip(plain.layers, grouped.layers):  # clean cache == plain cache
                assert torch.allclose(layer_p.keys, layer_g.keys, atol=1e-6)
                assert torch.allclose(layer_p.values, layer_g.values, atol=1e-6)
            token = z_plain.argmax(-1, keepdim=True)
            step_mask = torch.cat([step_mask, torch.ones(b, 1, dtype=step_mask.dtype)], -1)
            step_pos = step_pos + 1


def test_each_token_is_fed_exactly_once(tokenizer):
    from tests.conftest import make_model

    model = make_model("llama")
    probe_row_groups(model, 3)  # the one-time model check (memoised) feeds its own probe tokens
    fed = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, inp, out: fed.append(inp[0].shape[1]))
    sampler = PhaseSlipSampler(model, tokenizer, noise_scale=0.5, heads=[(3, 1)])
    out = sampler.generate("the old king said", max_new_tokens=10, seed=0, stop_at_eos=False, return_details=True)
    handle.remove()
    assert sum(fed) == out.prompt_lengths[0] + 10 - 1  # prompt once, each new token once, the last never


def test_entropy_gate_and_diagnostics(tokenizer):
    from tests.conftest import make_model

    model = make_model("qwen2")
    s = PhaseSlipSampler(model, tokenizer, noise_scale=0.3, logit_fusion_alpha=0.45, heads=[(2, 1)])
    out = s.generate(PROMPTS, max_new_tokens=6, seed=1, stop_at_eos=False, return_details=True)
    d = out.diagnostics
    assert d["entropy"].shape == d["clean_weight"].shape == d["kl"].shape == (2, 6)
    expected = 0.45 + 0.55 * torch.sigmoid(2.5 - d["entropy"])
    assert torch.allclose(d["clean_weight"], expected, atol=1e-6)
    assert d["heads"] == [(2, 1)]
    assert (d["kl"] >= -1e-6).all()


def test_calibration_scores_every_head_deterministically(arch_model, tokenizer):
    s = PhaseSlipSampler(arch_model, tokenizer)
    text = "the old king said the sea was dark and the ship came to the town . then the girl saw the lamp"
    cal = s.calibrate_heads(text=text, search_layers=2, num_heads=2, seed=3)
    n_kv = kv_geometry(arch_model)[1]
    assert len(cal.rows) == 2 * n_kv and {(r["layer"], r["head"]) for r in cal.rows} == {(l, h) for l in (2, 3) for h in range(n_kv)}
    assert s.heads == cal.selected and len(cal.selected) == 2
    assert not any(r["excluded"] and r["selected"] for r in cal.rows)
    assert all(r["exploration"] > 0 for r in cal.rows)
    again = PhaseSlipSampler(arch_model, tokenizer).calibrate_heads(text=text, search_layers=2, num_heads=2, seed=3)
    assert again.rows == cal.rows
    assert "| layer |" in cal.table()


def test_calibration_efficiency_prefers_exploration_per_damage(tokenizer):
    from phaselm.sampling.calibration import EFFICIENCY_EPS
    from tests.conftest import make_model

    cal = PhaseSlipSampler(make_model("llama"), tokenizer).calibrate_heads(
        text="the king said the sea was dark and the ship came to the town", search_layers=3, num_heads=1,
        exclude_fraction=0.34)
    kept = [r for r in cal.rows if not r["excluded"]]
    best = max(kept, key=lambda r: r["exploration"] / (max(r["damage"], 0) + EFFICIENCY_EPS))
    assert cal.selected == [(best["layer"], best["head"])]
    worst_damage = max(r["damage"] for r in cal.rows)
    assert [r for r in cal.rows if r["damage"] == worst_damage][0]["excluded"]


@pytest.mark.parametrize("make, name", [
    (lambda m, t: PhaseSlipSampler(m, t).generate(""), "empty"),
    (lambda m, t: PhaseSlipSampler(m, t).generate(["ok", "  "]), "empty"),
    (lambda m, t: PhaseSlipSampler(m, t, heads=[(3, 0)]).generate("the " * 130), "context"),
    (lambda m, t: PhaseSlipSampler(m, t, heads=[(3, 0)]).generate("the king", max_new_tokens=127), "max_new_tokens"),
    (lambda m, t: PhaseSlipSampler(m, t, heads=[(3, 0)]).generate("the king", temperature=0), "temperature"),
    (lambda m, t: PhaseSlipSampler(m, t, noise_scale=-0.1), "noise_scale"),
    (lambda m, t: PhaseSlipSampler(m, t, perturbation_window=0), "perturbation_window"),
    (lambda m, t: PhaseSlipSampler(m, t, heads=[(3, 0)]).generate("the king", top_p=1.2), "top_p"),
    (lambda m, t: PhaseSlipSampler(m, t, heads=[(3, 0)]).generate("the king", top_p=0.0), "top_p"),
    (lambda m, t: PhaseSlipSampler(m, t).calibrate_heads(search_layers=5), "search_layers"),
    (lambda m, t: PhaseSlipSampler(m, t, heads=[(9, 0)]), "out of range"),
    (lambda m, t: PhaseSlipSampler(m, t, fusion="blend"), "fusion"),
])
def test_bad_input_raises_value_error_naming_the_argument(tokenizer, make, name):
    from tests.conftest import make_model

    with pytest.raises(ValueError, match=name):
        make(make_model("llama"), tokenizer)


def test_contrast_fusion_moves_away_from_the_perturbed_pass(tokenizer):
    from tests.conftest import make_model

    model = make_model("gpt2")
    gate = PhaseSlipSampler(model, tokenizer, noise_scale=1.0, heads=[(3, 0)])
    contrast = PhaseSlipSampler(model, tokenizer, noise_scale=1.0, heads=[(3, 0)], fusion="contrast")
    kw = dict(max_new_tokens=1, seed=0, return_details=True)
    # same rotation (same seed): fused(gate) - z_c == -(fused(contrast) - z_c)
    captured = {}
    for name, s in (("gate", gate), ("contrast", contrast)):
        orig = s._next_logits

        def spy(*a, _orig=orig, _name=name, **k):
            captured[_name] = _orig(*a, **k)
            return captured[_name]

        s._next_logits = spy
        s.generate("the king", **kw)
    clean = Sampler(model, tokenizer).generate("the king", do_sample=False, max_new_tokens=1, return_details=True)
    assert not torch.allclose(captured["gate"], captured["contrast"])
    z_c = (captured["gate"] + captured["contrast"]) / 2
    assert int(z_c.argmax()) == clean.token_ids[0][0]


def test_per_prompt_seeds_make_each_generation_independent_of_its_batch(tokenizer):
    from tests.conftest import make_model

    model = make_model("llama")
    s = PhaseSlipSampler(model, tokenizer, noise_scale=1.0, heads=[(2, 0), (3, 1)])
    kw = dict(max_new_tokens=10, temperature=1.0, stop_at_eos=False, return_details=True)
    batched = s.generate(["the king", "the king", "a dark sea"], seed=[5, 6, 7], **kw)
    alone = [s.generate(p, seed=sd, **kw).token_ids[0] for p, sd in (("the king", 5), ("the king", 6), ("a dark sea", 7))]
    assert batched.token_ids == alone
    assert batched.token_ids[0] != batched.token_ids[1]
    with pytest.raises(ValueError, match="seed"):
        s.generate(["a", "b"], seed=[1, 2, 3])


def test_calibration_scores_do_not_depend_on_how_many_groups_share_a_pass(tokenizer):
    """With 1 + 3 groups and 4 attention heads the grown hidden state has B·heads rows: it must not be
    mistaken for a per-(row, head) tensor such as ALiBi biases and repeated again."""
    from tests.conftest import make_model

    model = make_model("llama")
    text = "the old king said the sea was dark and the ship came to the town"
    one = PhaseSlipSampler(model, tokenizer).calibrate_heads(text=text, search_layers=2, groups_per_pass=1)
    three = PhaseSlipSampler(model, tokenizer).calibrate_heads(text=text, search_layers=2, groups_per_pass=3)
    for a, b in zip(one.rows, three.rows):
        assert a["damage"] == pytest.approx(b["damage"], abs=1e-5) and a["exploration"] == pytest.approx(b["exploration"], abs=1e-5)


def test_calibration_defaults_are_the_automatic_rule_on_small_models(tokenizer):
    """calibrate_heads() with its defaults searches min(6, layers) layers and selects min(3, candidates)
    heads: the rule the automatic calibration uses, so a 3-layer or a 1-layer model needs no argument."""
    from phaselm.sampling.calibration import automatic_heads, calibrate_heads
    from tests.conftest import make_model

    text = "the king said the sea was dark and the ship came to the town"
    three = make_model("llama", layers=3)
    cal = PhaseSlipSampler(three, tokenizer).calibrate_heads(text=text)
    assert cal.config["search_layers"] == 3 and len(cal.rows) == 3 * 2 and len(cal.selected) == 3
    one = make_model("llama", layers=1)  # 2 kv heads: both selected, no complaint about num_heads
    auto = automatic_heads(one, tokenizer, text=text)
    assert auto.config["search_layers"] == 1 and auto.selected == [(0, 0), (0, 1)]
    assert auto.rows == calibrate_heads(one, tokenizer, text=text).rows
    with pytest.raises(ValueError, match="num_heads=3 but the last 1 layers have only 2 kv heads"):
        calibrate_heads(one, tokenizer, text=text, num_heads=3)
    out = PhaseSlipSampler(one, tokenizer, noise_scale=0.5).generate("the king", max_new_tokens=2, return_details=True)
    assert out.diagnostics["heads"] == [(0, 0), (0, 1)]


def test_a_short_calibration_text_is_scored_with_a_warning(tokenizer, caplog):
    """A 4-token calibration text gives noisy head scores: it is scored, and one log line states the minimum
    and the fix; the built-in text logs nothing."""
    from phaselm.sampling.calibration import MIN_TOKENS, calibrate_heads
    from tests.conftest import make_model

    model = make_model("llama")
    with caplog.at_level("WARNING", logger="phaselm"):
        calibrate_heads(model, tokenizer, search_layers=1)
        assert not caplog.records
        assert calibrate_heads(model, tokenizer, text="the king said no", search_layers=1).selected
    (record,) = caplog.records
    assert f"is 4 tokens long, under the minimum of {MIN_TOKENS}" in record.getMessage()
    assert "pass a longer text" in record.getMessage() and "\n" not in record.getMessage()
