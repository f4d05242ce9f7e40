"""Set a field in the paged decode table's entries below a batch, for a same-call A/B of one DecodeConfig option
(kernels/paged_decode_config.py) against the shipped table:

    python3 benchmarks/paged_decode_table_edit.py BASE_TABLE OUT_TABLE --below 128 --set min_partition=64

Every device and KV format; values are JSON (true, 32, "asm"). Each edited entry is checked by
``DecodeConfig.from_json`` before anything is written; the run's env ``TOKENMILL_PAGED_DECODE_CONFIGS=OUT_TABLE``
then serves it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.kernels.paged_decode_config import DecodeConfig  # noqa: E402


def edit(table: dict, below: int, updates: dict) -> tuple[dict, int]:
    """(the table with ``updates`` applied to every entry of a batch < ``below``, how many entries changed)."""
    edited = json.loads(json.dumps(table))
    changed = 0
    for formats in edited.values():
        if not isinstance(formats, dict):  # an alias ("sm_90": "NVIDIA H100 80GB HBM3")
            continue
        for entries in formats.values():
            for batch, entry in entries.items():
                if int(batch) < below:
                    entry.update(updates)
                    DecodeConfig.from_json(entry)
                    changed += 1
    return edited, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--below", type=int, required=True, help="edit the entries of batches below this")
    parser.add_argument("--set", action="append", required=True, metavar="FIELD=JSON", dest="updates")
    args = parser.parse_args()
    updates = {}
    for item in args.updates:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes FIELD=JSON; got {item!r}")
        updates[field] = json.loads(value)
    edited, changed = edit(json.loads(args.base.read_text()), args.below, updates)
    args.out.write_text(json.dumps(edited, indent=1, sort_keys=True) + "\n")
    print(f"{changed} entries below batch {args.below} set {updates} -> {args.out}")


if __name__ == "__main__":
    main()
