"""phaselm's models behave as transformers models where tools expect them to (issue 22 §1).

Properties: hidden_states[-1] feeds the head (logits), hidden_states[i] are the block outputs;
attentions equal the pattern recomputed from the definition (PhaseGPT's with the coherence bias, PMA's
modulated one); return_dict=False is to_tuple(); a fresh model has the weights of phaselm 0.1 for a
seed (digests recorded at commit c91b89c); a tensor missing from a checkpoint is initialised and
reported; an untied head is saved and reloaded exactly; inputs_embeds == input_ids; AutoModel loads
the base model; a chunked cached forward equals the full forward wherever the padding is; assisted
decoding is refused before generating on stateful models and equals greedy on the GPT; generation
past block_size is refused before the first forward.
"""
import hashlib
import inspect
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

import phaselm
from tests.conftest import tiny_phaselm
from phaselm.nn.hooks import run_with_cache

V = 40
KINDS = ["gpt", "gpt_conv", "phasegpt", "pma"]


def build(kind: str, seed: int = 0, **extra):
    return tiny_phaselm(kind, seed, **extra)


def ids_of(b=2, t=10, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- init
def digest(model) -> str:
    """SHA-256 of every state-dict tensor, by name without the base-model prefix (the layout of 0.1)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items(), key=lambda kv: kv[0].removeprefix("model.")):
        h.update(name.removeprefix("model.").encode())
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


# recorded with the code of commit c91b89c (before _init_weights existed), torch.manual_seed(0); the
# three PMA digests re-recorded when Mamba's Δ and A_log inits moved to float64 (float32 exp/log/expm1
# gave last-bit differences between an Intel and an AMD CPU, so the digests held on one vendor only)
INIT_DIGESTS = {
    "gpt": ("c6b1c3671858d31c", lambda: phaselm.GPTForCausalLM(phaselm.GPTConfig(
        vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16))),
    "gpt_bias": ("4040f93a94945e80", lambda: phaselm.GPTForCausalLM(phaselm.GPTConfig(
        vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True))),
    "phasegpt": ("d23bed0183730d21", lambda: phaselm.PhaseGPTForCausalLM(phaselm.PhaseGPTConfig(
        vocab_size=40, block_size=32, n_layer=3, n_head=2, n_embd=16, phase_layers=[1, 2], n_osc=4))),
    "pma": ("04dd1155ca4cad10", lambda: phaselm.PMAForCausalLM(phaselm.create_tiny_config(
        vocab_size=40, block_size=32, n_embd=16, n_head=2, n_layer=3, n_ssm=2, d_state=4))),
    "pma_interleaved": ("4542fce16fe56300", lambda: phaselm.PMAForCausalLM(phaselm.create_tiny_config(
        vocab_size=40, block_size=32, n_embd=16, n_head=2, n_layer=4, n_ssm=2, d_state=4, layout="interleaved",
        bias=True))),
    "pma_constant": ("fc5483e88009f066", lambda: phaselm.PMAForCausalLM(phaselm.create_tiny_config(
        vocab_size=40, block_size=32, n_embd=16, n_head=2, n_layer=3, n_ssm=1, d_state=4, coupling_mode="constant",
        lam_trainable=False, lam_init=0.2))),
}


@pytest.mark.parametrize("case", INIT_DIGESTS)
def test_a_seed_gives_the_weights_it_gave_before_init_weights(case):
    expected, make = INIT_DIGESTS[case]
    torch.manual_seed(0)
    assert digest(make()) == expected


def test_mambas_dt_init_is_the_correctly_rounded_value_of_its_draw():
    """Δ's bias is exp/log/expm1 of a uniform draw; in float32 those differ in the last bit between CPU
    vendors, which made the init digests hold on one machine only. The bias must equal the float64
    (libm) value of the same draw, rounded once to float32, on every machine."""
    from phaselm.nn.mamba import MambaConfig, MambaMixer
    cfg = MambaConfig(d_model=64, d_state=4)
    mixer = MambaMixer(cfg)
    torch.manual_seed(3)
    mixer.reset_dt_parameters()
    torch.manual_seed(3)
    draw = torch.rand(cfg.d_inner).tolist()
    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dts = [math.exp(r * (hi - lo) + lo) for r in draw]
    expected = torch.tensor([dt + math.log(-math.expm1(-dt)) for dt in dts], dtype=torch.float64).float()
    assert torch.equal(mixer.dt_proj.bias.detach(), expected)
    assert torch.equal(mixer.A_log.detach()[0], torch.tensor([math.log(n) for n in range(1, 5)]).float())


@pytest.mark.parametrize("kind, key", [("phasegpt", "model.blocks.1.attn.omega"),
                                       ("phasegpt", "model.blocks.0.attn.proj.weight"),
                                       ("pma", "model.blocks.2.pma.phi_pos"),
                                       ("pma", "model.blocks.0.ssm.dt_proj.bias"),
                                       ("pma", "model.blocks.2.pma.coupling_map.weight"),
                                       ("gpt", "model.wpe.weight")])
def test_a_missing_tensor_is_initialised_and_reported(kind, key, tmp_path):
    model = build(kind)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    reference = weights.pop(key)
    weights["model.not_a_tensor"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {key} and info["unexpected_keys"] == {"model.not_a_tensor"}
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in weights.items() if k in sd)  # the rest loaded as saved
    fresh = sd[key]
    assert torch.isfinite(fresh).all() and fresh.shape == reference.shape
    # initialised from the same distribution as at construction (not uninitialised memory)
    if key.endswith("coupling_map.weight"):
        assert torch.equal(fresh, torch.zeros_like(fresh))  # K starts at coupling_init: W_K = 0
        return
    assert not torch.equal(fresh, reference)
    if key.endswith("dt_proj.bias"):
        dt = torch.nn.functional.softplus(fresh)
        assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    elif key.endswith("phi_pos"):
        assert fresh.abs().max() <= torch.pi and fresh.std() > 1
    else:
        std = {"omega": 0.1, "proj.weight": 0.02 / (2 * 3) ** 0.5, "wpe.weight": 0.02}[next(
            s for s in ("omega", "proj.weight", "wpe.weight") if key.endswith(s))]
        assert 0.5 * std < fresh.std() < 1.5 * std


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_without_tensors_loads_an_initialised_model(kind, tmp_path):
    """Every tensor missing: each one is initialised (finite, the init's statistics) and reported."""
    model = build(kind)
    model.save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(1)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(model.state_dict()) - {"lm_head.weight"} <= info["missing_keys"]  # the tied head follows wte
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    torch.manual_seed(0)
    fresh = type(model)(model.config)
    for (name, got), (_, ref) in zip(loaded.state_dict().items(), fresh.state_dict().items()):
        got, ref = got.float(), ref.float()
        assert torch.isfinite(got).all(), name
        if ref.numel() == 1 or torch.equal(ref, ref.flatten()[0].expand_as(ref)):  # a constant init (norms, K₀, λ₀, ...)
            assert torch.equal(got, ref), name
        elif ref.numel() >= 64:  # a random init: the same spread
            assert 0.7 < got.std() / ref.std() < 1.4, name
        else:
            assert got.abs().max() <= 4 * ref.abs().max(), name


@pytest.mark.parametrize("kind", KINDS)
def test_an_untied_head_is_saved_and_reloaded_exactly(kind, tmp_path):
    model = build(kind, tie_word_embeddings=False)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.lm_head.weight, head) and loaded.lm_head.weight.data_ptr() != \
        loaded.get_input_embeddings().weight.data_ptr()
    ids = ids_of()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_checkpoint_of_the_old_layout_loads(tmp_path):
    """Run folders saved before the base-model split (``wte.weight``, no ``model.`` prefix) load."""
    model = build("phasegpt")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = ids_of()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("kind", KINDS)
def test_hidden_states_are_the_block_outputs_and_the_last_feeds_the_head(kind):
    model = build(kind)
    ids = ids_of()
    out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == model.config.n_layer + 1 and all(h.shape == (2, 10, 16) for h in hs)
    assert torch.allclose(model.lm_head(hs[-1]), out.logits, atol=1e-6)
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in model.blocks]
    model(ids)
    for h in handles:
        h.remove()
    for i in range(model.config.n_layer - 1):
        assert torch.equal(hs[i + 1], seen[i])
    assert torch.equal(hs[-1], model.model.final_norm(seen[-1]))
    base = model.model
    emb = base.wte(ids) + (base.wpe(torch.arange(10)) if kind != "pma" else 0)
    assert torch.equal(hs[0], emb)
    assert model(ids).hidden_states is None and model(ids).attentions is None


