"""What the GEMV variant probes share (benchmarks/gpu_w4_gemv_probe.py, gpu_fp8_gemv_probe.py): check each variant
against an fp32 reference, time it, record failures without stopping, stop starting work past a time limit, and
relate each result to the bf16 and today's rows of its (shape, rows) case.

Result rows are dicts with ``shape``, ``rows``, ``variant`` (``bf16:...`` and ``today:...`` are the baselines; any
other label is a new variant), ``params`` and ``us``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TOLERANCE = 2e-2  # bf16 output rounding is ~3e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def tag(r: dict[str, Any]) -> str:
    """bf16 / today / new."""
    return r["variant"].split(":")[0] if ":" in r["variant"] else "new"


class GemvProbe:
    """Measurements of one probe run. ``timer(batch_call)`` gives µs per call; ``pct(case, us)`` the share of the
    byte floor a result reaches; ``skip_errors``: exception types recorded as skipped (e.g. out of resources)."""

    def __init__(self, start: float, time_limit_s: float, out: Path, timer: Callable[..., float],
                 pct: Callable[[dict[str, Any], float], float], pct_key: str,
                 skip_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.start = start
        self.time_limit_s = time_limit_s
        self.out = out
        self.timer = timer
        self.pct = pct
        self.pct_key = pct_key
        self.skip_errors = skip_errors
        self.results: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.fatal: str | None = None
        self.copy_rate = float("nan")

    def over_time(self) -> bool:
        return time.monotonic() - self.start > self.time_limit_s or self.fatal is not None

    def measure(self, case: dict[str, Any], label: str, params: dict[str, Any], call, batch_call,
                ref: torch.Tensor | None) -> None:
        """Check ``call()`` twice against ``ref`` (None: the bf16 baseline, not checked; norm-relative and max
        error recorded), then time ``batch_call`` (one call per weight copy). Any exception is recorded, never
        raised."""
        name = f"{case['shape']} rows={case['rows']} {label}"
        if self.over_time():
            self.skipped.append(name)
            return
        row: dict[str, Any] = {**case, "variant": label, "params": params}
        try:
            t0 = time.monotonic()
            outs = [call().float() for _ in range(2)]
            if outs[0].is_cuda:
                torch.cuda.synchronize()
            row["first_calls_s"] = time.monotonic() - t0  # mostly the Triton compile on a variant's first shape
            if ref is not None:
                scale = ref.abs().max().item()
                row["rel_err"] = max(rel_err(o, ref) for o in outs)
                row["max_err"] = max((o - ref).abs().max().item() for o in outs) / scale
                if not (row["rel_err"] < TOLERANCE and row["max_err"] < TOLERANCE):
                    self.failures.append({**row, "error": "mismatch against the fp32 reference"})
                    print(f"MISMATCH {name}: rel {row['rel_err']:.3g} max {row['max_err']:.3g}", flush=True)
                    return
            row["us"] = self.timer(batch_call)
        except Exception as exc:  # a compile error or a bad config must not lose the rest of the probe
            kind = "skipped" if isinstance(exc, self.skip_errors) else "error"
            self.failures.append({**row, kind: f"{type(exc).__name__}: {str(exc)[:2000]}"})
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            if kind == "error" and not any(f["variant"] == label for f in self.failures[:-1]):
                traceback.print_exc(limit=3)  # once a variant
            if "CUDA error" in str(exc) or "illegal" in str(exc).lower():
                self.fatal = f"{name}: {exc}"  # the context is lost: nothing after this can run
            return
        row[self.pct_key] = self.pct(case, row["us"])
        self.results.append(row)

    def run(self, make_weights: Callable[[], dict[str, Any]], rows_list: list[int],
            probe_case: Callable[[GemvProbe, str, Any, int], None], write: Callable[[GemvProbe], None]) -> None:
        """Build the weights, then probe every (rows, shape) case, rows outer (a cut at the time limit loses the
        least needed row counts), ``write(self)`` after each case and at the end; an exception is recorded as
        fatal and what was measured is kept."""
        try:
            weights = make_weights()
            print(f"weights ready at {time.monotonic() - self.start:.0f} s; copy rate {self.copy_rate:.0f} GB/s",
                  flush=True)
            for rows in rows_list:
                for shape, w in weights.items():
                    if self.over_time():
                        self.skipped.append(f"{shape} rows={rows}: time limit")
                        continue
                    probe_case(self, shape, w, rows)
                    write(self)
        except Exception as exc:  # keep what was measured
            self.fatal = self.fatal or f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            write(self)

    def failure_lines(self) -> list[str]:
        failed: dict[str, list[dict[str, Any]]] = {}
        for f in self.failures:
            failed.setdefault(f["variant"], []).append(f)
        lines = []
        for variant, fs in failed.items():
            first = fs[0].get("error") or fs[0].get("skipped")
            lines.append(f"FAILED {variant} in {len(fs)} cases, first: {str(first)[:200]}")
        lines.append(f"{len(self.failures)} failures, {len(self.skipped)} skipped, fatal: {self.fatal}; "
                     f"{time.monotonic() - self.start:.0f} s; wrote {self.out}")
        return lines


def finish_rows(results: list[dict[str, Any]]) -> None:
    """Speedups against the bf16 and today's rows of the same (shape, rows)."""
    base = {(r["shape"], r["rows"], tag(r)): r["us"] for r in results if tag(r) != "new"}
    for r in results:
        for ref in ("bf16", "today"):
            us = base.get((r["shape"], r["rows"], ref))
            r[f"speedup_vs_{ref}"] = us / r["us"] if us else None


def best_per_case(results: list[dict[str, Any]], shape_order: list[str]) -> list[dict[str, Any]]:
    """The fastest new variant per (shape, rows)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["shape"], r["rows"])
        if tag(r) == "new" and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["rows"], shape_order.index(r["shape"])))


def table_lines(results: list[dict[str, Any]], shape_order: list[str], pct_key: str, pct_label: str,
                top: int | None = None) -> list[str]:
    """Per (rows, shape): bf16, today's kernel and the new variants, fastest first (``top`` of them)."""
    lines = [f"{'shape':8} {'rows':>4} {'variant':38} {'us':>8} {pct_label:>7} {'x bf16':>7} {'x today':>8} "
             f"{'rel err':>8}"]
    for rows, _, shape in sorted({(r["rows"], shape_order.index(r["shape"]), r["shape"]) for r in results}):
        rs = sorted((r for r in results if r["rows"] == rows and r["shape"] == shape), key=lambda r: r["us"])
        base = [r for r in rs if tag(r) != "new"]
        for r in base + [r for r in rs if tag(r) == "new"][:top]:
            xb, xt = r.get("speedup_vs_bf16"), r.get("speedup_vs_today")
            lines.append(f"{shape:8} {rows:>4} {r['variant'][:38]:38} {r['us']:8.2f} {r[pct_key]:6.1f}% "
                         f"{xb or float('nan'):6.2f}x {xt or float('nan'):7.2f}x {r.get('rel_err', 0.0):8.1e}")
    return lines
