"""`tokenmill serve --speculative-config`: the real server on a free loopback port, the real openai client; greedy
text equals plain decoding's, vLLM's spec_decode counters appear on /metrics, a bad config exits with a sentence."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from server_process import REPO_ROOT, ServerProcess, metric_value
from test_spec_engine import TEXTS  # prompts on which the tiny model accepts some n-gram drafts

from tokenmill import SamplingParams
from tokenmill.engine.llm import LLM

PROMPT = TEXTS[1]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
        "adaptive": False}
ENGINE = ["--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "64", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("spec_server") / "server.log"
    process = ServerProcess(tiny_llama_dir, log, *ENGINE, "--speculative-config", json.dumps(SPEC))
    try:
        yield process
    finally:
        process.stop()


def test_greedy_completion_equals_plain_decoding_and_metrics_count_drafts(server, tiny_llama_dir):
    plain = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].text for o in plain.generate(TEXTS, greedy, use_tqdm=False)]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        model = client.models.list().data[0].id
        whole = client.completions.create(model=model, prompt=TEXTS, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True})
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert [choice.text for choice in sorted(whole.choices, key=lambda c: c.index)] == want
    assert streamed == want[1]
    assert whole.usage.completion_tokens == 24 * len(TEXTS)
    with server.client() as http:
        metrics = http.get("/metrics").text
    drafts = metric_value(metrics, "tokenmill:spec_decode_num_drafts_total")
    draft_tokens = metric_value(metrics, "tokenmill:spec_decode_num_draft_tokens_total")
    accepted = metric_value(metrics, "tokenmill:spec_decode_num_accepted_tokens_total")
    first = metric_value(metrics, "tokenmill:spec_decode_num_accepted_tokens_per_pos_total", position="0")
    assert 0 < drafts <= draft_tokens and 0 < accepted <= draft_tokens
    assert accepted >= first > 0


def test_a_bad_speculative_config_exits_with_a_sentence(tiny_llama_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill", "serve", str(tiny_llama_dir), "--device", "cpu", "--port", "0",
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 12}'],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert "num_speculative_tokens must be between 1 and 7" in result.stdout + result.stderr
