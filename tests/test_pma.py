"""PMA: fast path == explicit formula, standard attention at init, causality, hooks, overrides,
metrics, configs and training through the shared trainer."""
import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

import phaselm
from phaselm import PMAForCausalLM, create_130m_config, create_tiny_config, set_coupling_override
from phaselm.evaluation.metrics import fisher_trace
from phaselm.interventions import clear_overrides, override, set_override
from phaselm.models import config_to_dict
from phaselm.nn.attention import CausalSelfAttention
from phaselm.nn.functional import entropy
from phaselm.nn.hooks import run_with_cache, run_with_hooks
from phaselm.nn.phase_modulated import PhaseModulatedAttention
from phaselm.training.config import load_config
from phaselm.training.trainer import Trainer, build_model
from phaselm_cli import main

ROOT = Path(__file__).parent.parent


def layer(**kw):
    torch.manual_seed(0)
    attn = PhaseModulatedAttention(16, 2, block_size=24, kuramoto_steps=3, **kw).double().eval()
    with torch.no_grad():  # spread the phases and make every term matter
        attn.phase_proj.weight.normal_(0, 1.0)
        attn.lam_raw.fill_(0.5) if hasattr(attn, "lam_raw") else None
        attn.alpha_raw.fill_(0.5)
        attn.beta_raw.fill_(0.5)
    return attn


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = create_tiny_config(vocab_size=30, block_size=24, n_embd=16, n_layer=4, n_ssm=2, n_head=2, d_state=4, **kw)
    model = PMAForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for m in model.pma_layers().values():
            m.phase_proj.weight.normal_(0, 1.0)
            m.coupling_map.weight.normal_(0, 0.5) if m.coupling_mode == "context" else None
            m.alpha_raw.fill_(0.5)
            m.beta_raw.fill_(0.5)
    return model


@pytest.mark.parametrize("mode", ["context", "constant"])
def test_fast_path_equals_the_explicit_formula_forward_and_backward(mode):
    attn = layer(coupling_mode=mode)
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 11, 16, dtype=torch.float64)
    fast, slow = attn(x, ctx, explicit=False), attn(x, ctx, explicit=True)
    assert torch.allclose(fast, slow, atol=1e-10)
    g = torch.randn_like(fast)
    params = [p for p in attn.parameters()]
    gf = torch.autograd.grad((fast * g).sum(), [x, *params])
    gs = torch.autograd.grad((slow * g).sum(), [x, *params])
    for a, b in zip(gf, gs):
        assert torch.allclose(a, b, atol=1e-9)


