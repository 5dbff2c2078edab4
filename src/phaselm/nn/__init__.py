"""Building blocks, each mechanism in its own module; they take explicit sizes, never a model config.

* :mod:`~phaselm.nn.functional`: entropy, KL, inverse softplus, the causal running mean.
* :mod:`~phaselm.nn.oscillators`: the Kuramoto core (dynamics, order parameter R, anti-over-sync controls).
* :mod:`~phaselm.nn.attention`: standard causal attention, MLP, pre-LN block, cache plumbing (:class:`LayerInputs`).
* :mod:`~phaselm.nn.phase_coupled`: phase-coupled attention (PhaseGPT).
* :mod:`~phaselm.nn.phase_modulated`: phase-modulated attention (PMA).
* :mod:`~phaselm.nn.mamba`: the pure-PyTorch Mamba block and its selective scans.
* :mod:`~phaselm.nn.hooks`: hook points for activation capture and interventions.
"""
