"""Acceptance 2: chelsea -> Egyptian cat (or tabby / tiger cat in the top 3) through a real server via tritonclient.

Also covers metadata, readiness, versions, load/unload and the task endpoints (image bytes, text).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from skimage import data
from tritonclient.utils import InferenceServerException

from tokenmill.modelserver import bundled, processing

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(url=server) as c:
        yield c


def chelsea_batch() -> np.ndarray:
    return processing.preprocess_image(data.chelsea())[None]


@pytest.mark.parametrize("binary", [True, False])
def test_chelsea_is_a_cat_via_tritonclient(client, binary):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier")
    image = triton.InferInput("images", [1, 3, 224, 224], "FP32")
    image.set_data_from_numpy(chelsea_batch(), binary_data=binary)
    result = client.infer("classifier", [image], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    logits = result.as_numpy("logits")
    assert logits.shape == (1, 1000)
    top3 = set(np.argsort(-logits[0])[:3].tolist())
    assert int(logits[0].argmax()) == 285 or top3 & CATS


def test_default_outputs_are_binary_and_batch_of_two(client):
    image = triton.InferInput("images", [2, 3, 224, 224], "FP32")
    image.set_data_from_numpy(np.concatenate([chelsea_batch(), chelsea_batch()]))
    result = client.infer("classifier", [image])  # no outputs -> binary_data_output for all
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 1000)
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)


def test_sentiment_via_tritonclient(client):
    tokenizer = bundled.load_tokenizer()
    feeds = processing.tokenize(tokenizer, ["I absolutely loved this, wonderful!", "Awful, a complete waste of money."])
    inputs = []
    for name, arr in feeds.items():
        tensor = triton.InferInput(name, list(arr.shape), "INT64")
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    logits = client.infer("sentiment", inputs).as_numpy("logits")
    assert logits.argmax(-1).tolist() == [1, 0]


def test_metadata_config_and_versions(client, server):
    meta = client.get_model_metadata("classifier")
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    assert meta["versions"] == ["1"]
    assert client.get_model_config("sentiment")["dynamic_batching"]["pad_inputs"] == {"input_ids": 0, "attention_mask": 0}
    assert client.is_model_ready("classifier", "1")
    assert not client.is_model_ready("classifier", "7")
    assert httpx.get(f"http://{server}/v2").json()["name"] == "tokenmill"
    index = {row["name"] for row in client.get_model_repository_index()}
    assert index == {"classifier", "sentiment"}


def test_versions_route_separately(client, server):
    assert client.get_model_metadata("sentiment")["versions"] == ["1", "2"]
    ids = np.array([[101, 2307, 102]], dtype=np.int64)
    outputs = []
    for version in ("1", "2"):
        tensors = []
        for name in ("input_ids", "attention_mask"):
            tensor = triton.InferInput(name, [1, 3], "INT64")
            tensor.set_data_from_numpy(ids if name == "input_ids" else np.ones_like(ids))
            tensors.append(tensor)
        result = client.infer("sentiment", tensors, model_version=version)
        assert result.get_response()["model_version"] == version
        outputs.append(result.as_numpy("logits"))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    assert httpx.get(f"http://{server}/v2/models/sentiment/versions/3/ready").status_code == 400


def test_unload_then_load(client):
    client.unload_model("sentiment")
    assert not client.is_model_ready("sentiment")
    with pytest.raises(InferenceServerException, match="not loaded"):
        tensor = triton.InferInput("input_ids", [1, 3], "INT64")
        tensor.set_data_from_numpy(np.ones((1, 3), dtype=np.int64))
        client.infer("sentiment", [tensor])
    client.load_model("sentiment")
    assert client.is_model_ready("sentiment")


def test_task_endpoints(server):
    png = processing.encode_png(data.chelsea())
    reply = httpx.post(f"http://{server}/v1/classify/classifier?top_k=3", content=png,
                       headers={"content-type": "image/png"}, timeout=60)
    assert reply.status_code == 200
    predictions = reply.json()["predictions"]
    assert len(predictions) == 3 and {p["index"] for p in predictions} & CATS
    assert predictions[0]["label"] in {"Egyptian cat", "tabby", "tiger cat"}
    reply = httpx.post(f"http://{server}/v1/sentiment/sentiment",
                       json={"text": ["I absolutely loved this, wonderful!", "Awful, a complete waste of money."]},
                       timeout=60)
    assert reply.status_code == 200
    assert [r["label"] for r in reply.json()["results"]] == ["positive", "negative"]
    assert abs(sum(reply.json()["results"][0]["scores"].values()) - 1.0) < 1e-6
