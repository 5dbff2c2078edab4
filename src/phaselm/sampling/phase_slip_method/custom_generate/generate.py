"""Phase-Slip as a transformers custom generation method (``model.generate(custom_generate=...)``).

transformers loads this file from the folder ``phaselm.sampling.CUSTOM_GENERATE_DIR`` when called as

    model.generate(**inputs, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True,
                   noise_scale=0.3, heads=[(3, 0)], do_sample=True, top_k=40)

and calls ``generate(model=model, **every_generate_argument)``. The loop itself lives in the
installed package (:mod:`phaselm.sampling.generation`), so this file is only the entry point.
"""
from phaselm.sampling.generation import phase_slip_generate


def generate(model, *args, **kwargs):
    """Run ``model.generate`` with Phase-Slip as its decoding loop (see phaselm.sampling.generation)."""
    return phase_slip_generate(model, *args, **kwargs)
