"""Samplers: plain decoding and Phase-Slip (its own short path and inside ``model.generate``), with
head calibration."""
from phaselm.sampling.calibration import HeadCalibration, calibrate_heads
from phaselm.sampling.decoding import GenerationOutput, Sampler
from phaselm.sampling.generation import CUSTOM_GENERATE_DIR, phase_slip_decode, phase_slip_generate
from phaselm.sampling.phase_slip import PhaseSlipSampler, PhaseSlipStep
from phaselm.sampling.processors import SamplingConfig

__all__ = ["Sampler", "PhaseSlipSampler", "PhaseSlipStep", "GenerationOutput", "SamplingConfig", "HeadCalibration",
           "calibrate_heads", "phase_slip_generate", "phase_slip_decode", "CUSTOM_GENERATE_DIR"]
