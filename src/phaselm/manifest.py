"""SHA-256 manifests of model folders, and their verification (standard library only).

A checkpoint folder (``runs/X/checkpoints/step-000500``) holds ``state.json``: the training state
plus ``files``, the SHA-256 of every other file of the folder, and ``state_sha256``, the digest of
the manifest itself. :func:`write_manifest` writes it, :func:`verify` checks a checkpoint folder
against it, and :func:`verify_folder` checks whatever folder a model is loaded from:

* a checkpoint folder: every file (:func:`verify`);
* a run folder (``runs/X``, whose top-level model files are published copies or hard links of its
  newest checkpoint's): each top-level model file against the manifest of the checkpoint it was
  published from;
* any other folder (a plain Hugging Face folder, a hub name): nothing to check.

This module sits below the models (which call :func:`verify_folder` when loading) and the training
code (which writes and verifies checkpoints), so it imports nothing from phaselm.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST = "state.json"
STEP_NAME = re.compile(r"^step-(\d+)$")
TRAINING_ONLY = ("optimizer.safetensors",)  # checkpoint files that are not published in the run folder


class CheckpointError(ValueError):
    """A checkpoint or run folder is missing files, damaged or does not match its manifest; the
    one-line message names the file."""


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical(state: dict) -> bytes:
    """The manifest's content without its own digest, as hashed bytes (key order independent)."""
    return json.dumps({k: v for k, v in state.items() if k != "state_sha256"}, sort_keys=True).encode()


def write_manifest(folder: Path, state: dict) -> dict:
    """Hash every file of ``folder`` (but the manifest) into ``state["files"]``, add the manifest's
    own digest and write ``folder/state.json``; return the written state."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    state = dict(state, files=files)
    state["state_sha256"] = hashlib.sha256(canonical(state)).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(state, indent=1))
    return state


def read_manifest(folder: Path) -> dict:
    """The ``state.json`` of checkpoint ``folder`` once its own digest checks (its files are not
    hashed here); a :class:`CheckpointError` when it is missing, unreadable or edited."""
    folder = Path(folder)
    where = f"checkpoint {folder}"
    try:
        state = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {MANIFEST} is missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: {MANIFEST} is damaged ({type(err).__name__}); use another "
                              "checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "state_sha256" not in state:
        raise CheckpointError(f"{where}: {MANIFEST} has no file hashes (damaged, or written by an older phaselm); "
                              "use another checkpoint")
    if hashlib.sha256(canonical(state)).hexdigest() != state["state_sha256"]:
        raise CheckpointError(f"{where}: {MANIFEST} was edited or damaged (SHA-256 mismatch); use another checkpoint")
    return state


def verify(folder: Path) -> dict:
    """Check every file of checkpoint ``folder`` against its manifest; return the manifest (state.json).

    Raises :class:`CheckpointError` naming the first missing or damaged file."""
    folder = Path(folder)
    state = read_manifest(folder)
    for rel, digest in state["files"].items():
        file = folder / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing; use another checkpoint")
        if sha256(file) != digest:
            raise CheckpointError(f"checkpoint {folder}: {rel} is damaged or was overwritten (SHA-256 mismatch); "
                                  "use another checkpoint")
    return state


def step_folders(out_dir: str | Path) -> list[Path]:
    """The complete-looking ``checkpoints/step-*`` folders of a run, newest (highest step) first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True) if (p / MANIFEST).is_file()]


def verify_folder(path: str | os.PathLike | None) -> dict | None:
    """Check a folder a model is about to be loaded from (see the module doc); return the manifest
    it was checked against, or None when there is none (not a local folder, or no manifest).

    A run folder passes when its top-level model files all equal those of one of its checkpoints
    (the newest, normally), or holds none of them; otherwise a one-line :class:`CheckpointError`
    names the file."""
    if path is None or not str(path) or not Path(path).expanduser().is_dir():
        return None  # a hub name or a file: transformers resolves it
    folder = Path(path).expanduser()
    if (folder / MANIFEST).is_file():
        return verify(folder)
    checkpoints = step_folders(folder)
    if not checkpoints:
        return None
    digests: dict[str, str | None] = {}  # top-level file -> its SHA-256 (None: missing), hashed once
    first_problem = None
    for ckpt in checkpoints:
        try:
            state = read_manifest(ckpt)
        except CheckpointError as err:
            first_problem = first_problem or str(err)
            continue
        published = {rel: d for rel, d in state["files"].items() if "/" not in rel and rel not in TRAINING_ONLY}
        for rel in published:
            if rel not in digests:
                digests[rel] = sha256(folder / rel) if (folder / rel).is_file() else None
        if not any(digests[rel] for rel in published):
            return None  # nothing was published here (a run from before run folders held the model)
        bad = [rel for rel, d in published.items() if digests[rel] != d]
        if not bad:
            return state
        if first_problem is None:
            what = "is missing" if digests[bad[0]] is None else "is damaged or was overwritten (SHA-256 mismatch)"
            first_problem = (f"run folder {folder}: {bad[0]} {what}: it matches none of the run's checkpoints "
                             f"(the newest is {ckpt.name}); restore it from an intact checkpoint folder under "
                             f"{folder / 'checkpoints'}")
    raise CheckpointError(first_problem)