def _gpt_pattern(attn, x):
    q, k, _ = attn.split_heads(x)
    s = q @ k.transpose(-1, -2) / attn.head_dim ** 0.5
    t = x.shape[1]
    return s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_attentions_equal_the_pattern_recomputed_from_the_definition(kind):
    model = build(kind)
    ids = ids_of()
    out = model(ids, output_attentions=True, output_hidden_states=True)
    attention_blocks = [i for i, b in enumerate(model.blocks) if not hasattr(b, "ssm")]
    assert len(out.attentions) == len(attention_blocks)  # Mamba blocks have no pattern and no entry
    for att, i in zip(out.attentions, attention_blocks):
        block, x = model.blocks[i], out.hidden_states[i]
        assert att.shape == (2, 2, 10, 10)
        if kind == "pma":  # the explicit path builds A from P_eff and τ by their definitions
            _, cache = run_with_cache(model, ids, names_filter=lambda n: n == f"blocks.{i}.pma.hook_pattern")
            expected = cache[f"blocks.{i}.pma.hook_pattern"]
        elif i in model.phase_layers():  # the coherence bias β·c_ij from the [T, T, N] definition
            expected = block.attn.explicit_scores(block.attention_input(x)).softmax(-1)
        else:
            expected = _gpt_pattern(block.attn, block.attention_input(x))
        assert torch.allclose(att, expected, atol=1e-6)
    assert torch.allclose(out.logits, model(ids).logits, atol=1e-5)  # the eager path computes the same


