"""Request checks that JSON parsing and field types let through: lone UTF-16 surrogates, undecodable bodies,
tool messages without content. Their errors carry the field path and a named code for the OpenAI error body.

JSON may spell a lone surrogate (``"\\udcff"``); Python keeps it in the ``str``, but no UTF-8 tokenizer can
encode it, so it is refused at validation with a named code instead of failing deep inside the tokenizer.
"""

from __future__ import annotations

from typing import Any

INVALID_UNICODE_CODE = "invalid_unicode"
INVALID_UTF8_CODE = "invalid_utf8"


class FieldValueError(ValueError):
    """Raised from a pydantic validator: ``sub_param`` is appended to the error's location, ``code`` names it."""

    def __init__(self, message: str, sub_param: str = "", code: str = "invalid_value") -> None:
        super().__init__(message)
        self.sub_param = sub_param
        self.code = code


class LoneSurrogateError(FieldValueError):
    def __init__(self, param: str, index: int, char: str) -> None:
        super().__init__(
            f"contains the lone UTF-16 surrogate U+{ord(char):04X} at character {index}, which is not valid "
            "Unicode text; send well-formed UTF-8 (pair the surrogate or drop it)",
            sub_param=param,
            code=INVALID_UNICODE_CODE,
        )


def _first_surrogate(text: str) -> int | None:
    # Fast path: well-formed text encodes; only a failure needs the scan for the position.
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


def find_lone_surrogate(value: Any, path: str = "") -> LoneSurrogateError | None:
    """The first lone surrogate in a parsed JSON value (keys included), as an error naming its path."""
    if isinstance(value, str):
        index = _first_surrogate(value)
        return None if index is None else LoneSurrogateError(path, index, value[index])
    if isinstance(value, dict):
        for key, item in value.items():
            key_text = str(key)
            child = f"{path}.{key_text}" if path else key_text
            index = _first_surrogate(key_text)
            if index is not None:
                return LoneSurrogateError(path, index, key_text[index])
            found = find_lone_surrogate(item, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for position, item in enumerate(value):
            found = find_lone_surrogate(item, f"{path}.{position}" if path else str(position))
            if found is not None:
                return found
    return None


def reject_lone_surrogates(data: Any) -> Any:
    """A pydantic ``mode="before"`` model validator body: raise on the first lone surrogate, else pass through."""
    found = find_lone_surrogate(data)
    if found is not None:
        raise found
    return data


def check_tool_message(role: str, content: Any) -> None:
    # OpenAI requires a tool result's content; an empty template slot would silently drop the result.
    if role == "tool" and (content is None or content == []):
        raise FieldValueError("a message with role 'tool' must have content (the tool's result)", "content")


def describe_undecodable(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start:exc.end].hex(" ")
    return (
        f"the request body is not valid UTF-8: byte(s) {bad} at offset {exc.start} ({exc.reason}); "
        "send JSON encoded as UTF-8"
    )