def test_causal_variance_of_p_matches_the_masked_definition():
    torch.manual_seed(1)
    phi, phi_pos = torch.randn(2, 3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    fast = PhaseModulatedAttention.causal_var_p(phi, phi_pos)
    p = torch.cos(phi[..., :, None] - phi_pos[None, :, None, :])
    for i in range(9):
        assert torch.allclose(fast[..., i], p[..., i, : i + 1].var(-1, unbiased=False), atol=1e-12)


def test_at_initialisation_pma_is_close_to_standard_attention():
    torch.manual_seed(0)
    pma, std = PhaseModulatedAttention(64, 4, block_size=64).eval(), CausalSelfAttention(64, 4).eval()
    for m in (pma, std):  # the models' init: N(0, 0.02) weights
        for lin in (m.qkv, m.proj):
            torch.nn.init.normal_(lin.weight, std=0.02)
    torch.nn.init.normal_(pma.phase_proj.weight, std=0.02)
    pma.reset_parameters_after_init()
    std.load_state_dict({k: v for k, v in pma.state_dict().items() if k.startswith(("qkv", "proj"))})
    x = torch.randn(3, 64, 64)
    a, b = pma(x), std(x)
    assert (a - b).abs().max() < 0.02 * b.abs().max()


@pytest.mark.parametrize("layout", ["ssm_first", "interleaved"])
def test_the_hybrid_lm_is_causal(layout):
    model = tiny_lm(layout=layout)
    x = torch.randint(0, 30, (2, 20))
    y = x.clone()
    y[:, 11:] = torch.randint(0, 30, (2, 9))
    for explicit in (False, True):
        lx = model(x, return_metrics=explicit).logits
        ly = model(y, return_metrics=explicit).logits
        assert torch.allclose(lx[:, :11], ly[:, :11], atol=1e-10)
        assert not torch.allclose(lx[:, 11:], ly[:, 11:])


def test_layouts_and_ablation_shapes():
    assert create_tiny_config().block_types() == ["ssm"] * 4 + ["pma"] * 2
    assert create_tiny_config(layout="interleaved").block_types() == ["ssm", "ssm", "pma", "ssm", "ssm", "pma"]
    assert create_tiny_config(n_ssm=0).block_types() == ["pma"] * 6
    with pytest.raises(StrictDataclassError, match="n_ssm"):
        create_tiny_config(n_ssm=7)


def test_metrics_are_returned_and_in_range():
    model = tiny_lm()
    x = torch.randint(0, 30, (2, 12))
    out = model(x, return_metrics=True)
    logits, m = out.logits, out.metrics
    assert set(m["R"]) == {2, 3} and 0 <= m["R_mean"] <= 1
    assert all(0 < v <= math.log(12) + 1e-9 for v in m["attention_entropy"].values())
    assert all(v > 0 for v in m["tau"].values()) and all(0 <= v < 0.5 for v in m["lam"].values())
    assert m["next_token_entropy"] == pytest.approx(float(entropy(logits.detach()).mean()))
    plain = model(x).logits
    assert torch.allclose(plain, logits, atol=1e-10)  # metrics use the explicit path, same result


def test_hook_names_cache_and_a_bad_name():
    model = tiny_lm()
    names = model.hook_names()
    for n in ("hook_K", "hook_phi", "hook_R", "hook_tau", "hook_lam", "hook_P", "hook_pattern"):
        assert f"blocks.2.pma.{n}" in names
    x = torch.randint(0, 30, (1, 10))
    out, cache = run_with_cache(model, x, names_filter=lambda n: n.startswith("blocks.3"))
    logits = out.logits
    assert cache["blocks.3.pma.hook_pattern"].shape == (1, 2, 10, 10)
    assert torch.allclose(cache["blocks.3.pma.hook_pattern"].sum(-1), torch.ones(1, 2, 10, dtype=torch.float64))
    assert torch.allclose(logits, model(x).logits, atol=1e-10)
    with pytest.raises(KeyError, match="no hook point named 'blocks.3.pma.hook_Q'"):
        run_with_hooks(model, x, fwd_hooks=[("blocks.3.pma.hook_Q", lambda t, h: t)])


def test_hooks_are_removed_after_an_error():
    model = tiny_lm()
    x = torch.randint(0, 30, (1, 10))

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(model, x, fwd_hooks=[("blocks.2.pma.hook_tau", boom)])
    assert not any(p.active for p in model.modules() if hasattr(p, "active"))


@pytest.mark.parametrize("target, value", [("K", 3.0), ("R", 0.1), ("tau", 2.0), ("lam", 0.4), ("phi", 1.0),
                                           ("phi_pos", 0.0)])
def test_each_override_changes_the_logits_and_removing_it_restores_them(target, value):
    model = tiny_lm()
    x = torch.randint(0, 30, (2, 14))
    base = model(x).logits
    with override(model, **{target: value}):
        changed = model(x).logits
    assert (changed - base).abs().max() > 1e-6
    assert torch.equal(model(x).logits, base)
    set_override(model, target, value, layers=[3])
    assert not torch.equal(model(x).logits, base)
    clear_overrides(model)
    assert torch.equal(model(x).logits, base)


def test_set_coupling_override_acts_on_the_kuramoto_steps():
    model = tiny_lm()
    x = torch.randint(0, 30, (1, 16))
    _, before = run_with_cache(model, x, names_filter=lambda n: n.endswith(("hook_K", "hook_phi")))
    set_coupling_override(model, K=3.0)
    _, after = run_with_cache(model, x, names_filter=lambda n: n.endswith(("hook_K", "hook_phi")))
    assert torch.all(after["blocks.2.pma.hook_K"] == 3.0)
    assert not torch.allclose(after["blocks.2.pma.hook_phi"], before["blocks.2.pma.hook_phi"])
    set_coupling_override(model, K=None)
    _, again = run_with_cache(model, x, names_filter=lambda n: n.endswith("hook_K"))
    assert torch.equal(again["blocks.2.pma.hook_K"], before["blocks.2.pma.hook_K"])
    with pytest.raises(ValueError, match="not PMA blocks"):
        set_coupling_override(model, K=1.0, layers=[0])


def test_gradients_reach_every_phase_parameter():
    model = tiny_lm().train()
    x = torch.randint(0, 30, (2, 12))
    model(x, x).loss.backward()
    pma = model.pma_layers()[2]
    for name in ("omega", "phi_pos", "lam_raw", "tau_raw", "alpha_raw", "beta_raw", "coupling_map.weight",
                 "phase_proj.weight"):
        grad = dict(pma.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.blocks[0].ssm.A_log.grad.abs().sum() > 0


def test_fisher_trace_matches_a_direct_computation():
    model = tiny_lm()
    x = torch.randint(0, 30, (2, 10))
    y = torch.tensor([3, 7])
    ft = fisher_trace(model, x, targets=y)
    direct = 0.0
    for b in range(2):
        logp = torch.log_softmax(model(x[b: b + 1]).logits[0, -1], -1)
        grads = torch.autograd.grad(logp[y[b]], model.phase_parameters(), allow_unused=True)
        direct += sum(float((g ** 2).sum()) for g in grads if g is not None) / 2
    assert ft == pytest.approx(direct, rel=1e-9) and ft > 0
    assert fisher_trace(model, x, samples=3, generator=torch.Generator().manual_seed(0)) > 0


def test_published_api_is_exported_from_phaselm():
    for name in ("PMAForCausalLM", "PMAConfig", "create_130m_config", "create_tiny_config", "set_coupling_override"):
        assert name in phaselm.__all__
    cfg = create_130m_config()
    assert (cfg.n_embd, cfg.n_layer, cfg.vocab_size) == (768, 24, 49152)


@pytest.mark.parametrize("yaml_name, factory", [("130m.yaml", create_130m_config), ("tiny.yaml", create_tiny_config)])
def test_yaml_twins_equal_the_python_configs(yaml_name, factory):
    run = load_config(ROOT / "configs" / "pma" / yaml_name)
    assert config_to_dict(build_model(run, factory().vocab_size).config) == config_to_dict(factory())


def test_pma_trains_with_the_shared_trainer_and_logs_r(tmp_path):
    cfg = load_config(ROOT / "configs" / "pma" / "tiny.yaml", [
        f"train.out_dir={tmp_path / 'run'}", "train.max_iters=3", "train.eval_interval=3", "train.batch_size=2",
        "train.eval_max_tokens=200", "train.log_interval=1", "model.n_embd=16", "model.n_head=2",
        "model.block_size=16", "model.d_state=2", "model.coherence_reg=0.1", "model.coherence_target=0.0"])
    Trainer(cfg, progress=False).train()
    rows = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert '"layer5.R_mean"' in rows[-1] and '"coherence_reg"' in rows[-1]
    model = build_model(cfg, 65)
    assert isinstance(model, PMAForCausalLM)


def test_intervention_report_on_a_trained_run(tmp_path):
    from phaselm.evaluation import pma_report

    cfg = load_config(ROOT / "configs" / "pma" / "tiny.yaml", [
        f"train.out_dir={tmp_path / 'run'}", "train.max_iters=2", "train.eval_interval=2", "train.batch_size=2",
        "train.eval_max_tokens=100", "model.n_embd=16", "model.n_head=2", "model.block_size=16", "model.d_state=2"])
    Trainer(cfg, progress=False).train()
    assert main(["report", "interventions", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--prompts", "2"]) == 0
    result = json.loads((tmp_path / "rep" / "intervention.json").read_text())
    run = result["per_run"][0]
    assert set(run["K"]) == {"shakespeare", "shuffled", "repetitive", "modern"}
    for kind, rows in run["K"].items():
        assert [r["K"] for r in rows] == pma_report.K_GRID
        assert all(0 <= r["R_measured"] <= 1 and r["fisher_trace"] >= 0 and r["entropy"] > 0 for r in rows)
    assert (tmp_path / "rep" / "intervention.png").stat().st_size > 1000


def test_interpret_refuses_a_pma_model_in_one_line(tmp_path):
    from phaselm.evaluation.interpret import interpret
    from phaselm.models import PMAForCausalLM, create_tiny_config
    from phaselm.data.datasets import TextTokenizer

    model = PMAForCausalLM(create_tiny_config(n_layer=2, n_ssm=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="PMAForCausalLM.*no phase layers.*PhaseGPT.*phaselm report interventions"):
        interpret(model, TextTokenizer.from_text("abc"), "abcabc", tmp_path / "i")
    assert not (tmp_path / "i").exists()
