"""Turn validated request models into SamplingParams, rejecting features tokenmill does not implement yet.

Shared by routes_completions.py and routes_chat.py; any ValueError from SamplingParams becomes a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import BadRequestError, NotSupportedError
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from tokenmill.server.structured_fields import structured_spec
from tokenmill.structured.params import StructuredOutputsParams

# SamplingParams field names a ValueError message starts with, so the error can name its ``param``.
_PARAM_NAMES = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "max_tokens", "min_tokens", "stop_token_ids", "stop", "logprobs", "prompt_logprobs",
)


# Bounds the server adds on top of SamplingParams: n sequences are allocated at once, and torch seeds are 64-bit.
MAX_N = 128
MAX_SEED = 2**63 - 1 - MAX_N


def _common(req: SamplingFields) -> dict[str, Any]:
    if req.n > MAX_N:
        raise BadRequestError(f"n must be <= {MAX_N}; got {req.n}", param="n")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise BadRequestError(f"seed must be in [0, {MAX_SEED}]; got {req.seed}", param="seed")
    if req.logit_bias:
        raise NotSupportedError("logit_bias is not supported yet", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise BadRequestError("stream_options is only allowed together with stream=true", param="stream_options")
    kwargs: dict[str, Any] = {
        "n": req.n,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
    }
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if kwargs.get("top_k") == 0:  # OpenAI-style clients send 0 for "off"
        kwargs["top_k"] = -1
    return kwargs


def build_params(kwargs: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        message = str(exc)
        param = next((name for name in _PARAM_NAMES if message.startswith(name + " ")), None)
        raise BadRequestError(message, param=param) from exc


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.suffix:
        raise NotSupportedError("suffix is not supported yet", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise NotSupportedError(f"best_of ({req.best_of}) different from n ({req.n}) is not supported yet", param="best_of")
    if req.echo and req.logprobs is not None:
        raise NotSupportedError("echo together with logprobs (prompt logprobs) is not supported yet", param="echo")
    kwargs = _common(req)
    kwargs["max_tokens"] = req.max_tokens
    kwargs["logprobs"] = req.logprobs
    kwargs["structured_outputs"] = structured_spec(req)
    return build_params(kwargs)


def chat_params(req: ChatCompletionRequest, tool_spec: StructuredOutputsParams | None = None) -> SamplingParams:
    """``tool_spec``: the grammar of a forced tool call (server/tool_calls.py), exclusive with other constraints."""
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise BadRequestError(
            f"max_tokens ({req.max_tokens}) and max_completion_tokens ({req.max_completion_tokens}) disagree; "
            "give one of them",
            param="max_completion_tokens",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    # Checked here, not by SamplingParams, whose error would name its own field (logprobs).
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise BadRequestError(f"top_logprobs must be in [0, 20]; got {req.top_logprobs}", param="top_logprobs")
    kwargs = _common(req)
    kwargs["max_tokens"] = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    spec = structured_spec(req, req.response_format)
    if spec is not None and tool_spec is not None:
        raise BadRequestError("a forced tool_choice cannot be combined with response_format or structured_outputs",
                              param="tool_choice")
    kwargs["structured_outputs"] = spec or tool_spec
    if req.logprobs:
        kwargs["logprobs"] = req.top_logprobs if req.top_logprobs is not None else 0
    return build_params(kwargs)
