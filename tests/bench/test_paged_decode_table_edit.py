"""benchmarks/paged_decode_table_edit.py on the shipped paged decode table: the option lands in the entries below
the batch and nowhere else, the architecture alias survives, and the engine's lookup serves the edited table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.kernels import paged_decode_config
from tokenmill.kernels.config_table import device_entries
from tokenmill.kernels.paged_decode_config import SHIPPED_CONFIGS, DecodeConfig

ROOT = Path(__file__).resolve().parents[2]


def _edit_module():
    spec = importlib.util.spec_from_file_location("paged_decode_table_edit",
                                                  ROOT / "benchmarks" / "paged_decode_table_edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_option_is_set_below_a_batch_only(tmp_path):
    out = tmp_path / "edited.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paged_decode_table_edit.py"), str(SHIPPED_CONFIGS),
                    str(out), "--below", "128", "--set", "min_partition=64"], check=True, capture_output=True)
    base, edited = json.loads(SHIPPED_CONFIGS.read_text()), json.loads(out.read_text())
    assert edited["sm_90"] == base["sm_90"]
    seen = 0
    for device, formats in base.items():
        if not isinstance(formats, dict):
            continue
        for fmt, entries in formats.items():
            for batch, entry in entries.items():
                got = edited[device][fmt][batch]
                if int(batch) < 128:
                    assert got == {**entry, "min_partition": 64}
                    seen += 1
                else:
                    assert got == entry
    assert seen > 0
    h100 = ("NVIDIA H100 80GB HBM3",)
    paged_decode_config._lookup.cache_clear()
    try:
        assert paged_decode_config._lookup(str(out), h100, "16bit", 1).min_partition == 64
        assert paged_decode_config._lookup(str(out), h100, "16bit", 300).min_partition == 128
        assert device_entries(edited, ("sm_90",))["fp8"]["1"]["min_partition"] == 64
    finally:
        paged_decode_config._lookup.cache_clear()


def test_an_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown fields"):
        _edit_module().edit(json.loads(SHIPPED_CONFIGS.read_text()), 128, {"min_partitions": 64})
    assert DecodeConfig().min_partition == 128  # plan_decode's default: the launch before the option
