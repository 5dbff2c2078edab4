"""phaselm: phase dynamics in language models."""
from phaselm.attention import PhaseCoupledAttention, PhaseModulatedAttention, phase_gpt
from phaselm.interventions import clear_overrides, override, set_coupling_override
from phaselm.models.gpt import GPT, GPTConfig
from phaselm.models.pma import PhaseModulatedAttentionLM, PMAConfig, create_130m_config, create_tiny_config
from phaselm.pretrained import ModelLoadError, load_causal_lm
from phaselm.sampling import GenerationOutput, HeadCalibration, PhaseSlipSampler, Sampler

__all__ = ["load_causal_lm", "ModelLoadError", "PhaseSlipSampler", "Sampler", "GenerationOutput", "HeadCalibration",
           "GPT", "GPTConfig", "phase_gpt", "PhaseCoupledAttention", "PhaseModulatedAttention",
           "PhaseModulatedAttentionLM", "PMAConfig", "create_130m_config", "create_tiny_config",
           "set_coupling_override", "override", "clear_overrides"]
__version__ = "0.1.0"
