"""Request fields that constrain the output → one StructuredOutputsParams (or a 400 naming the field).

Sources, at most one per request: OpenAI's ``response_format`` (json_object, json_schema), vLLM's
``structured_outputs`` extra body and its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` aliases. The grammar itself is compiled later (AsyncLLM.add_request), where an invalid
schema/regex/grammar becomes a 400 as well.
"""

from __future__ import annotations

from typing import Any

from tokenmill.server.errors import BadRequestError
from tokenmill.server.protocol import ResponseFormat, SamplingFields
from tokenmill.structured.params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _response_format_fields(fmt: ResponseFormat) -> dict[str, Any] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.type == "json_schema":
        body = fmt.json_schema
        if not isinstance(body, dict) or not isinstance(body.get("schema"), dict):
            raise BadRequestError(
                "response_format json_schema must be an object with a 'schema' (a JSON schema object)",
                param="response_format.json_schema",
            )
        return {"json": body["schema"]}
    raise BadRequestError(
        f"response_format type {fmt.type!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        param="response_format.type",
    )


def structured_spec(req: SamplingFields, response_format: ResponseFormat | None = None) -> StructuredOutputsParams | None:
    sources: list[tuple[str, dict[str, Any]]] = []
    if response_format is not None:
        fields = _response_format_fields(response_format)
        if fields is not None:
            sources.append(("response_format", fields))
    if req.structured_outputs is not None:
        sources.append(("structured_outputs", dict(req.structured_outputs)))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            sources.append((name, {kind: value}))
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise BadRequestError(f"give one output constraint per request; got {names}", param=sources[1][0])
    param, fields = sources[0]
    try:
        return StructuredOutputsParams.from_value(fields)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(str(exc), param=param) from exc
