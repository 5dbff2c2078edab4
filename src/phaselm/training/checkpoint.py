"""Checkpoints without pickles, written atomically and verified on every load.

Layout under ``out_dir/checkpoints/``::

    step-000500/config.json, model.safetensors, tokenizer files, modeling_phaselm.py
                                        a transformers save_pretrained folder: the model (tied
                                        tensors stored once), its config (with ``auto_map``), its
                                        tokenizer and the trust_remote_code shim
    step-000500/optimizer.safetensors   optimiser tensors, and RNG states as uint8 tensors
    step-000500/state.json              config, step, metrics, optimiser param groups, and
                                        ``files``: the SHA-256 of every other file in the folder
    latest                              the name of the newest complete checkpoint (a hint)

and ``out_dir/`` itself holds the newest checkpoint's model files (hard links, or copies), so a
run folder is a save_pretrained folder: ``AutoModelForCausalLM.from_pretrained("runs/pma/tiny")``
(after ``import phaselm``, or anywhere phaselm is installed with ``trust_remote_code=True``).

A checkpoint is written into a temporary folder, renamed into place, and only then does
``latest`` (rewritten through a temp file + ``os.replace``) point at it; a save killed at any
moment leaves the previous checkpoint intact. Loading reads safetensors and JSON only.

Integrity: :func:`save_checkpoint` hashes *every* file of the folder (whatever the folder holds;
new files need no code here) and records the digests, and a digest of the manifest itself, in
``state.json``. :func:`verify` (called by :func:`read_state`, hence by every loader) re-hashes them
and raises :class:`CheckpointError`, a one-line ``ValueError`` naming the file, for a missing,
truncated, garbled or edited file, an edited ``state.json`` included. The manifest helpers live in
:mod:`phaselm.manifest` (below the models, whose loader checks run folders with
:func:`~phaselm.manifest.verify_folder`) and are re-exported here.

Finding checkpoints: :func:`latest_checkpoint` is the newest ``step-*`` folder that has a
``state.json`` (so a checkpoint whose ``latest`` pointer was never written is still found);
:func:`newest_intact` walks back from it to the newest one that verifies (``--resume`` uses it);
:func:`remove_temporaries` deletes folders left by a killed save.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file

from phaselm.manifest import (  # noqa: F401 - re-exported: the manifest helpers live below the models
    MANIFEST, STEP_NAME, TRAINING_ONLY, CheckpointError, sha256, step_folders, verify, verify_folder, write_manifest,
)
from phaselm.utils import atomic_write


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {f"state.{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for idx, st in sd["state"].items() for name, v in st.items()}
    return tensors, sd["param_groups"]


def remove_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary folders and files a killed save left in ``out_dir/checkpoints``."""
    root = Path(out_dir) / "checkpoints"
    leftovers = [p for p in root.glob("*.tmp*")] if root.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


REMOTE_CODE = "modeling_phaselm.py"
_SHIM = '''"""The trust_remote_code entry point of a phaselm model folder (written by phaselm).

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` imports this file through
the folder's ``config.json`` ``auto_map``; it imports the model from the installed phaselm package
(``pip install phaselm``), so the code that runs is the package's, not a copy.
"""
'''


