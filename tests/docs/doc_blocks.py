"""Fenced code blocks of a Markdown file, by section, so a test can run a document's examples as written."""

from __future__ import annotations

import re
from pathlib import Path

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(path: Path, section: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under the ``## section`` heading of ``path``, in order."""
    text = path.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return [(match.group(1), match.group(2)) for match in _FENCE.finditer(body)]


def shell_commands(code: str, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and lines starting with a skipped
    prefix (e.g. the server start the test does itself) left out."""
    commands, current = [], ""
    for line in code.splitlines():
        current += line + "\n"
        if line.endswith("\\") or current.count("'") % 2:  # a continued line or an open single-quoted string
            continue
        command, current = current.strip(), ""
        if command and not command.startswith("#") and not command.startswith(skip_prefixes):
            commands.append(command)
    return commands
