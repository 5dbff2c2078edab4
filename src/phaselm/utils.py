"""Helpers shared by every layer (imports nothing from phaselm): the cache folder, atomic file
writes, reading a JSONL log, the record of what ran (provenance), data-parallel sharding under torchrun and the
plotting backend."""

from __future__ import annotations

import json
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


def json_row(line: str) -> dict | None:
    """One JSONL line as a dict; None for a blank, torn (a run killed mid-write) or non-object line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL log such as a run's metrics.jsonl (none when the file is missing), skipping
    lines :func:`json_row` rejects."""
    path = Path(path)
    return [row for line in path.read_text().splitlines() if (row := json_row(line))] if path.exists() else []


def provenance() -> dict:
    """What produced a result: commit (and whether ``src`` had uncommitted changes), machine (with the
    processes of a torchrun launch), CPU, device, and the torch / transformers / Python versions."""
    import torch
    import transformers

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "src")),
            "machine": machine_name(), "cpu": _cpu_name(), "cores": os.cpu_count(), "device": device_name(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def machine_name() -> str:
    """The machine as results record it: architecture, processor, torch threads, and the processes of
    a torchrun launch, e.g. ``x86_64 x86_64 1 threads × 2 processes``."""
    import torch

    _, world = dist_info()
    return (f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
            + (f" × {world} processes" if world > 1 else ""))


def device_name() -> str:
    """The GPU's name where CUDA is available, else ``cpu``."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def wants_cuda(device: str) -> bool:
    """Whether a ``device`` setting (cpu | cuda | cuda:N | auto) means CUDA here."""
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of a torch.distributed launch; ``(0, 1)`` without a process group."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """Every rank's ``obj`` (rank order), on every rank; ``[obj]`` without a process group."""
    import torch

    _, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def batches_for_rank(n_jobs: int, batch_size: int) -> list[range]:
    """The job batches this rank runs: the job list cut into batches of ``batch_size`` (the same cut
    for any world size), dealt round-robin to the ranks, so results do not depend on the world size."""
    rank, world = dist_info()
    cuts = [range(s, min(s + batch_size, n_jobs)) for s in range(0, n_jobs, batch_size)]
    return cuts[rank::world]


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
