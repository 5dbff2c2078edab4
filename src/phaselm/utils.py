"""Helpers shared by every layer (imports nothing from phaselm): the cache folder, atomic file
writes, the record of what ran (provenance) and the plotting backend."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of phaselm's caches: ``$PHASELM_CACHE_DIR`` or ``~/.cache/phaselm``."""
    root = os.environ.get("PHASELM_CACHE_DIR") or Path.home() / ".cache" / "phaselm"
    return Path(root).expanduser()


def atomic_write(path: str | os.PathLike, data: str | bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    a reader (or a run killed midway) sees the old file or the new one, never half of one.
    ``durable``: fsync before the rename (checkpoints)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def provenance() -> dict:
    """What produced a result: commit (and whether ``src`` had uncommitted changes), machine,
    device, and the torch / transformers / Python versions."""
    import torch
    import transformers

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "src")),
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed); a clear error if
    matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or reinstall phaselm)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a figure atomically (temporary file, then rename) and close it."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
