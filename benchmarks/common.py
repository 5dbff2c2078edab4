"""What the speed scripts share: the command line (--device, --repeats, --json), the machine
record, and the closing lines (the JSON file, then ``ratio: X`` as the last line)."""

import argparse
import json

import torch


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
