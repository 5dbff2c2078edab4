"""Samplers: plain decoding and Phase-Slip, with head calibration."""
from phaselm.sampling.calibration import HeadCalibration, calibrate_heads
from phaselm.sampling.decoding import GenerationOutput, Sampler
from phaselm.sampling.phase_slip import PhaseSlipSampler
from phaselm.sampling.processors import SamplingConfig

__all__ = ["Sampler", "PhaseSlipSampler", "GenerationOutput", "SamplingConfig", "HeadCalibration", "calibrate_heads"]
