"""Add ``val_curve`` to run JSONs written before ``phaselm bench tasks`` recorded it, from the runs'
own training logs.

For each ``OUT/runs/*.json`` without ``val_curve``, the run's work folder (``--work``/<run id>; a
seed-1 run that reused its sweep run, or a per-difficulty record of a mixture run, uses the folder
of the run it came from) is read with the bench's :func:`~phaselm.evaluation.tasks_bench.val_curve`.
The curve is added only if its last val accuracy equals the JSON's own ``val`` accuracy exactly
(the same training), with ``val_curve_source`` naming this script; otherwise the file is left
alone and listed. Run folders that are gone (another machine) are listed too.

    python experiments/backfill_val_curves.py results/tasks/selective_copy --work runs/tasks/selective_copy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phaselm.evaluation.tasks_bench import read_run, val_curve
from phaselm.utils import atomic_write, provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="a bench's --out folder")
    ap.add_argument("--work", required=True, help="its --work folder (checkpoints and metrics.jsonl)")
    args = ap.parse_args()
    source = f"experiments/backfill_val_curves.py at {provenance()['commit']}, from the run's metrics.jsonl"
    added, left = 0, []
    for path in sorted((Path(args.out) / "runs").glob("*.json")):
        record = read_run(path)
        if "val_curve" in record:
            continue
        trained = record.get("trained_on") or record.get("reused") or record["run"]
        curve = val_curve(Path(args.work) / trained.replace("/", "__"))
        if not curve:
            left.append(f"{path.name}: no log in {args.work}")
            continue
        val = record["val"]["accuracy"] if "trained_on" not in record else read_run(
            path.with_name(trained.replace("/", "__") + ".json"))["val"]["accuracy"]
        if curve[-1][1] != val:
            left.append(f"{path.name}: the log's last val accuracy {curve[-1][1]} is not the record's {val}")
            continue
        atomic_write(path, json.dumps({**record, "val_curve": curve, "val_curve_source": source}, indent=1) + "\n")
        added += 1
    print(f"added val_curve to {added} run files; left {len(left)}:")
    for line in left:
        print("  " + line)


if __name__ == "__main__":
    main()
