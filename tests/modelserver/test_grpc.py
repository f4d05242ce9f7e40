"""KServe v2 over gRPC with the stock ``tritonclient.grpc`` client: health, metadata, config, infer, bad inputs.

Runs against the same live server as the HTTP tests (started with --grpc-port).
"""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from skimage import data
from tritonclient.utils import InferenceServerException

from tokenmill.modelserver import bundled, processing


@pytest.fixture(scope="module")
def client(grpc_server):
    with grpcclient.InferenceServerClient(url=grpc_server) as c:
        yield c


def text_inputs(texts: list[str]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, arr in processing.tokenize(bundled.load_tokenizer(), texts).items():
        tensor = grpcclient.InferInput(name, list(arr.shape), "INT64")
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier") and not client.is_model_ready("nope")
    assert client.get_server_metadata(as_json=True)["name"] == "tokenmill"
    meta = client.get_model_metadata("classifier", as_json=True)
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": ["-1", "3", "224", "224"]}
    assert client.get_model_metadata("sentiment", as_json=True)["versions"] == ["1", "2"]
    config = client.get_model_config("sentiment", as_json=True)["config"]
    assert config["max_batch_size"] == 32 and [i["name"] for i in config["input"]] == ["input_ids", "attention_mask"]
    assert {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]} == {"classifier", "sentiment"}


def test_chelsea_is_a_cat_over_grpc(client):
    image = grpcclient.InferInput("images", [1, 3, 224, 224], "FP32")
    image.set_data_from_numpy(processing.preprocess_image(data.chelsea())[None])
    logits = client.infer("classifier", [image], outputs=[grpcclient.InferRequestedOutput("logits")]).as_numpy("logits")
    assert logits.shape == (1, 1000)
    assert set(np.argsort(-logits[0])[:3].tolist()) & {281, 282, 285}


def test_sentiment_over_grpc_matches_http_versions(client):
    inputs = text_inputs(["I absolutely loved this, wonderful!", "Awful, a complete waste of money."])
    one = client.infer("sentiment", inputs, model_version="1").as_numpy("logits")
    two = client.infer("sentiment", inputs, model_version="2").as_numpy("logits")
    assert one.argmax(-1).tolist() == [1, 0]
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_concurrent_async_infers_all_succeed(client):
    inputs = text_inputs(["a calm and pleasant afternoon"])
    replies: queue.Queue = queue.Queue()
    for _ in range(24):
        client.async_infer("sentiment", inputs, callback=lambda result, error: replies.put((result, error)))
    got = [replies.get(timeout=60) for _ in range(24)]
    assert [error for _, error in got if error is not None] == []
    first = got[0][0].as_numpy("logits")
    assert all(np.allclose(result.as_numpy("logits"), first, atol=1e-5) for result, _ in got)


@pytest.mark.parametrize(("name", "shape", "datatype", "message"), [
    ("images", [1, 3, 224, 224], "INT64", "must be FP32"),
    ("pixels", [1, 3, 224, 224], "FP32", "expects inputs"),
    ("images", [1, 3, 100, 100], "FP32", "must have shape"),
])
def test_bad_inputs_get_invalid_argument_and_the_next_request_works(client, name, shape, datatype, message):
    bad = grpcclient.InferInput(name, shape, datatype)
    bad.set_data_from_numpy(np.ones(shape, dtype=np.int64 if datatype == "INT64" else np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("classifier", [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and message in info.value.message()
    good = grpcclient.InferInput("images", [1, 3, 224, 224], "FP32")
    good.set_data_from_numpy(np.zeros((1, 3, 224, 224), dtype=np.float32))
    assert client.infer("classifier", [good]).as_numpy("logits").shape == (1, 1000)


def test_unknown_model_is_not_found_and_unknown_output_is_invalid(client):
    inputs = text_inputs(["fine"])
    with pytest.raises(InferenceServerException) as info:
        client.infer("missing", inputs)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.infer("sentiment", inputs, outputs=[grpcclient.InferRequestedOutput("nope")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
