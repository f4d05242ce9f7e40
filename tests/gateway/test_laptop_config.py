"""Issue 25 (newcomer path): docs/gateway-laptop.yaml, exactly as shipped (only the port changed), runs on a CPU
box with the embedded model, and the quick-start requests of docs/GATEWAY.md (with max_tokens) are answered.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
import yaml
from gateway_helpers import REPO, run_gateway, wait_ready

from tests.docs.doc_blocks import code_blocks, shell_commands
from tokenmill.gateway.config import GatewayConfig

LAPTOP_CONFIG = REPO / "docs" / "gateway-laptop.yaml"


def test_laptop_config_is_valid():
    config = GatewayConfig.model_validate(yaml.safe_load(LAPTOP_CONFIG.read_text()))
    assert [p.model for p in config.models] == ["embedded", "embedded"]
    assert all("cpu" in p.args for p in config.models)


@pytest.mark.slow
def test_laptop_config_serves_the_quick_start_requests(tmp_path):
    config = yaml.safe_load(LAPTOP_CONFIG.read_text())
    del config["port"]  # run_gateway picks a free one
    with run_gateway(config, tmp_path) as gw:
        wait_ready(gw, "fast", 1, 300)
        wait_ready(gw, "strong", 1, 300)
        assert httpx.get(f"{gw.url}/health", timeout=10).status_code == 200
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200 and resp.headers["x-tokenmill-route-reason"].startswith("auto:")
        assert resp.json()["usage"]["completion_tokens"] <= 32
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused-without-keys", max_retries=0)
        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="auto", stream=True, max_tokens=32, messages=[{"role": "user", "content": "hi"}])]  # fmt: skip
        assert "".join(pieces)
        run_gateway_doc_examples(gw.url.removeprefix("http://"), tmp_path)


def run_gateway_doc_examples(address: str, tmp_path) -> None:
    """docs/GATEWAY.md's quick-start requests, as written, against this gateway instead of localhost:9000."""
    blocks = [(lang, code.replace("localhost:9000", address)) for lang, code in
              code_blocks(REPO / "docs" / "GATEWAY.md", "Quick start (one machine)")]  # fmt: skip
    # `tokenmill gateway ...` lines start the gateway this test already runs from the shipped laptop config.
    commands = [c for lang, code in blocks if lang == "bash" for c in shell_commands(code, ("tokenmill ",))]
    scripts = [code for lang, code in blocks if lang == "python"]
    assert commands and scripts
    for command in commands:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "x-tokenmill" in done.stdout, f"{command}\n{done.stdout}{done.stderr}"
    for script in scripts:
        (tmp_path / "example.py").write_text(script)
        done = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0 and done.stdout, done.stderr