def remote_code(model: torch.nn.Module) -> tuple[dict[str, str], str] | None:
    """``(auto_map, shim source)`` for a phaselm model (None for any other): the Auto classes
    (``AutoConfig``, ``AutoModelForCausalLM``, ``AutoModel`` for the base model) mapped to
    :data:`REMOTE_CODE`, whose source imports those classes from the installed package."""
    base = getattr(model, "base_model", model)
    classes = {"AutoConfig": type(model.config), "AutoModelForCausalLM": type(model)}
    if base is not model:
        classes["AutoModel"] = type(base)
    if not all(cls.__module__.startswith("phaselm.") for cls in classes.values()):
        return None
    stem = REMOTE_CODE.removesuffix(".py")
    auto_map = {auto: f"{stem}.{cls.__name__}" for auto, cls in classes.items()}
    imports = "".join(f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n" for cls in classes.values())
    return auto_map, _SHIM + imports


def _tensors_once(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with each tied weight once, under its source name (``model.wte.weight``,
    not ``lm_head.weight``), as transformers saves them: the base model (``AutoModel``) then finds
    its embedding, and the LM head is tied to it again on loading."""
    tensors = model.state_dict()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in tensors and source in tensors and tensors[target].data_ptr() == tensors[source].data_ptr():
            del tensors[target]
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_pretrained(folder: Path, model: torch.nn.Module, tokenizer=None) -> None:
    """The model as a transformers folder: ``model.safetensors`` (tied tensors once),
    ``config.json``, the tokenizer's files and, where the tokenizer has an end-of-text token,
    ``generation_config.json`` with its bos/eos/pad ids (no progress bars, no pickles).

    ``config.json`` names the class (``architectures``); for a phaselm model it also carries an
    ``auto_map`` to :data:`REMOTE_CODE`, a shim that imports the classes (:func:`remote_code`), so
    that a process that never imported phaselm loads the folder with
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` (phaselm must be
    installed there)."""
    folder = Path(folder)
    save_file(_tensors_once(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        config = copy.deepcopy(model.config)  # the live config keeps no save-time fields
        config.architectures = [type(model).__name__]
        if shim := remote_code(model):
            config.auto_map, source = shim
            (folder / REMOTE_CODE).write_text(source)
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        if getattr(model, "can_generate", lambda: False)() and tokenizer.eos_token_id is not None:
            # generate() then stops at the end-of-text token and pads with it, as for hub models
            from transformers import GenerationConfig

            GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)


def _model_files(folder: Path) -> list[Path]:
    """The save_pretrained files of a checkpoint folder: all but the manifest and the optimiser state."""
    return [p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in TRAINING_ONLY]


def publish(folder: Path, out_dir: Path) -> None:
    """Put the model files of checkpoint ``folder`` into the run folder ``out_dir`` (hard links, or
    copies where links fail), each replaced atomically."""
    for src in _model_files(folder):
        tmp = out_dir / f".{src.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, out_dir / src.name)


def published_files(out_dir: Path) -> list[Path]:
    """The model files :func:`publish` put in the run folder (those named like a checkpoint's)."""
    names = {p.name for folder in step_folders(out_dir) for p in _model_files(folder)}
    return [out_dir / n for n in sorted(names | {"config.json", "model.safetensors"}) if (out_dir / n).is_file()]


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer, rng: dict[str, torch.Tensor],
                    state: dict, keep: int = 2, tokenizer=None) -> Path:
    """Write checkpoint ``step`` atomically (model and ``tokenizer`` as a save_pretrained folder,
    optimiser and RNG state, manifest), publish its model files in ``out_dir``; keep the newest
    ``keep`` checkpoints."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=name + ".tmp-", dir=root))
    try:
        save_pretrained(tmp, model, tokenizer)
        tensors, groups = _optimizer_tensors(optimizer)
        tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng.items()})
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_manifest(tmp, dict(state, step=step, param_groups=groups))
        _fsync_tree(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write(root / "latest", name, durable=True)
    publish(final, Path(out_dir))
    for old in step_folders(out_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest checkpoint folder under a run folder (or the folder itself if it is one), not verified."""
    path = Path(path)
    if (path / MANIFEST).exists() or STEP_NAME.match(path.name) and path.is_dir():
        return path
    found = step_folders(path)
    return found[0] if found else None


def newest_intact(out_dir: str | Path) -> tuple[Path | None, list[str]]:
    """``(folder, problems)``: the newest checkpoint of a run that verifies (None if none does) and
    one line per newer checkpoint that did not."""
    problems = []
    for folder in step_folders(out_dir):
        try:
            verify(folder)
            return folder, problems
        except CheckpointError as err:
            problems.append(str(err))
    return None, problems


def read_state(folder: Path) -> dict:
    """The verified ``state.json`` of ``folder`` (every file of the checkpoint is checked)."""
    return verify(folder)


def _load_error(folder: Path, file: str, err: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {folder}: {file} cannot be read ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})")


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` of a (verified) checkpoint into ``model``."""
    try:
        missing, unexpected = load_model(model, str(Path(folder) / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise _load_error(folder, "model.safetensors", err) from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")


def load_training_state(folder: Path, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the optimiser from ``folder`` (verified first); return ``(state.json, rng tensors)``."""
    state = read_state(folder)
    try:
        tensors = load_file(str(Path(folder) / "optimizer.safetensors"))
    except (SafetensorError, OSError) as err:
        raise _load_error(folder, "optimizer.safetensors", err) from None
    opt_state: dict[int, dict] = {}
    rng = {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "rng":
            rng[rest] = value
        else:
            idx, name = rest.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {folder}: the optimiser state does not match the model ({err})") from None
    return state, rng
