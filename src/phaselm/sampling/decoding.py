"""Batched autoregressive decoding with a KV cache for any transformers causal LM.

:class:`Sampler` is plain decoding (greedy or temperature sampling with top-k / top-p / min-p);
:class:`phaselm.PhaseSlipSampler` subclasses it and replaces only how next-token logits are made.
A list of prompts runs as one batch (left padding, attention mask, position ids from the mask).

Models with learned absolute positions (a learned table of ``max_position_embeddings`` /
``block_size`` entries: GPT-2, phaselm's GPT, PhaseGPT and PMA) generate past their context as nanoGPT
does: each step past it runs the model on the last ``context`` tokens only (a sliding window), recomputed
without a cache, so those steps cost a full forward pass each. Other models (rotary, ALiBi, ...) refuse a
request that does not fit their context.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from phaselm.nn.functional import entropy
from phaselm.pretrained import unsupported_model_reason
from phaselm.sampling.processors import SamplingConfig, check_seed, choose_tokens, process_logits


log = logging.getLogger("phaselm")

_POSITION_TABLE = re.compile(r"(^|\.)(wpe|phi_pos|position_embeddings|embed_positions)(\.|$)")


def sliding_window_context(model) -> int | None:
    """The context length (``max_position_embeddings`` / ``n_positions``; ``block_size`` for phaselm's
    models) of a model whose positions are a learned table of that many entries (a parameter named
    ``wpe``, ``phi_pos``, ``position_embeddings`` or ``embed_positions`` with a dimension of the context
    length, up to OPT's offset of 2): generation slides a window over its last tokens past that context.
    ``None`` for other models (no context length, or positions that are not a learned table)."""
    cfg = model.config
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(ctx, int) or ctx < 1:
        return None
    for name, p in model.named_parameters():
        if _POSITION_TABLE.search(name) and any(ctx <= n <= ctx + 2 for n in p.shape):
            return ctx
    return None


def sampling_entropy(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """``[B]``: entropy in nats of the distribution a token is drawn from (``logits`` after
    temperature / top-k / top-p / min-p); removed tokens contribute 0."""
    return entropy(process_logits(logits, cfg))


@dataclass
class GenerationOutput:
    """Everything a generation produced.

    ``texts[b]``: the continuation of prompt b (prompt not included). ``token_ids[b]``: its token
    ids (EOS included when generated). ``diagnostics``: per-step tensors ``[B, steps]`` (for
    Phase-Slip: ``entropy`` of the clean distribution in nats, ``clean_weight`` α_eff,
    ``kl`` = KL(clean ‖ perturbed) in nats) and ``heads``, the (layer, kv_head) pairs perturbed.
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompt_lengths: list[int]
    new_tokens: int
    seconds: float
    diagnostics: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


class Sampler:
    """Greedy or temperature sampling, batched, with the transformers KV cache.

    >>> sampler = Sampler(model, tokenizer)
    >>> sampler.generate("Once upon a time", max_new_tokens=20, temperature=0.8, top_k=40, seed=0)

    ``cache_implementation="static"`` decodes with a transformers ``StaticCache`` (prompt + new tokens long);
    its one-token steps are then compiled where ``model.generate`` would compile them.

    Past the context of a model with learned absolute positions (:func:`sliding_window_context`), each
    step recomputes the last ``context`` tokens without a cache (:meth:`_window_logits`; logged once per
    sampler), as nanoGPT's ``generate`` does; other models refuse a request longer than their context.
    """

    default_temperature = 1.0
    logits_processor: list = ()
    """Callables ``(input_ids [B, T], scores [B, V]) -> scores`` (transformers ``LogitsProcessor`` s,
    e.g. :mod:`phaselm.sampling.logits_processors`), applied in order to each step's next-token
    logits before temperature / top-k / top-p / min-p; ``input_ids`` = prompt (left-padded) + tokens
    generated so far."""
    record_sampling_entropy = False
    """When True, ``diagnostics["sampling_entropy"]`` gets, per step, the entropy in nats of the
    distribution each token is drawn from (after the processors and the sampling knobs)."""

    def __init__(self, model, tokenizer, logits_processor=None, cache_implementation: str | None = None):
        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be None / 'dynamic' or 'static', got {cache_implementation!r}")
        self.cache_implementation = cache_implementation
        if logits_processor is not None:
            self.logits_processor = list(logits_processor)
        reason = unsupported_model_reason(model)
        if reason:
            raise ValueError(reason)
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise ValueError(f"tokenizer must be the model's tokenizer (load_causal_lm returns both), got "
                             f"{type(tokenizer).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        # a tokenizer without pad and EOS (a char tokenizer): pad with id 0; padding is masked out
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        params = inspect.signature(model.forward).parameters
        self._forward_takes_logits_to_keep = "logits_to_keep" in params
        # state-space models (Mamba, Mamba-2, FalconMamba) take their cache as cache_params
        self._cache_keyword = "past_key_values" if "past_key_values" in params or "cache_params" not in params \
            else "cache_params"
        if cache_implementation == "static" and self._cache_keyword != "past_key_values":
            raise ValueError(f"{type(model).__name__} keeps its own state cache (cache_params); it has no static cache")
        self._step_call = model
        self.sliding_window = sliding_window_context(model)
        self._window_logged = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt_or_prompts: str | list[str],
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | list[int] | None = None,
        do_sample: bool = True,
        stop_at_eos: bool = True,
        return_details: bool = False,
        progress: bool = False,
    ):
        """Continue one prompt (returns a str) or a list of prompts (returns a list of str).

        With ``return_details=True`` returns a :class:`GenerationOutput` (token ids, timings,
        per-step diagnostics). ``seed`` fixes the sampling draws (private generators; the global
        torch RNG is not touched): an int for the whole batch, or one int per prompt, so that each
        generation depends only on its own seed and not on what it is batched with.
        ``do_sample=False`` decodes greedily.
        """
        single = isinstance(prompt_or_prompts, str)
        if not single and not isinstance(prompt_or_prompts, (list, tuple)):
            raise ValueError(f"prompt_or_prompts must be a string or a list of strings, got "
                             f"{type(prompt_or_prompts).__name__}")
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        cfg = SamplingConfig(
            temperature=self.default_temperature if temperature is None else temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            do_sample=do_sample,
        )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = [check_seed("seed", s) for s in (seed if isinstance(seed, (list, tuple)) else [seed])]
        if len(seeds) not in (1, len(prompts)):
            raise ValueError(f"seed: give one int or one per prompt ({len(prompts)}), got {len(seeds)}")
        ids, mask = self.encode(prompts, int(max_new_tokens))
        out = self._decode(ids, mask, int(max_new_tokens), cfg, seeds, stop_at_eos, progress)
        if return_details:
            return out
        return out.texts[0] if single else out.texts

    # ------------------------------------------------------------------ hooks for subclasses
    def _make_cache(self, max_len: int):
        """The decode's cache: a ``DynamicCache``, or a ``StaticCache`` of ``max_len`` slots with
        ``cache_implementation="static"``."""
        from transformers import DynamicCache, StaticCache

        if self.cache_implementation == "static":
            return StaticCache(config=self.model.config, max_cache_len=max_len)
        return DynamicCache(config=self.model.config)

    def _session(self, cache, seeds: list[int], batch: int):
        """Context around the whole decode of ``batch`` rows (subclasses install hooks and seed their
        RNGs here)."""
        return nullcontext()

    def _next_logits(self, cache, input_ids, attention_mask, position_ids, diagnostics, cfg=None) -> torch.Tensor:
        """Next-token logits ``[B, V]`` after feeding ``input_ids [B, 1]`` (``cfg``: the step's
        :class:`SamplingConfig`, for samplers that need the plausible set)."""
        return self._forward(cache, input_ids, attention_mask, position_ids).logits[:, -1].float()

    def _window_logits(self, input_ids, attention_mask, diagnostics, cfg=None) -> torch.Tensor:
        """Next-token logits ``[B, V]`` past the context: one forward pass without a cache over
        ``input_ids [B, context]``, the last ``context`` tokens (nanoGPT's crop; ``attention_mask``:
        their mask, ``None`` without padding)."""
        position_ids = None if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._forward_takes_logits_to_keep else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **extra)
        return out.logits[:, -1].float()

    # ------------------------------------------------------------------ internals
    def _forward(self, cache, input_ids, attention_mask, position_ids, **extra):
        call = self._step_call if input_ids.shape[1] == 1 else self.model  # the prefill is never compiled
        return call(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_keyword: cache},
            **extra,
        )

    def encode(self, prompts: list[str], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` ``[B, T]`` of ``prompts``, or a one-line
        ValueError for an empty prompt or one that cannot fit ``max_new_tokens`` more tokens in the
        model's context (cheap: call it to check a request before anything slow, e.g. calibration).
        A model with a sliding window (:func:`sliding_window_context`) takes any length."""
        if not prompts:
            raise ValueError("prompt_or_prompts is an empty list; pass at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is not a string (got {type(p).__name__}); pass text")
            if not p.strip():
                raise ValueError(f"prompt {i} is empty; pass non-empty text")
        rows = [self.tokenizer(p)["input_ids"] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        lengths = mask.sum(-1)
        if int(lengths.min()) == 0:
            raise ValueError(f"prompt {int(lengths.argmin())} tokenizes to zero tokens; pass non-empty text")
        ctx = self.context_length
        if ctx is not None and self.sliding_window is None:
            longest = int(lengths.max())
            if longest > ctx:
                raise ValueError(
                    f"prompt has {longest} tokens, longer than the model's context of {ctx} tokens; shorten the prompt"
                )
            if longest + max_new_tokens > ctx:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} plus the prompt's {longest} tokens exceeds the model's context "
                    f"of {ctx} tokens; use max_new_tokens <= {ctx - longest}"
                )
        return ids.to(self.device), mask.to(self.device)

    def _log_window(self, prompt_len: int, max_new_tokens: int) -> None:
        """One log line per sampler, before the first decode that will run past the context."""
        if not self._window_logged:
            self._window_logged = True
            log.warning("phaselm: the prompt's %d tokens + max_new_tokens %d exceed the %d-token context of %s "
                        "(learned positions); past it, generation slides a window over the last %d tokens, "
                        "recomputed without a cache each step (slower)", prompt_len, max_new_tokens,
                        self.sliding_window, type(self.model).__name__, self.sliding_window)

    @torch.no_grad()
    def _decode(self, ids, mask, max_new_tokens, cfg, seeds, stop_at_eos, progress) -> GenerationOutput:
        batch, prompt_len = ids.shape
        device = ids.device
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds] if cfg.do_sample else None
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = not bool(mask.all())  # without padding no mask is passed (as generate does): faster attention
        window = self.sliding_window
        # steps with the cache: while prompt + generated tokens fit the context; then a sliding window
        cached_steps = max_new_tokens if window is None else max(0, min(max_new_tokens, window - prompt_len + 1))
        cache = self._make_cache(min(prompt_len + max_new_tokens, window or prompt_len + max_new_tokens))
        # compiled one-token steps where transformers' generate would compile them (a static cache on an accelerator,
        # or model.generation_config.compile_config with _compile_all_devices)
        gen_cfg = self.model.generation_config
        self._step_call = self.model.get_compiled_call(gen_cfg.compile_config) \
            if self._cache_keyword == "past_key_values" and \
            self.model._valid_auto_compile_criteria({"past_key_values": cache}, gen_cfg) else self.model
        diagnostics: dict = {}
        generated = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        eos = torch.tensor(sorted(self.eos_ids), device=device) if self.eos_ids else None
        start = time.perf_counter()
        with self._session(cache, seeds, batch):
            if prompt_len > 1 and cached_steps:  # prefill all but the last prompt token; the loop feeds that one
                extra = {"logits_to_keep": 1} if self._forward_takes_logits_to_keep else {}
                self._forward(cache, ids[:, :-1], mask[:, :-1] if padded else None, position_ids[:, :-1], **extra)
            token, step_mask, step_pos = ids[:, -1:], mask if padded else None, position_ids[:, -1:]
            if cached_steps < max_new_tokens:
                self._log_window(prompt_len, max_new_tokens)
            steps = tqdm(range(max_new_tokens), desc="generating", unit="tok", disable=not progress, leave=False)
            for step in steps:
                if step < cached_steps:
                    logits = self._next_logits(cache, token, step_mask, step_pos, diagnostics, cfg)
                else:
                    if step == cached_steps:
                        self._step_call = self.model  # no compiled calls without the cache
                    seq = torch.cat([ids, generated[:, :step]], dim=-1)[:, -window:]
                    seq_mask = torch.cat([mask, mask.new_ones(batch, step)], dim=-1)[:, -window:]
                    logits = self._window_logits(seq, seq_mask if not bool(seq_mask.all()) else None, diagnostics, cfg)
                if self.logits_processor:
                    seq = torch.cat([ids, generated[:, :step]], dim=-1)
                    for proc in self.logits_processor:
                        logits = proc(seq, logits)
                if self.record_sampling_entropy and cfg.do_sample:
                    diagnostics.setdefault("sampling_entropy", []).append(sampling_entropy(logits, cfg))
                nxt = choose_tokens(logits, cfg, generators)
                nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
                generated[:, step] = nxt
                lengths += (~finished).long()
                if stop_at_eos and eos is not None:
                    finished |= torch.isin(nxt, eos)
                    if bool(finished.all()):
                        break
                token = nxt[:, None]
                if padded:
                    step_mask = torch.cat([step_mask, step_mask.new_ones(batch, 1)], dim=-1)
                step_pos = step_pos + 1
        seconds = time.perf_counter() - start
        token_ids = [generated[b, : int(lengths[b])].tolist() for b in range(batch)]
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
        for key, value in list(diagnostics.items()):
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                diagnostics[key] = torch.stack(value, dim=-1).cpu()
        return GenerationOutput(
            texts=texts,
            token_ids=token_ids,
            prompt_lengths=mask.sum(-1).tolist(),
            new_tokens=int(lengths.sum()),
            seconds=seconds,
            diagnostics=diagnostics,
        )
