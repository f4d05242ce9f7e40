"""The measured-config tables' device lookup: a card's own entry, else the one its architecture's key names."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill.kernels import paged_decode_config, quant_dispatch
from tokenmill.kernels.config_table import device_entries, device_keys
from tokenmill.kernels.paged_decode_config import DecodeConfig
from tokenmill.kernels.quant_dispatch import W4GemvConfig

MEASURED = "NVIDIA H100 80GB HBM3"


def test_a_card_without_its_own_entry_takes_its_architectures():
    table = {MEASURED: {"fmt": 1}, "NVIDIA H200": {"fmt": 2}, "sm_90": MEASURED, "sm_80": {"fmt": 3}}
    assert device_entries(table, (MEASURED, "sm_90")) == {"fmt": 1}
    assert device_entries(table, ("NVIDIA H200", "sm_90")) == {"fmt": 2}  # its own entry wins
    assert device_entries(table, ("NVIDIA H20", "sm_90")) == {"fmt": 1}  # the alias
    assert device_entries(table, ("NVIDIA A100", "sm_80")) == {"fmt": 3}  # an architecture's own entries
    assert device_entries(table, ("NVIDIA L4", "sm_89")) == {}  # none: the callers' defaults
    assert device_entries({"sm_90": "gone"}, ("NVIDIA H20", "sm_90")) == {}  # an alias to nothing
    assert device_keys(torch.device("cpu")) == ("cpu",)


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA GH200 480GB"])
def test_shipped_tables_serve_other_hopper_cards_the_h100s_configs(name):
    """An sm_90 card the tables have no entry for gets the H100's measured configs, not untuned defaults."""
    keys = (name, "sm_90")
    h100 = (MEASURED, "sm_90")
    gemv = quant_dispatch._tuned(str(quant_dispatch.SHIPPED_CONFIGS), keys, "w4a16_g128_kmajor", 28672, 4096, 1)
    assert gemv == quant_dispatch._tuned(str(quant_dispatch.SHIPPED_CONFIGS), h100, "w4a16_g128_kmajor", 28672,
                                         4096, 1)
    assert gemv[0] and isinstance(gemv[1], W4GemvConfig)
    for fmt in ("16bit", "fp8"):
        for seqs in (1, 64, 512):
            config = paged_decode_config._lookup(paged_decode_config._SHIPPED_PATH, keys, fmt, seqs)
            assert config == paged_decode_config._lookup(paged_decode_config._SHIPPED_PATH, h100, fmt, seqs)
    assert any(paged_decode_config._lookup(paged_decode_config._SHIPPED_PATH, keys, fmt, 1) != DecodeConfig()
               for fmt in ("16bit", "fp8"))


def test_every_alias_of_the_shipped_tables_names_a_measured_card():
    for path in (quant_dispatch.SHIPPED_CONFIGS, paged_decode_config.SHIPPED_CONFIGS):
        table = json.loads(path.read_text())
        aliases = {k: v for k, v in table.items() if isinstance(v, str)}
        assert aliases == {"sm_90": MEASURED}
        assert all(isinstance(table[v], dict) for v in aliases.values())


def test_every_shipped_quantized_entry_reads_back_as_a_config():
    """Probe-merged entries land in the shipped table by hand: each must parse (config_from_json validates its
    fields), so a typo fails here rather than at a GPU start-up."""
    table = json.loads(quant_dispatch.SHIPPED_CONFIGS.read_text())
    count = 0
    for device, formats in table.items():
        if isinstance(formats, str):
            continue
        for fmt, shapes in formats.items():
            for shape, by_rows in shapes.items():
                for rows, entry in by_rows.items():
                    assert int(rows) > 0, (device, fmt, shape, rows)
                    quant_dispatch.config_from_json(entry)
                    count += 1
    assert count > 0