@pytest.mark.parametrize("kind", KINDS)
def test_attentions_with_a_cache_and_left_padding(kind):
    model = build(kind)
    ids, mask = ids_of(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    cache = DynamicCache(config=model.config)
    model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
    out = model(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True, output_attentions=True)
    for att in out.attentions:
        assert att.shape == (2, 2, 2, 8)
        assert torch.allclose(att.sum(-1), torch.ones(2, 2, 2)) and att[1, :, :, :3].abs().max() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_return_dict_false_gives_the_tuple(kind):
    model = build(kind)
    ids = ids_of()
    full = model(ids, targets=ids, output_hidden_states=True)
    tup = model(ids, targets=ids, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3
    assert torch.equal(tup[0], full.loss) and torch.equal(tup[1], full.logits)
    assert all(torch.equal(a, b) for a, b in zip(tup[2], full.hidden_states))
    base = model.model(ids, return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], full.hidden_states[-1])


# ---------------------------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("kind", KINDS)
def test_inputs_embeds_equal_input_ids(kind):
    model = build(kind)
    ids = ids_of()
    emb = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=emb).logits, model(ids).logits)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=emb)
    out = model.generate(inputs_embeds=emb[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[0], model.generate(ids[:1], max_new_tokens=3, do_sample=False)[0, 10:])


@pytest.mark.parametrize("kind", KINDS)
def test_automodel_loads_the_base_model(kind, tmp_path):
    model = build(kind)
    assert model.base_model is model.model and type(model).base_model_prefix == "model"
    model.save_pretrained(tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(base) is type(model).base_model_class and info["unexpected_keys"] == set()
    ids = ids_of()
    assert torch.equal(base(ids).last_hidden_state, model(ids, output_hidden_states=True).hidden_states[-1])


def test_every_config_builds_with_defaults():
    for cls in (phaselm.GPTConfig, phaselm.PhaseGPTConfig, phaselm.PMAConfig):
        config = cls()
        assert type(config).from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert phaselm.PhaseGPTConfig().phase_layers == [5] and phaselm.PhaseGPTConfig(n_layer=2).phase_layers == [1]
    phaselm.PhaseGPTForCausalLM(phaselm.PhaseGPTConfig(n_layer=2, n_embd=12, n_head=2, n_osc=2, block_size=8))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_honours_config_use_cache(kind):
    model = build(kind)
    ids = ids_of()
    assert model.config.use_cache is False and model(ids).past_key_values is None
    model.config.use_cache = True
    out = model(ids)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 10
    assert model(ids, use_cache=False).past_key_values is None


def test_pma_forward_names_position_ids_and_logits_to_keep():
    model = build("pma")
    params = inspect.signature(model.forward).parameters
    assert {"position_ids", "logits_to_keep", "inputs_embeds", "output_attentions"} <= set(params)
    ids = ids_of()
    # the same numbers up to the BLAS kernel's rounding: the head's [B, 1, C] product may round differently
    # from the [B, T, C] one (equal on the Intel Xeon these tests were written on, 2e-8 apart on an AMD EPYC)
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:], rtol=0, atol=1e-6)
    assert torch.equal(model(ids, position_ids=torch.arange(10).expand(2, -1)).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("kind", ["gpt_conv", "phasegpt", "pma"])
def test_a_chunked_forward_equals_the_full_forward_wherever_the_padding_is(kind):
    """Padding in the prefill (row 0, left), at the start of a continuation chunk after real tokens
    (row 0, positions 4-5: the running Kuramoto sums must count the real tokens, not the position id
    of the first new token) and later inside a chunk (row 1, position 9). float64, so drift shows."""
    model = build(kind).double()
    ids = ids_of(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :2], mask[0, 4:6], mask[1, 9] = 0, 0, 0
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    chunks = [model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True).logits
              for a, b in ((0, 4), (4, 8), (8, 12))]
    assert (torch.cat(chunks, 1) - full)[mask.bool()].abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["phasegpt", "pma"])
