"""The KServe v2 / Open Inference Protocol HTTP app (FastAPI), plus task endpoints and /metrics.

Routes: health, server + model metadata, infer (JSON or binary tensors), repository index/load/unload,
``/v1/classify/{model}`` (image bytes -> top-k) and ``/v1/sentiment/{model}`` (text -> label + scores).
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenmill.modelserver import processing
from tokenmill.modelserver.errors import BadInputError, ModelNotFoundError, ModelNotReadyError
from tokenmill.modelserver.metrics import ServerMetrics
from tokenmill.modelserver.repository import ModelRepository, ServedModel
from tokenmill.modelserver.tensors import HEADER_LENGTH, encode_response, parse_request
from tokenmill.server.lifecycle import bound_url

SERVER_NAME = "tokenmill"
EXTENSIONS = ["binary_tensor_data", "model_repository", "task_endpoints", "metrics"]


CONFIG_ENV = "TOKENMILL_MODELSERVER_CONFIG"  # how `--workers N` hands the config to each worker process


@dataclass
class ModelServerConfig:
    repository: Path
    device: str = "auto"
    max_request_bytes: int = 32 * 1024 * 1024
    load_on_start: bool = True
    backend: str = "config"  # "config" = each model's platform; "torch" / "onnxruntime" override it
    workers: int = 1  # HTTP worker processes, each with its own model runtimes (cores are split between them)
    grpc_address: str | None = None  # "host:port" for KServe v2 over gRPC beside HTTP; None = HTTP only

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must be at least 1024")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.backend not in ("config", "torch", "onnxruntime"):
            raise ValueError(f"backend {self.backend!r} must be 'config', 'torch' or 'onnxruntime'")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers ({self.workers}) must be between 1 and 64")

    def to_env(self) -> str:
        return json.dumps(dict(asdict(self), repository=str(self.repository)))


def app_from_env() -> FastAPI:
    """uvicorn's factory for `--workers N`: every worker process builds the same app from the environment."""
    return create_app(ModelServerConfig(**json.loads(os.environ[CONFIG_ENV])))


