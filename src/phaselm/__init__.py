"""phaselm: phase dynamics in language models."""
from phaselm.pretrained import ModelLoadError, load_causal_lm
from phaselm.sampling import GenerationOutput, HeadCalibration, PhaseSlipSampler, Sampler

__all__ = ["load_causal_lm", "ModelLoadError", "PhaseSlipSampler", "Sampler", "GenerationOutput", "HeadCalibration"]
__version__ = "0.1.0"
