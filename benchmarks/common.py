"""What the speed scripts share: the one timing helper (:func:`seconds`, :func:`median_seconds`),
the command line (--device, --repeats, --json), the machine record, and the closing lines (the
JSON file, then ``ratio: X`` as the last line)."""

import argparse
import json
import statistics
import time

import torch


def _sync(device) -> None:
    if "cuda" in str(device):
        torch.cuda.synchronize()


def seconds(fn, device="cpu") -> float:
    """Wall time of one call ``fn()``, with the device's queued work drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def median_seconds(fn, repeats: int = 3, device="cpu", warmup: int = 1) -> float:
    """Median of ``repeats`` timings of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def arg_parser(doc: str, repeats: int = 3) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return ap


def machine(args) -> dict:
    return {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}


def finish(res: dict, args, ratio: float, digits: int = 2) -> None:
    """Write ``res`` to ``--json`` (if given) and print the ratio as the last line."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"ratio: {ratio:.{digits}f}")
