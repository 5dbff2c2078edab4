"""Phase-Slip inside transformers' ``model.generate``: a custom decoding loop.

Two ways in, both offline:

* ``phaselm.sampling.phase_slip_generate(model, **inputs, noise_scale=0.3, heads=[(3, 0)], top_k=40,
  do_sample=True, ...)`` — or, the transformers convention for custom generation methods, the
  folder shipped in the package (``phaselm.sampling.CUSTOM_GENERATE_DIR``, holding
  ``custom_generate/generate.py``): ``model.generate(**inputs, custom_generate=CUSTOM_GENERATE_DIR,
  trust_remote_code=True, noise_scale=0.3, ...)``.
* ``model.generate(**inputs, custom_generate=phaselm.sampling.phase_slip_decode, noise_scale=0.3, ...)``
  (the callable form; transformers 5.x does not hand a ``streamer`` to callables, so stream
  through one of the two forms above).

``generate`` prepares everything as for plain sampling — the logits processors built from the
generation config (temperature, top-k, top-p, min-p, repetition penalty, no-repeat n-gram, bad
words, ...), the stopping criteria (max length, ``eos_token_id``, stop strings), the attention mask of
a left-padded batch, position ids and the cache — and :func:`phase_slip_decode` runs the loop of
``GenerationMixin._sample`` with one change: the next-token logits are Phase-Slip's fused logits
(:class:`phaselm.sampling.phase_slip.PhaseSlipStep`, the same step as
:class:`phaselm.PhaseSlipSampler`). The prompt's last token is held back from the prefill so that
its pass, which makes the first new token's logits, carries the perturbed rows too (each token is
fed exactly once). ``return_dict_in_generate=True`` returns ``scores`` (processed fused logits) and
``logits`` (raw fused logits), one ``[B, V]`` tensor per step, like ``_sample``.

Phase-Slip's settings are ``generate`` keyword arguments, or attributes of the ``GenerationConfig``
(``GenerationConfig(noise_scale=0.3, heads=[(3, 0)], ...)``); a keyword wins. Rotations come from
their own generator, seeded by ``rotation_seed`` (default: ``torch.initial_seed()``), so the token draws
use the global torch RNG exactly as ``model.generate(do_sample=True)`` does: with ``noise_scale=0`` the
two give the same tokens for the same ``torch.manual_seed``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from phaselm.sampling.calibration import automatic_heads
from phaselm.sampling.kv import check_cache
from phaselm.sampling.phase_slip import PhaseSlipStep
from phaselm.sampling.processors import check_seed

CUSTOM_GENERATE_DIR = str(Path(__file__).parent / "phase_slip_method")
"""Folder holding ``custom_generate/generate.py``: pass it as ``model.generate(custom_generate=...)``."""

DEFAULTS = dict(noise_scale=0.03, logit_fusion_alpha=0.45, perturbation_window=12, entropy_center=2.5, heads=None,
                fusion="gate", plausible_only=False, rotation_seed=None)
"""Phase-Slip's ``generate`` keywords and their defaults (``heads=None``: calibrated on first use)."""


def _setting(name, value, generation_config):
    if value is not None:
        return value
    return getattr(generation_config, name, None) if getattr(generation_config, name, None) is not None else DEFAULTS[name]


