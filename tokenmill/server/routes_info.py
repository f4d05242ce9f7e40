"""The small routes: /v1/models, /health, /version, /tokenize, /detokenize, /metrics.

/health answers 200 only while the engine loop is alive and the server is not draining (503 otherwise).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import tokenmill
from tokenmill.server.errors import BadRequestError, NotFoundError
from tokenmill.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.server.routes_chat import chat_prompt
from tokenmill.server.serving import ServerContext, check_model, context

router = APIRouter()


def _model_card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, created=ctx.created, root=ctx.model_name, max_model_len=ctx.async_llm.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(context(request))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    ctx = context(request)
    if model_id != ctx.model_name:
        raise NotFoundError(f"model {model_id!r} does not exist on this server; it serves {ctx.model_name!r}",
                            param="model", code="model_not_found")
    return _model_card(ctx)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ctx = context(request)
    if not ctx.async_llm.is_healthy:
        return JSONResponse({"status": "engine_dead", "error": str(ctx.async_llm.error)}, status_code=503)
    if ctx.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": tokenmill.__version__}


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    ctx = context(request)
    check_model(ctx, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequestError("give exactly one of prompt or messages", param="prompt")
    if body.prompt is not None:
        tokens = ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        tokens = chat_prompt(ctx, body.messages or [], body.add_generation_prompt)
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.async_llm.max_model_len, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = context(request)
    check_model(ctx, body.model)
    vocab = ctx.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise BadRequestError(f"tokens must be ids in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(context(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
