"""phaselm: phase dynamics in language models.

``import phaselm`` registers the three model families (``phaselm_gpt``, ``phaselm_phasegpt``,
``phaselm_pma``) with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, so that
``AutoModelForCausalLM.from_pretrained(run_folder)`` works; that needs torch and transformers'
modelling classes and little else. Every other public name (samplers, loaders, interventions,
building blocks) is imported on first use.
"""

import importlib

from phaselm.models import (  # noqa: F401  (registers the models with the Auto classes)
    GPTConfig, GPTForCausalLM, GPTModel, PhaseGPTConfig, PhaseGPTForCausalLM, PhaseGPTModel,
    PhaseModulatedAttentionLM, PMAConfig, PMAForCausalLM, PMAModel, create_130m_config, create_tiny_config,
)

__version__ = "0.1.0"

_LAZY = {
    "load_causal_lm": "phaselm.pretrained", "ModelLoadError": "phaselm.pretrained",
    "PhaseSlipSampler": "phaselm.sampling", "Sampler": "phaselm.sampling", "GenerationOutput": "phaselm.sampling",
    "HeadCalibration": "phaselm.sampling", "phase_slip_generate": "phaselm.sampling",
    "PhaseCoupledAttention": "phaselm.nn.phase_coupled", "PhaseModulatedAttention": "phaselm.nn.phase_modulated",
    "set_coupling_override": "phaselm.interventions", "override": "phaselm.interventions",
    "clear_overrides": "phaselm.interventions",
}

__all__ = ["GPTConfig", "GPTForCausalLM", "GPTModel", "PhaseGPTConfig", "PhaseGPTForCausalLM", "PhaseGPTModel",
           "PMAConfig", "PMAForCausalLM", "PMAModel", "PhaseModulatedAttentionLM", "create_130m_config",
           "create_tiny_config", *_LAZY]


def _set_coupling_override(self, K=None, layers=None) -> None:
    """``model.set_coupling_override(K, layers=None)``, the PMA seed's method: the same as
    ``phaselm.set_coupling_override(model, K, layers)`` (K replaces K = f(h_SSM) in the chosen PMA
    layers, all by default; ``K=None`` removes the override)."""
    from phaselm.interventions import set_coupling_override

    set_coupling_override(self, K, layers)


PMAForCausalLM.set_coupling_override = _set_coupling_override  # here: interventions sit above the models


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'phaselm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
