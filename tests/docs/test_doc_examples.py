"""Issue 25 (newcomer path): the README's examples run as written against the server `make serve` starts (the
embedded SmolLM2 on CPU), only its address changed to the free port the test's server got."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.docs.doc_blocks import code_blocks, shell_commands
from tests.server_process import REPO_ROOT, ServerProcess

README = REPO_ROOT / "README.md"
README_ADDRESS = "127.0.0.1:8000"  # where `make serve` listens, as the README's examples say


@pytest.fixture(scope="module")
def make_serve_server(smollm2_server):
    """`make serve` runs `tokenmill serve` with no arguments; here on a free port instead of 8000 (one server per
    session, tests/conftest.py)."""
    return smollm2_server


def _address(server: ServerProcess) -> str:
    return server.url.removeprefix("http://")


def run_section(section: str, address: str, tmp_path, prelude: str = "") -> list[str]:
    """Run every block of a README section in order (the python blocks as one script after ``prelude``, since later
    blocks use the names earlier ones define); returns the outputs of the shell commands, then the script's."""
    outputs, script = [], ""
    for language, code in code_blocks(README, section):
        code = code.replace(README_ADDRESS, address)
        if language == "bash":
            for command in shell_commands(code):
                done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, f"{command}\n{done.stderr}"
                outputs.append(done.stdout)
        elif language == "python":
            script += code + "\n"
    if script:
        path = tmp_path / "example.py"
        path.write_text(prelude.replace(README_ADDRESS, address) + "\n" + script)
        done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, f"{script}\n{done.stderr}"
        outputs.append(done.stdout)
    return outputs


@pytest.mark.slow
def test_readme_talk_to_the_server_examples_run_as_written(make_serve_server, tmp_path):
    curl_reply, script_output = run_section("Talk to the server", _address(make_serve_server), tmp_path)
    reply = json.loads(curl_reply)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] <= 20
    assert script_output.strip()  # the non-streamed answer, then the streamed count


@pytest.mark.slow
def test_readme_structured_output_examples_run_as_written(make_serve_server, tmp_path):
    pytest.importorskip("xgrammar")
    # The python block continues the previous section's (it uses `client` and `model`): that one runs first.
    talk = next(code for language, code in code_blocks(README, "Talk to the server") if language == "python")
    curl_reply, script_output = run_section("Structured outputs and tool calling", _address(make_serve_server),
                                            tmp_path, prelude=talk)
    assert json.loads(curl_reply)["choices"][0]["message"]["content"] in ("yes", "no")
    assert "capital=" in script_output and "get_weather" in script_output


@pytest.mark.slow
def test_readme_offline_api_example_runs_as_written(tmp_path):
    ((language, code),) = code_blocks(README, "Offline API")
    assert language == "python"
    path = tmp_path / "offline.py"
    path.write_text(code)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) >= 2