def fast_json(payload: dict) -> Response:
    """Plain ``json.dumps``: FastAPI's default response path (jsonable_encoder + validation) costs more per request."""
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (BadInputError) anything over ``limit`` bytes without buffering all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInputError(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInputError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ModelServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    repo = ModelRepository(config.repository, metrics, device=config.device, backend=config.backend,
                           thread_share=config.workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.load_on_start:
            await repo.load_all()
        grpc = None
        if config.grpc_address:
            from tokenmill import __version__
            from tokenmill.modelserver.grpc_server import GrpcFrontend, InferenceService

            grpc = GrpcFrontend(InferenceService(repo, SERVER_NAME, __version__, EXTENSIONS), config.grpc_address,
                                config.max_request_bytes)
            grpc.start()
        yield
        if grpc is not None:
            grpc.stop()
        await repo.close()

    app = FastAPI(title="tokenmill model server", lifespan=lifespan)
    app.state.repository = repo
    app.state.metrics = metrics

    @app.exception_handler(BadInputError)
    async def bad_input(_: Request, exc: BadInputError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(ModelNotFoundError)
    async def not_found(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(ModelNotReadyError)
    async def not_ready(_: Request, exc: ModelNotReadyError) -> JSONResponse:
        return error(400, str(exc))

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if repo.loaded else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        from tokenmill import __version__

        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None) -> dict:
        meta = repo.get(model, version).metadata()
        if version is None:
            meta["versions"] = sorted(repo.loaded[model], key=int)
        return meta

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None) -> Response:
        try:
            repo.get(model, version)
        except (ModelNotFoundError, ModelNotReadyError):
            return Response(status_code=400)
        return Response(status_code=200)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str | None = None) -> dict:
        return asdict(repo.get(model, version).config)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        served = repo.get(model, version)
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not header.isdigit():
            raise BadInputError(f"{HEADER_LENGTH} must be a non-negative integer, got {header!r}")
        body = await read_body(request, config.max_request_bytes)
        try:
            parsed = parse_request(body, int(header) if header is not None else None)
        except BadInputError:
            served.metrics["failures"].inc()
            raise
        outputs = await served.infer(parsed.inputs)  # counts its own failures
        unknown = sorted(set(parsed.outputs) - set(outputs))
        if unknown:
            raise BadInputError(f"requested outputs {unknown} do not exist; model outputs are {sorted(outputs)}")
        payload, header_length = encode_response(model, served.version, parsed, outputs)
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    @app.post("/v2/repository/index")
    async def repository_index() -> list[dict]:
        return repo.index()

    @app.post("/v2/repository/models/{model}/load")
    async def load(model: str) -> Response:
        try:
            await repo.load(model)
        except (ValueError, OSError, RuntimeError) as exc:
            return error(400, f"failed to load model {model!r}: {exc}")
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload")
    async def unload(model: str) -> Response:
        await repo.unload(model)
        return Response(status_code=200)

    def task_model(model: str, kind: str) -> ServedModel:
        served = repo.get(model)
        if served.config.task.kind != kind:
            raise BadInputError(f"model {model!r} serves task {served.config.task.kind!r}, not {kind!r}")
        return served

    @app.post("/v1/classify/{model}")
    async def classify(model: str, request: Request) -> Response:
        served = task_model(model, "image_classification")
        # Read by hand, not as a FastAPI query parameter: its dependency solving cost more per request than the
        # rest of the handler, and a bad value gets this server's 400 {"error"} shape instead of a 422.
        raw_k = request.query_params.get("top_k")
        if raw_k is not None and not raw_k.isdigit():
            raise BadInputError(f"top_k must be a positive integer, got {raw_k!r}")
        k = int(raw_k) if raw_k else served.config.task.top_k
        if not 1 <= k <= len(served.labels):
            raise BadInputError(f"top_k ({k}) must be between 1 and {len(served.labels)}")
        body = await read_body(request, config.max_request_bytes)
        if served.pixel_size is None:  # an image model of another input layout: the float tensor, normalised here
            image = await asyncio.to_thread(lambda: processing.preprocess_image(processing.decode_image(body)))
            outputs = await served.infer({served.config.inputs[0].name: image[None]})
        else:  # decode + resize off the loop (PIL releases the GIL); uint8 pixels batch, normalised per batch
            pixels = await asyncio.to_thread(processing.decode_resized, body, *served.pixel_size)
            outputs = await served.infer_pixels(pixels[None])
        logits = outputs[served.config.outputs[0].name][0]
        return fast_json({"model": model, "version": served.version,
                          "predictions": processing.top_k(logits, served.labels, k)})

    @app.post("/v1/sentiment/{model}")
    async def sentiment(model: str, request: Request) -> Response:
        served = task_model(model, "text_classification")
        body = await read_body(request, config.max_request_bytes)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"body must be JSON like {{\"text\": \"...\"}} ({exc})") from exc
        text = payload.get("text") if isinstance(payload, dict) else None
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts:
            raise BadInputError('body must be JSON with "text": a non-empty string or a list of them')
        if len(texts) > served.config.max_batch_size:
            raise BadInputError(f"at most max_batch_size ({served.config.max_batch_size}) texts per request")
        # Tokenized on the batcher's worker together with the other requests of its batch.
        outputs = await served.infer(processing.check_texts(texts))
        logits = outputs[served.config.outputs[0].name]
        results = [processing.sentiment(row, served.labels) for row in np.asarray(logits)]
        return fast_json({"model": model, "version": served.version, "results": results})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class AnnouncingServer(uvicorn.Server):
    """uvicorn Server that prints one line once the socket is bound and the models are loaded: where it listens
    (the real port, also with --port 0) and what it serves. The default log level (warning) hides uvicorn's own."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        names = sorted(self.app.state.repository.loaded)
        print(f"tokenmill model server: {len(names)} model(s) {names} listening on {bound_url(self)} "
              "(KServe v2 under /v2)", flush=True)
