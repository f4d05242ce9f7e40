"""KServe v2 tensor codec: JSON and binary requests decode to the same arrays; responses encode both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenmill.modelserver.errors import BadInputError
from tokenmill.modelserver.model_config import ModelConfig
from tokenmill.modelserver.tensors import InferRequest, encode_response, parse_request


def test_json_and_binary_requests_agree():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    as_json = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": arr.ravel().tolist()}]})
    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": arr.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    from_json = parse_request(as_json.encode(), None)
    from_binary = parse_request(header + arr.tobytes(), len(header))
    np.testing.assert_array_equal(from_json.inputs["x"], arr)
    np.testing.assert_array_equal(from_binary.inputs["x"], arr)
    assert from_binary.outputs == {"y": True}


def test_response_binary_and_json():
    out = {"y": np.array([[1.5, 2.5]], dtype=np.float32)}
    body, length = encode_response("m", "1", InferRequest("abc", {}, {"y": True}), out)
    header = json.loads(body[:length])
    assert header["id"] == "abc" and header["outputs"][0]["parameters"]["binary_data_size"] == 8
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype=np.float32), [1.5, 2.5])
    body, length = encode_response("m", "1", InferRequest(None, {}, {"y": False}), out)
    assert length is None and json.loads(body)["outputs"][0]["data"] == [1.5, 2.5]


@pytest.mark.parametrize("body", [
    b'{"inputs": []}',
    b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
    b'[1, 2]',
])
def test_malformed_requests_raise_bad_input(body):
    with pytest.raises(BadInputError):
        parse_request(body, None)


def test_config_rejects_bad_values():
    base = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "dims": [3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "dims": [1]}]}
    assert ModelConfig.from_dict(base).max_batch_size == 8
    with pytest.raises(ValueError, match="instance_count"):
        ModelConfig.from_dict(dict(base, instance_count=0))
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        ModelConfig.from_dict(dict(base, max_batch_size=4, dynamic_batching={"preferred_batch_sizes": [8]}))
    with pytest.raises(ValueError, match="datatype"):
        ModelConfig.from_dict(dict(base, inputs=[{"name": "x", "datatype": "F32", "dims": [3]}]))
