"""SpeculativeConfig: vLLM's keys, validated with sentences a user can act on; the CLI flag and LLM kwargs."""

from __future__ import annotations

import argparse
import json

import pytest

from tokenmill.config import EngineConfig, SpeculativeConfig
from tokenmill.engine.cli import add_engine_arguments, engine_kwargs

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


def test_ngram_config_from_json_and_dict():
    config = SpeculativeConfig.parse(json.dumps(NGRAM))
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (
        "ngram", 4, 1, 4)
    assert SpeculativeConfig.parse(NGRAM) == config
    assert SpeculativeConfig.parse(config) is config and SpeculativeConfig.parse(None) is None
    defaults = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    assert 1 <= defaults.prompt_lookup_min <= defaults.prompt_lookup_max


def test_method_is_inferred_like_vllm():
    assert SpeculativeConfig(model="[ngram]", num_speculative_tokens=2).method == "ngram"
    draft = SpeculativeConfig(model="/models/draft", num_speculative_tokens=2)
    assert (draft.method, draft.model) == ("draft_model", "/models/draft")


@pytest.mark.parametrize("value, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "must be one of ngram, draft_model, eagle"),
    ({"method": "eagle", "num_speculative_tokens": 2}, 'method "eagle" needs "model"'),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_vocab_size": 64}, "draft_vocab_size applies to"),
    ({"method": "ngram"}, "num_speculative_tokens must be between 1 and 7"),
    ({"method": "ngram", "num_speculative_tokens": 8}, "between 1 and 7"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, 'needs "model"'),
    ({"num_speculative_tokens": 2}, 'needs "method"'),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo_key": 1}, "unknown speculative_config key"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ("{not json", "must be a JSON object"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_configs_raise_actionable_errors(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_cli_flag_reaches_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative-config", json.dumps(NGRAM)])
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    assert config.speculative == SpeculativeConfig(**NGRAM)
    assert EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([]))).speculative is None


def test_serve_and_bench_throughput_take_the_flag():
    from tokenmill.cli import build_parser

    parser = build_parser()
    serve = parser.parse_args(["serve", "--speculative-config", json.dumps(NGRAM)])
    bench = parser.parse_args(["bench", "throughput", "--speculative-config", json.dumps(NGRAM)])
    assert serve.speculative_config == bench.speculative_config == json.dumps(NGRAM)
