"""KServe v2 over gRPC (Triton's ``inference.GRPCInferenceService``) beside HTTP, on the same models and batchers.

The service stubs are the ones ``tritonclient[grpc]`` ships, so the stock client works unmodified. The server runs
on its own thread and asyncio loop: gRPC never competes with the HTTP loop for turns, and the batcher hands results
back to whichever loop asked. Health, metadata, config, repository index and infer are served; repository
load/unload, statistics, shared memory and tracing answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from tokenmill.modelserver.errors import BadInputError, ModelNotFoundError, ModelNotReadyError
from tokenmill.modelserver.repository import ModelRepository
from tokenmill.modelserver.tensors import datatype_of, to_array

# KServe datatype -> the typed field of InferTensorContents that carries it when raw_input_contents is not used.
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}
STATUS = ((BadInputError, grpc.StatusCode.INVALID_ARGUMENT), (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
          (ModelNotReadyError, grpc.StatusCode.UNAVAILABLE))


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repo: ModelRepository, server_name: str, version: str, extensions: list[str]) -> None:
        self.repo = repo
        self.server_name, self.version, self.extensions = server_name, version, extensions

    async def ServerLive(self, request, context):  # noqa: N802 - names fixed by the service definition
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=bool(self.repo.loaded))

    async def ServerMetadata(self, request, context):  # noqa: N802
        return service_pb2.ServerMetadataResponse(name=self.server_name, version=self.version,
                                                  extensions=self.extensions)

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            self.repo.get(request.name, request.version or None)
        except (ModelNotFoundError, ModelNotReadyError):
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):  # noqa: N802
        served = await self._get(request.name, request.version, context)
        meta = served.metadata()
        versions = sorted(self.repo.loaded[request.name], key=int) if not request.version else meta["versions"]

        def tensors(rows):
            return [service_pb2.ModelMetadataResponse.TensorMetadata(name=r["name"], datatype=r["datatype"],
                                                                     shape=r["shape"]) for r in rows]

        return service_pb2.ModelMetadataResponse(name=meta["name"], versions=versions, platform=meta["platform"],
                                                 inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelConfig(self, request, context):  # noqa: N802
        served = await self._get(request.name, request.version, context)
        config = served.config

        def dtype(name: str) -> int:
            return model_config_pb2.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")

        proto = model_config_pb2.ModelConfig(
            name=config.name, platform=served.platform, max_batch_size=config.max_batch_size,
            input=[model_config_pb2.ModelInput(name=s.name, data_type=dtype(s.datatype), dims=s.dims)
                   for s in config.inputs],
            output=[model_config_pb2.ModelOutput(name=s.name, data_type=dtype(s.datatype), dims=s.dims)
                    for s in config.outputs],
            instance_group=[model_config_pb2.ModelInstanceGroup(count=config.instance_count)],
        )
        if config.dynamic_batching is not None:
            proto.dynamic_batching.preferred_batch_size.extend(config.dynamic_batching.preferred_batch_sizes)
            proto.dynamic_batching.max_queue_delay_microseconds = int(config.dynamic_batching.max_queue_delay_ms * 1000)
        return service_pb2.ModelConfigResponse(config=proto)

    async def RepositoryIndex(self, request, context):  # noqa: N802
        rows = [service_pb2.RepositoryIndexResponse.ModelIndex(name=r["name"], version=r.get("version", ""),
                                                               state=r["state"], reason=r["reason"])
                for r in self.repo.index()]
        return service_pb2.RepositoryIndexResponse(models=rows)

    async def ModelInfer(self, request, context):  # noqa: N802
        served = await self._get(request.model_name, request.model_version, context)
        try:
            inputs = self._inputs(request)
            outputs = await served.infer(inputs)
            wanted = [o.name for o in request.outputs] or list(outputs)
            unknown = sorted(set(wanted) - set(outputs))
            if unknown:
                raise BadInputError(f"requested outputs {unknown} do not exist; model outputs are {sorted(outputs)}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes the protocol's status, never a dropped call
            await context.abort(_status(exc), str(exc))
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=served.version,
                                                  id=request.id)
        for name in wanted:
            arr = np.ascontiguousarray(outputs[name])
            response.outputs.add(name=name, datatype=datatype_of(arr), shape=list(arr.shape))
            response.raw_output_contents.append(arr.tobytes())
        return response

    @staticmethod
    def _inputs(request) -> dict[str, np.ndarray]:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise BadInputError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
        inputs = {}
        for i, tensor in enumerate(request.inputs):
            spec = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
            if not raw:
                field = CONTENTS_FIELD.get(tensor.datatype)
                if field is None:
                    raise BadInputError(f"input {tensor.name!r}: datatype {tensor.datatype!r} must be sent as "
                                        "raw_input_contents")
                spec["data"] = list(getattr(tensor.contents, field))
            inputs[tensor.name] = to_array(spec, raw[i] if raw else None)
        return inputs

    async def _get(self, name: str, version: str, context):
        try:
            return self.repo.get(name, version or None)
        except Exception as exc:  # noqa: BLE001
            await context.abort(_status(exc), str(exc))


def _status(exc: Exception) -> grpc.StatusCode:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


class GrpcFrontend:
    """The gRPC server on a thread of its own (own asyncio loop), started and stopped with the HTTP app."""

    def __init__(self, service: InferenceService, address: str, max_message_bytes: int) -> None:
        self.service, self.address, self.max_message_bytes = service, address, max_message_bytes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-frontend", daemon=True)
        self.server: grpc.aio.Server | None = None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self) -> None:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes)]
        self.server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, self.server)
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"gRPC could not bind {self.address}")
        await self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=2), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
