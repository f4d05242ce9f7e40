"""continue_final_message (vLLM's name), which the gateway uses to resume a cut chat stream: the last assistant
message is rendered open-ended, so generation continues it instead of starting a new turn.
"""

from __future__ import annotations

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris is the"}]


def test_continue_final_message_renders_the_assistant_message_open(shared_server):
    with shared_server.client() as http:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "add_generation_prompt": False,
                "continue_final_message": True}  # fmt: skip
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        open_ended = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nParis is the"
        expected = http.post("/tokenize", json={"prompt": open_ended, "add_special_tokens": False}).json()["count"]
        assert response.json()["usage"]["prompt_tokens"] == expected


def test_continue_final_message_needs_an_assistant_message_last(shared_server):
    with shared_server.client() as http:
        body = {"model": MODEL, "messages": MESSAGES[:1], "max_tokens": 2, "add_generation_prompt": False,
                "continue_final_message": True}  # fmt: skip
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "continue_final_message"