def test_assisted_decoding_is_refused_before_generating_on_stateful_models(kind):
    model = build(kind)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    ids = ids_of(1, 6)
    with pytest.raises(ValueError, match="assisted generation is not supported with stateful models"):
        model.generate(ids, prompt_lookup_num_tokens=2, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match="assisted generation is not supported with stateful models"):
        model.generate(ids, assistant_model=build(kind, seed=1), max_new_tokens=4, do_sample=False)
    assert not calls


@pytest.mark.parametrize("kind", ["gpt", "gpt_conv"])  # a short convolution's state is cut back (transformers' crop)
def test_assisted_decoding_and_prompt_lookup_equal_greedy_on_the_gpt(kind):
    model, draft = build(kind), build(kind, seed=1)
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]])
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=8, do_sample=False), greedy)
    assert torch.equal(model.generate(ids, assistant_model=draft, max_new_tokens=8, do_sample=False), greedy)


@pytest.mark.parametrize("kind", KINDS)
def test_generating_past_block_size_is_refused_before_the_first_forward(kind):
    model = build(kind)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"exceeds block_size 32 .*max_new_tokens <= 22"):
        model.generate(ids_of(1, 10), max_new_tokens=23, do_sample=False)
    assert not calls
    assert model.generate(ids_of(1, 10), max_new_tokens=22, do_sample=False).shape == (1, 32)


# ---------------------------------------------------------------------------------------------- the seeds
def test_the_pma_seed_quick_start_runs_with_phaselm_names():
    from phaselm import PhaseModulatedAttentionLM, create_130m_config

    config = create_130m_config(vocab_size=V, n_embd=32, n_layer=3, n_ssm=2, n_head=2, block_size=32, d_state=4)
    model = PhaseModulatedAttentionLM(config).eval()
    input_ids = ids_of()
    plain = model(input_ids).logits
    logits, metrics = model(input_ids, return_metrics=True)
    assert logits.shape == (2, 10, V) and 0 <= metrics["R_mean"] <= 1
    out = model(input_ids, return_metrics=True)
    assert torch.equal(out.logits, logits) and out.metrics["R_mean"] == metrics["R_mean"]
    assert isinstance(model(input_ids, return_metrics=True, return_dict=True), phaselm.models.pma.PMAOutput)
    model.set_coupling_override(K=3.0)
    assert model(input_ids, return_metrics=True)[1]["K"] == {2: pytest.approx(3.0)}
    assert not torch.allclose(model(input_ids).logits, plain)
    model.set_coupling_override(K=None)
    assert torch.equal(model(input_ids).logits, plain)


def test_override_errors_name_classes_that_exist():
    with pytest.raises(TypeError) as err:
        phaselm.set_coupling_override(build("gpt"), K=1.0)
    named = re.findall(r"\b[A-Z]\w*(?:LM|Model)\b", str(err.value))
    assert named and all(hasattr(phaselm, w) for w in named)


