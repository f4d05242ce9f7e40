"""benchmarks/gpu_paged_decode_probe.py on the CPU: its table keeps a shape's winner only past --min-gain (else today's
launch) in the format kernels/paged_decode_config.py reads, and its --dry-run runs end to end under
TRITON_INTERPRET=1 (every variant checked against fp32)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.paged_decode_config import CONFIGS_ENV, DecodeConfig, decode_config

ROOT = Path(__file__).resolve().parents[2]


def _probe():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_paged_decode_probe", ROOT / "benchmarks" /
                                                  "gpu_paged_decode_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_paged_decode_probe", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(shape: str, kv: str, batch: int, config: DecodeConfig, us: float) -> dict:
    label = f"today:{config.name}" if config == DecodeConfig() else config.name
    return {"shape": shape, "rows": batch, "kv": kv, "variant": label, "params": config.to_json(), "us": us,
            "pct_of_floor": 50.0}


def test_table_keeps_winners_past_the_gain_and_the_dispatch_reads_it(tmp_path, monkeypatch):
    probe = _probe()
    packed = DecodeConfig(seqs_per_program=4, kv_convert="asm")
    stages = DecodeConfig(num_stages=3)
    results = [_row("maxload_fp8", "fp8", 950, DecodeConfig(), 200.0), _row("maxload_fp8", "fp8", 950, packed, 130.0),
               _row("b256", "bf16", 256, DecodeConfig(), 100.0), _row("b256", "bf16", 256, stages, 98.0)]
    best = probe.best_rows(results)
    assert best["maxload_fp8"]["best"] == packed.name and best["maxload_fp8"]["speedup_vs_today"] == 200 / 130
    results += [_row("b1", "fp8", 1, DecodeConfig(), 20.0), _row("b1", "fp8", 1, stages, 10.0)]
    table = probe.table(probe.best_rows(results), "cpu", min_gain=0.03)
    assert table == {"cpu": {"fp8": {"475": packed.to_json(), "1": stages.to_json(), "2": DecodeConfig().to_json()},
                             "16bit": {"128": DecodeConfig().to_json()}}}
    path = tmp_path / "paged_decode.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    cpu = torch.device("cpu")
    assert decode_config(cpu, torch.float8_e4m3fn, 1024) == decode_config(cpu, torch.float8_e4m3fn, 475) == packed
    assert decode_config(cpu, torch.float8_e4m3fn, 474) == decode_config(cpu, torch.float8_e4m3fn, 2) == DecodeConfig()
    assert decode_config(cpu, torch.float8_e4m3fn, 1) == stages


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter)")
def test_probe_dry_run_checks_every_variant_against_fp32(tmp_path):
    out, configs = tmp_path / "probe.json", tmp_path / "paged_decode.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_paged_decode_probe.py"), "--dry-run",
                    "--shapes", "b256_l540_fp8,b1_l4096_bf16", "--out", str(out), "--configs-out", str(configs)],
                   capture_output=True, text=True, check=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["device"] == "cpu" and not record["failures"] and record["fatal"] is None
    ran = {(r["shape"], r["variant"]) for r in record["results"]}
    assert ("b256_l540_fp8", "today:bn64_w4_s2") in ran and ("b256_l540_fp8", "bn64_w4_s2_asm") in ran
    assert all(r["rel_err"] < 2e-2 for r in record["results"])
    assert set(json.loads(configs.read_text())["cpu"]) == {"fp8", "16bit"}