@torch.no_grad()
def phase_slip_decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    noise_scale: float | None = None,
    logit_fusion_alpha: float | None = None,
    perturbation_window: int | None = None,
    entropy_center: float | None = None,
    heads: list[tuple[int, int]] | None = None,
    fusion: str | None = None,
    plausible_only: bool | None = None,
    rotation_seed: int | list[int] | None = None,
    tokenizer=None,
    **model_kwargs,
):
    """The decoding loop ``model.generate`` calls with ``custom_generate=phase_slip_decode``.

    ``input_ids [B, T]`` (left-padded prompts), the prepared ``logits_processor`` /
    ``stopping_criteria`` / ``generation_config`` and ``model_kwargs`` (``past_key_values``,
    ``attention_mask``, ``position_ids``, ...) come from ``generate``; the Phase-Slip keywords are
    :class:`PhaseSlipStep`'s. Without ``heads`` the heads are calibrated on first use
    (:func:`~phaselm.sampling.calibration.automatic_heads`, cached per model; ``tokenizer`` tokenises its
    text), after every argument is checked. Returns ``input_ids [B, T + new]`` or a
    ``GenerateDecoderOnlyOutput``.
    """
    cfg = generation_config
    settings = {k: _setting(k, v, cfg) for k, v in dict(
        noise_scale=noise_scale, logit_fusion_alpha=logit_fusion_alpha, perturbation_window=perturbation_window,
        entropy_center=entropy_center, heads=heads, fusion=fusion, plausible_only=plausible_only,
        rotation_seed=rotation_seed).items()}
    check_generation_mode(cfg)
    seed = settings.pop("rotation_seed")
    step = PhaseSlipStep(model, **settings)
    if synced_gpus:
        raise ValueError("Phase-Slip does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)")
    if not model_kwargs.get("use_cache", True):
        raise ValueError("Phase-Slip needs the model's cache; do not pass use_cache=False")
    batch, prompt_len = input_ids.shape
    seeds = _rotation_seeds(seed, batch)
    if model_kwargs.get("past_key_values") is not None:
        check_cache(model_kwargs["past_key_values"])  # a quantised / offloaded cache: refused before any pass
    if step.heads is None:
        step.heads = step.check_heads(automatic_heads(model, tokenizer).selected)

    pad = cfg._pad_token_tensor
    has_eos_stop = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    keep_scores = cfg.return_dict_in_generate and cfg.output_scores
    keep_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores, raw = (), ()
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)

    if prompt_len > 1:  # prefill all but the last prompt token (clean only); the first step feeds that one
        inputs = model.prepare_inputs_for_generation(input_ids[:, :-1], is_first_iteration=True,
                                                     **_drop_last(model_kwargs))
        prefill = model(**inputs, return_dict=True)
        if model_kwargs.get("past_key_values") is None:  # models that create their own cache in forward
            model_kwargs["past_key_values"] = prefill.past_key_values
    if model_kwargs.get("past_key_values") is None:
        from transformers import DynamicCache

        model_kwargs["past_key_values"] = DynamicCache(config=model.config)
    # compiled decoding steps exactly where transformers' own loop compiles them (a static cache on an accelerator,
    # or generation_config.compile_config with _compile_all_devices); the prefill stays eager, as in _sample
    forward = model.get_compiled_call(cfg.compile_config) if model._valid_auto_compile_criteria(model_kwargs, cfg) \
        else model.__call__
    with step.session(model_kwargs["past_key_values"], seeds, batch):
        first = True
        while True:
            inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1,
                                                         is_first_iteration=first and prompt_len == 1, **model_kwargs)
            outputs = {}

            def run():
                outputs["out"] = forward(**inputs, return_dict=True)
                return outputs["out"]

            logits = step(run, batch, plausible=lambda z: torch.isfinite(logits_processor(input_ids, z.clone())))
            model_kwargs = model._update_model_kwargs_for_generation(
                outputs["out"], model_kwargs, is_encoder_decoder=False)
            first = False
            next_scores = logits_processor(input_ids, logits)
            if keep_scores:
                scores += (next_scores,)
            if keep_logits:
                raw += (logits,)
            if cfg.do_sample:
                next_tokens = torch.multinomial(next_scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                next_tokens = next_scores.argmax(-1)
            if has_eos_stop:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores if keep_scores else None)
            if unfinished.max() == 0:
                break
    if streamer is not None:
        streamer.end()
    if cfg.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores if keep_scores else None,
                                         logits=raw if keep_logits else None,
                                         past_key_values=model_kwargs.get("past_key_values"))
    return input_ids


def _drop_last(model_kwargs: dict) -> dict:
    """``model_kwargs`` for the prompt without its last token (mask and position ids cut by one)."""
    out = dict(model_kwargs)
    for key in ("attention_mask", "position_ids", "token_type_ids"):
        if out.get(key) is not None:
            out[key] = out[key][..., :-1]
    return out


def _rotation_seeds(seed, batch: int) -> list[int]:
    if seed is None:
        return [torch.initial_seed() % 2**62]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    if len(seeds) not in (1, batch):
        raise ValueError(f"rotation_seed: give one int or one per row ({batch}), got {seed!r}")
    return [check_seed("rotation_seed", s) for s in seeds]


def check_generation_mode(generation_config, assistant_model=None) -> None:
    """Raise a one-line ``ValueError`` unless ``generate``'s settings ask for sampling or greedy decoding,
    the two loops Phase-Slip implements (not beam search, contrastive search, assisted decoding, DoLa,
    group or constrained beam search)."""
    from transformers.generation.configuration_utils import GenerationMode

    mode = generation_config.get_generation_mode(assistant_model)
    if mode not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
        raise ValueError(f"Phase-Slip implements sampling and greedy decoding only, but these settings ask for "
                         f"{mode.value.replace('_', ' ')}; drop num_beams / penalty_alpha / assistant_model / "
                         "prompt_lookup_num_tokens / dola_layers / constraints")


def phase_slip_generate(model, *args, **kwargs):
    """``model.generate(*args, **kwargs)`` with Phase-Slip as the decoding loop (module doc).

    Takes everything ``generate`` takes (``input_ids``, ``attention_mask``, ``generation_config``,
    ``max_new_tokens``, ``do_sample``, ``top_k``, ``streamer``, ``return_dict_in_generate``, ...) plus
    Phase-Slip's keywords (:data:`DEFAULTS`).
    """
    for key in ("custom_generate", "trust_remote_code"):
        kwargs.pop(key, None)
    ours = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULTS}
    if kwargs.get("assistant_model") is not None:  # generate drops it before calling a custom loop
        check_generation_mode(GenerationConfig(), kwargs["assistant_model"])
    # transformers hands `streamer` and `tokenizer` only to its own loops, so bind them here
    loop = functools.partial(phase_slip_decode, streamer=kwargs.get("streamer"), tokenizer=kwargs.get("tokenizer"),
                             **ours)
    return model.generate(*args, custom_generate=loop, **kwargs)