def test_phasegpt_phases_are_public_and_are_the_phases_the_layer_used():
    model = build("phasegpt")
    with pytest.raises(ValueError, match="run a forward pass first"):
        model.get_phases()
    ids = ids_of()
    out = model(ids, output_hidden_states=True)
    theta = model.get_phases()
    assert theta.shape == (2, 2, 10, 4)  # [batch, heads, seq_len, num_osc]
    block = model.blocks[2]
    assert torch.equal(theta, block.attn.phases(block.attention_input(out.hidden_states[2])))
    assert model.get_phases(1).shape == (2, 2, 10, 4)
    with pytest.raises(ValueError, match="not a phase layer"):
        model.get_phases(0)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_decodes_with_the_cache_also_after_reloading(kind, tmp_path):
    model = build(kind)
    model.save_pretrained(tmp_path)
    for m in (model, AutoModelForCausalLM.from_pretrained(tmp_path)):
        lengths = []
        m.register_forward_pre_hook(lambda mod, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
        m.generate(ids_of(1, 6), max_new_tokens=3, do_sample=False)
        assert lengths == [6, 1, 1]  # one new token per step: the cache is used


@pytest.mark.parametrize("kind", ["gpt", "phasegpt", "pma"])
def test_initializer_range_scales_the_normal_initialisation(kind):
    """config.initializer_range is the σ of every N(0, σ²) draw (transformers' zero-init test sets
    it to ~0: the Linear and Embedding weights then vanish); the default keeps the old weights."""
    small = build(kind, initializer_range=1e-10)
    for name, module in small.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.dim() == 2:
            if name.endswith(("dt_proj", "coupling_map", "phase_proj")):  # Δ, coupling map: own inits; build() spreads phases
                continue
            assert module.weight.abs().max() < 1e-8, name
    assert digest(build(kind, initializer_range=0.02)) == digest(build(kind))


@pytest.mark.parametrize("kind", ["gpt", "phasegpt", "pma"])
def test_labels_loss_with_num_items_in_batch_sums_to_the_whole_batch_mean(kind):
    """transformers' Trainer under gradient accumulation passes num_items_in_batch (the label count
    of the accumulated batch) and does not divide again: the halves' losses must add up to the
    whole batch's mean loss, as Llama's do."""
    model = build(kind).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    whole = model(ids, labels=labels).loss
    n = int((labels[:, 1:] != -100).sum())
    halves = sum(model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=torch.tensor(n)).loss for i in (0, 2))
    torch.testing.assert_close(halves, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt", "phasegpt", "pma", "mamba"])
def test_disk_offload_with_accelerate_gives_the_in_memory_logits_and_tokens(kind, tmp_path):
    """``device_map="auto"`` with half the model's bytes of memory puts the later blocks on disk
    (accelerate loads each module's weights in its forward hook): the same logits and greedy tokens
    as the model in memory (every weight must be read inside the forward of the module that owns it)."""
    model = tiny_phaselm(kind)
    model.save_pretrained(tmp_path / "run")
    half = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "run", device_map="auto", max_memory={"cpu": half},
                                               offload_folder=tmp_path / "offload").eval()
    assert "disk" in set(off.hf_device_map.values())
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(off(ids).logits, model(ids).logits)
        assert torch.equal(off.generate(ids, max_new_tokens=5, do_sample=False),
                           model.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("kind", ["gpt", "phasegpt", "pma", "mamba"])
def test_activation_checkpointing_recomputes_each_block_and_gives_the_same_loss_and_gradients(kind):
    """``activation_checkpointing_enable()`` (transformers' GradientCheckpointingLayer blocks): each
    block runs again in the backward, and the loss and every gradient equal the run without it, with
    dropout, phase noise, frequency jitter and the coherence regulariser on (the recomputation
    restores the RNG state, so it draws the same noise)."""
    extra = dict(dropout=0.1)
    if kind in ("phasegpt", "pma"):
        extra.update(phase_noise=0.05, freq_jitter=0.05, coherence_reg=0.1)
    ids = torch.randint(1, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for checkpointing in (False, True):
        model = tiny_phaselm(kind, **extra).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls = []
        for block in model.model.blocks:
            next(iter(block.children())).register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(5)
        out = model(ids, labels=ids, use_cache=checkpointing)  # with checkpointing the cache is dropped
        assert out.past_key_values is None  # (the recomputation would update it twice)
        out.loss.backward()
        assert len(calls) == len(model.model.blocks) * (2 if checkpointing else 1)
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = runs
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    assert all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning",
                            "ignore:The tensor attributes:UserWarning")  # the recorded metrics (docs/conformance.md)
@pytest.mark.parametrize("kind", ["gpt", "phasegpt", "pma", "mamba"])
def test_torch_export_and_jit_trace_record_the_model(kind):
    """``torch.export.export`` and ``torch.jit.trace`` record every model (Mamba's scan as its
    sequential loop: the in-place fast scan cannot be recorded), and the recording gives the eager
    logits on new input."""
    model = tiny_phaselm(kind)
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    other = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported = torch.export.export(model, (ids,)).module()
        traced = torch.jit.trace(model, (ids,), strict=False)
        ref = model(other).logits
        assert torch.allclose(exported(other).logits, ref, atol=1e-6)
        assert torch.allclose(traced(other)["logits"], ref, atol=1e-6)
