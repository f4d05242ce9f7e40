"""KServe v2 tensors over HTTP: JSON ``data`` arrays and Triton's binary tensor extension, both directions.

Binary requests carry a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensor bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from tokenmill.modelserver.errors import BadInputError
from tokenmill.modelserver.model_config import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output name -> binary_data
    binary_default: bool = False  # parameters.binary_data_output


def _bytes_elements(raw: bytes) -> np.ndarray:
    """BYTES tensors in binary form: each element is a 4-byte little-endian length then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadInputError("BYTES tensor is truncated: expected a 4-byte length before every element")
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return np.array(items, dtype=np.object_)


def to_array(spec: dict, raw: bytes | None) -> np.ndarray:
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadInputError("each input needs a string 'name', a 'datatype' and a 'shape' list of non-negative ints")
    if datatype == "BYTES":
        if raw is not None:
            arr = _bytes_elements(raw)
        else:
            data = np.asarray(spec.get("data", []), dtype=np.object_).reshape(-1)
            arr = np.array([d.encode() if isinstance(d, str) else d for d in data], dtype=np.object_)
    elif datatype in DATATYPES:
        dtype = DATATYPES[datatype]
        if raw is not None:
            if len(raw) % dtype.itemsize:
                raise BadInputError(f"input {name!r}: {len(raw)} bytes is not a whole number of {datatype} elements")
            arr = np.frombuffer(raw, dtype=dtype)
        else:
            if "data" not in spec:
                raise BadInputError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            try:
                arr = np.asarray(spec["data"], dtype=dtype).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise BadInputError(f"input {name!r}: data is not a flat list of {datatype} values ({exc})") from exc
    else:
        raise BadInputError(f"input {name!r}: datatype {datatype!r} must be one of {[*DATATYPES, 'BYTES']}")
    expected = int(np.prod(shape)) if shape else 1
    if arr.size != expected:
        raise BadInputError(f"input {name!r}: shape {shape} needs {expected} elements but {arr.size} were sent")
    return arr.reshape(shape)


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode a KServe v2 infer body (plain JSON, or JSON header + binary tensors)."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadInputError(f"{HEADER_LENGTH} ({header_length}) must be between 1 and the body size ({len(body)})")
    header_bytes = body[:header_length] if header_length is not None else body
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"request body is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise BadInputError("request JSON must be an object with a non-empty 'inputs' list")
    offset = header_length or 0
    inputs: dict[str, np.ndarray] = {}
    for spec in header["inputs"]:
        if not isinstance(spec, dict):
            raise BadInputError("each entry of 'inputs' must be an object")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if header_length is None or offset + int(size) > len(body):
                raise BadInputError(f"input {spec.get('name')!r}: binary_data_size {size} runs past the request body")
            raw = body[offset : offset + int(size)]
            offset += int(size)
        inputs[spec["name"] if isinstance(spec.get("name"), str) else ""] = to_array(spec, raw)
    params = header.get("parameters") or {}
    outputs = {
        o["name"]: bool((o.get("parameters") or {}).get("binary_data", params.get("binary_data_output", False)))
        for o in header.get("outputs") or []
        if isinstance(o, dict) and isinstance(o.get("name"), str)
    }
    return InferRequest(header.get("id"), inputs, outputs, bool(params.get("binary_data_output", False)))


def datatype_of(arr: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if arr.dtype == dtype:
            return name
    return "BYTES"


def encode_response(
    model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header length for the response header."""
    wanted = request.outputs or {name: request.binary_default for name in outputs}
    entries, blobs = [], []
    for name, binary in wanted.items():
        arr = np.ascontiguousarray(outputs[name])
        entry: dict = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if binary:
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    header: dict = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        header["id"] = request.id
    head = json.dumps(header).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
