"""Checkpoints without pickles, written atomically.

Layout under ``out_dir/checkpoints/``::

    step-000500/model.safetensors       weights (safetensors, shared/tied tensors handled)
    step-000500/optimizer.safetensors   optimiser tensors, and RNG states as uint8 tensors
    step-000500/state.json              config, step, metrics, optimiser param groups
    latest                              the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, renamed into place, and only then does
``latest`` (rewritten through a temp file + ``os.replace``) point at it; a save killed at any
moment leaves the previous checkpoint as ``latest``. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {f"state.{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for idx, st in sd["state"].items() for name, v in st.items()}
    return tensors, sd["param_groups"]


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer, rng: dict[str, torch.Tensor],
                    state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=name + ".tmp-", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, groups = _optimizer_tensors(optimizer)
        tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng.items()})
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, param_groups=groups), indent=1))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _atomic_text(root / "latest", name)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint folder under a run folder (or the folder itself if it is one)."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    pointer = path / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = path / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def read_state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model (missing {missing}, unexpected {unexpected})")


def load_training_state(folder: Path, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the optimiser from ``folder``; return ``(state.json, rng tensors)``."""
    state = read_state(folder)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    rng = {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "rng":
            rng[rest] = value
        else:
            idx, name = rest.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state, rng
