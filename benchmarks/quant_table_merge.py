"""Add the K-major entries a W4 GEMV probe run measured (benchmarks/gpu_w4_gemv_probe.py's JSON,
``suggested_table["w4a16_g128_kmajor"]``) to a quantized-kernel table (kernels/configs/quant_gemv.json format),
under the probe's device, so an end-to-end run in the same device call serves K-major weights with them:

    python3 benchmarks/quant_table_merge.py BASE_TABLE PROBE_JSON OUT_TABLE

The probe's entry per shape and row count is the K-major kind it measured fastest there: the K-major GEMV, the
K-major tensor-core GEMM (``w4_kmajor_gemm``) or dequantize + cuBLAS (``dequant_mm``). GPTQ-layout entries stay
the base table's (the A/B's baseline is not changed). Entries are checked by kernels/quant_dispatch.py's
``config_from_json`` (and refused if they name a kernel of the GPTQ layout) before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections import Counter  # noqa: E402

from tokenmill.kernels.quant_dispatch import KMAJOR_KERNELS, KMAJOR_SUFFIX, config_from_json  # noqa: E402


def merge(base: dict, probe: dict) -> tuple[dict, Counter]:
    """(base plus the probe's K-major formats under its device, entries added per kernel)."""
    merged = json.loads(json.dumps(base))
    added: Counter = Counter()
    for fmt, shapes in probe.get("suggested_table", {}).items():
        if not fmt.endswith(KMAJOR_SUFFIX):
            continue
        for shape, entries in shapes.items():
            for rows, entry in entries.items():
                config_from_json(entry)
                kernel = entry["kernel"]
                if kernel not in KMAJOR_KERNELS:  # the GEMV: only its kmajor kind reads the K-major layout
                    kernel = f"{kernel} {entry.get('kind')}"
                if kernel not in (*KMAJOR_KERNELS, "w4_gemv kmajor"):
                    raise ValueError(f"probe entry {fmt} {shape} {rows} rows names {kernel!r}, not a K-major kernel")
                merged.setdefault(probe["device"], {}).setdefault(fmt, {}).setdefault(shape, {})[rows] = entry
                added[kernel] += 1
    return merged, added


def main() -> None:
    base_path, probe_path, out_path = (Path(p) for p in sys.argv[1:4])
    base = json.loads(base_path.read_text()) if base_path.exists() else {}
    merged, added = merge(base, json.loads(probe_path.read_text()))
    out_path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    kinds = ", ".join(f"{n} {kernel}" for kernel, n in sorted(added.items())) or "none"
    print(f"{sum(added.values())} K-major entries ({kinds}) from {probe_path} added to {base_path} -> {out_path}")


if __name__ == "__main__":
    main()
