"""Acceptance 5: wrong name/shape/dtype, undecodable image, empty text, oversized body -> 400; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from skimage import data

from tokenmill.modelserver import processing

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # must equal conftest.MAX_REQUEST_BYTES (the server's --max-request-bytes)


def infer_json(server: str, model: str, inputs: list[dict]) -> httpx.Response:
    return httpx.post(f"http://{server}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=60)


def image_tensor(name="images", shape=(1, 3, 224, 224), datatype="FP32") -> dict:
    count = int(np.prod(shape))
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": [0.0] * count}


BAD_CASES = {
    "wrong_name": lambda s: infer_json(s, "classifier", [image_tensor(name="pixels")]),
    "wrong_shape": lambda s: infer_json(s, "classifier", [image_tensor(shape=(1, 3, 32, 32))]),
    "wrong_dtype": lambda s: infer_json(s, "classifier", [image_tensor(datatype="INT32")]),
    "data_size_mismatch": lambda s: infer_json(
        s, "classifier", [{"name": "images", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [1.0, 2.0]}]),
    "batch_too_big": lambda s: infer_json(s, "classifier", [image_tensor(shape=(17, 3, 8, 8))]),
    "not_json": lambda s: httpx.post(f"http://{s}/v2/models/classifier/infer", content=b"{nope", timeout=30),
    "undecodable_image": lambda s: httpx.post(f"http://{s}/v1/classify/classifier", content=b"not an image", timeout=30),
    "empty_image": lambda s: httpx.post(f"http://{s}/v1/classify/classifier", content=b"", timeout=30),
    "top_k_not_a_number": lambda s: httpx.post(f"http://{s}/v1/classify/classifier?top_k=five",
                                               content=processing.encode_png(data.chelsea()), timeout=30),
    "top_k_zero": lambda s: httpx.post(f"http://{s}/v1/classify/classifier?top_k=0",
                                       content=processing.encode_png(data.chelsea()), timeout=30),
    "empty_text": lambda s: httpx.post(f"http://{s}/v1/sentiment/sentiment", json={"text": "   "}, timeout=30),
    "no_text": lambda s: httpx.post(f"http://{s}/v1/sentiment/sentiment", json={"txt": "hello"}, timeout=30),
    "oversized_body": lambda s: httpx.post(f"http://{s}/v2/models/classifier/infer",
                                           content=b"x" * (MAX_REQUEST_BYTES + 1), timeout=30),
    "oversized_image": lambda s: httpx.post(f"http://{s}/v1/classify/classifier",
                                            content=b"\x89PNG" + b"0" * (MAX_REQUEST_BYTES + 1), timeout=30),
    "wrong_task": lambda s: httpx.post(f"http://{s}/v1/sentiment/classifier", json={"text": "hi"}, timeout=30),
    "bad_binary_header": lambda s: httpx.post(
        f"http://{s}/v2/models/classifier/infer", content=json.dumps({"inputs": []}).encode(),
        headers={"Inference-Header-Content-Length": "9999"}, timeout=30),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gets_400_and_server_keeps_serving(server, case):
    reply = BAD_CASES[case](server)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]
    assert isinstance(message, str) and len(message) > 10
    good = httpx.post(f"http://{server}/v1/classify/classifier?top_k=1",
                      content=processing.encode_png(data.chelsea()), timeout=60)
    assert good.status_code == 200


def test_messages_say_what_was_expected(server):
    assert "expects inputs ['images']" in infer_json(server, "classifier", [image_tensor(name="pixels")]).json()["error"]
    assert "[-1, 3, 224, 224]" in infer_json(server, "classifier", [image_tensor(shape=(1, 3, 32, 32))]).json()["error"]
    assert "must be FP32" in infer_json(server, "classifier", [image_tensor(datatype="INT32")]).json()["error"]


def test_unknown_model_is_404(server):
    assert infer_json(server, "nope", [image_tensor()]).status_code == 404


def failures(server: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{server}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "tokenmill_model_request_failure"
               for s in f.samples if s.labels.get("model") == model and s.name.endswith("_total"))


def test_bad_requests_count_as_failures(server):
    before = failures(server, "classifier")
    infer_json(server, "classifier", [image_tensor(datatype="INT32")])
    infer_json(server, "classifier", [image_tensor(name="pixels")])
    assert failures(server, "classifier") == before + 2
