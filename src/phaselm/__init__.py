"""phaselm: phase dynamics in language models."""
from phaselm.nn.phase_coupled import PhaseCoupledAttention
from phaselm.nn.phase_modulated import PhaseModulatedAttention
from phaselm.interventions import clear_overrides, override, set_coupling_override
from phaselm.models import (
    GPTConfig, GPTForCausalLM, PhaseGPTConfig, PhaseGPTForCausalLM, PMAConfig, PMAForCausalLM, create_130m_config,
    create_tiny_config,
)
from phaselm.pretrained import ModelLoadError, load_causal_lm
from phaselm.sampling import GenerationOutput, HeadCalibration, PhaseSlipSampler, Sampler

__all__ = ["load_causal_lm", "ModelLoadError", "PhaseSlipSampler", "Sampler", "GenerationOutput", "HeadCalibration",
           "GPTConfig", "GPTForCausalLM", "PhaseGPTConfig", "PhaseGPTForCausalLM", "PMAConfig", "PMAForCausalLM",
           "create_130m_config", "create_tiny_config", "PhaseCoupledAttention", "PhaseModulatedAttention",
           "set_coupling_override", "override", "clear_overrides"]
__version__ = "0.1.0"
