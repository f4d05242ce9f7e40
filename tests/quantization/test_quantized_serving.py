"""``tokenmill serve`` on quantized weights through the real openai client: a GPTQ checkpoint (format read from
config.json) and a dense one quantized at load with ``--quantization rtn4`` answer like the offline engine on the
same weights; a ``--quantization`` that contradicts the checkpoint stops start-up with the reason."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from server_process import ServerProcess

from tokenmill.cli import main
from tokenmill.engine.llm import LLM
from tokenmill.sampling_params import SamplingParams

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def gptq_dir(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve_gptq") / "q"
    assert main(["quantize", str(tiny_llama), "--out", str(out), "--method", "rtn", "--group-size", "32"]) == 0
    return out


def _offline_text(model: Path, **kwargs) -> str:
    llm = LLM(str(model), device="cpu", dtype="float32", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("case", ["gptq_checkpoint", "rtn4_at_load"])
def test_server_answers_like_the_offline_engine(case, gptq_dir, tiny_llama, tmp_path):
    model, flags = (gptq_dir, []) if case == "gptq_checkpoint" else (tiny_llama, ["--quantization", "rtn4"])
    kwargs = {} if not flags else {"quantization": "rtn4"}
    expected = _offline_text(model, **kwargs)
    server = ServerProcess(model, tmp_path / "server.log", "--dtype", "float32", "--max-model-len", "128", *flags)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            name = client.models.list().data[0].id
            result = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
            chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                                  max_completion_tokens=4, temperature=0)
    finally:
        server.stop()
    assert result.choices[0].text == expected and result.usage.completion_tokens == 8
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1


def test_server_refuses_a_flag_that_contradicts_the_checkpoint(gptq_dir, tmp_path):
    with pytest.raises(RuntimeError, match="server exited") as failure:
        ServerProcess(gptq_dir, tmp_path / "server.log", "--quantization", "awq")
    assert "--quantization awq does not match the checkpoint, which is quantized as 'gptq'" in str(failure.value)
