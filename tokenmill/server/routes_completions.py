"""POST /v1/completions: prompts (text, texts, token ids) → engine requests → a JSON body or an SSE stream.

The lifecycle is request_flow's (shared with /v1/chat/completions); this file turns prompts into token ids and
renders completion choices (echo, completion logprobs). Choice index = prompt index * n + sample index.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenmill.outputs import CompletionOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import BadRequestError
from tokenmill.server.logprobs import completion_logprobs
from tokenmill.server.params import completion_params
from tokenmill.server.protocol import CompletionRequest, CompletionResponse
from tokenmill.server.request_flow import ChoiceFormat, ChoiceProgress, Submission, run_request
from tokenmill.server.request_log import RequestRecord
from tokenmill.server.serving import ServerContext, check_model, context

router = APIRouter()


def _prompts(ctx: ServerContext, prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (text of token-id prompts is decoded, for echo and logging)."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise BadRequestError("prompt must not be an empty list", param="prompt")
    token_ids: list[list[int]] = []
    texts: list[str] = []
    vocab = ctx.tokenizer.vocab_size
    for item in items:
        if isinstance(item, str):
            token_ids.append(ctx.tokenizer.encode(item))
            texts.append(item)
        else:
            if any(t < 0 or t >= vocab for t in item):
                raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            token_ids.append(list(item))
            texts.append(ctx.tokenizer.decode(list(item), skip_special_tokens=False))
    return token_ids, texts


class CompletionFormat(ChoiceFormat):
    id_prefix, endpoint = "cmpl", "completions"
    response_object = chunk_object = "text_completion"

    def __init__(self, ctx: ServerContext, params: SamplingParams, echo: list[str | None]) -> None:
        self.ctx = ctx
        self.params = params
        self.echo = echo  # per prompt: its text to put before the first piece of each of its choices, or None

    def _piece(self, index: int, prompt_index: int, choice: CompletionOutput,
               progress: ChoiceProgress) -> tuple[str, dict | None]:
        offset = progress.sent_text
        text, start, end = progress.advance(choice, self.params.logprobs is not None)
        logprobs = None
        if self.params.logprobs is not None and choice.logprobs is not None:
            logprobs = completion_logprobs(self.ctx.tokenizer, choice.token_ids[start:end], choice.logprobs[start:end],
                                           self.params.logprobs, offset)
        echo = self.echo[prompt_index]
        if echo is not None and not progress.started:
            text = echo + text
        progress.started = True
        return text, logprobs

    def deltas(self, index: int, prompt_index: int, choice: CompletionOutput,
               progress: ChoiceProgress) -> list[dict[str, Any]]:
        text, logprobs = self._piece(index, prompt_index, choice, progress)
        if not text and logprobs is None and choice.finish_reason is None:
            return []
        return [_choice_json(index, text, logprobs, choice)]

    def final(self, index: int, prompt_index: int, choice: CompletionOutput) -> dict[str, Any]:
        return _choice_json(index, *self._piece(index, prompt_index, choice, ChoiceProgress()), choice)


def _choice_json(index: int, text: str, logprobs: dict | None, choice: CompletionOutput) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = context(request)

    def prepare(record: RequestRecord) -> Submission:
        check_model(ctx, body.model)
        params = completion_params(body)
        prompts, texts = _prompts(ctx, body.prompt)
        record.prompt_text = texts[0] if len(texts) == 1 else repr(texts)
        echo = list(texts) if body.echo else [None] * len(texts)
        return Submission(prompts, list(texts), params, CompletionFormat(ctx, params, echo), bool(body.stream),
                          bool(body.stream_options and body.stream_options.include_usage))

    return await run_request(request, ctx, CompletionFormat.id_prefix, CompletionFormat.endpoint, prepare)
