"""JSON with `//` and `/* */` comments and trailing commas, as the LongCat-Video guides write it.

Written here because none of the pinned dependencies parses commented JSON and the grammar is
small: comments and trailing commas are blanked out (newlines kept, so the standard `json`
module's line/column in an error still point at the user's text), then `json.loads` parses.
"""

from __future__ import annotations

import json
from typing import Any


class JsoncSyntaxError(ValueError):
    """Invalid JSON; `line` and `column` are 1-based positions in the original text."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{message} at line {line}, column {column}")
        self.message = message
        self.line = line
        self.column = column


def _blank(text: str) -> str:
    return "".join(ch if ch == "\n" else " " for ch in text)


def strip_comments(text: str) -> str:
    """`text` with comments and trailing commas replaced by spaces (same length, same lines)."""
    out: list[str] = []
    i, n = 0, len(text)
    pending_comma: int | None = None  # index in `out` of a comma that may turn out to be trailing
    while i < n:
        ch = text[i]
        if ch == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[i : end + 1])
            pending_comma = None
            i = end + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            out.append(_blank(text[i:end]))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                line = text.count("\n", 0, i) + 1
                column = i - (text.rfind("\n", 0, i) + 1) + 1
                raise JsoncSyntaxError("unterminated /* comment", line, column)
            out.append(_blank(text[i : end + 2]))
            i = end + 2
        else:
            if ch in "}]" and pending_comma is not None:
                out[pending_comma] = " "
            if ch == ",":
                # Two commas in a row are an error for `json` to point at, not a trailing comma.
                pending_comma = len(out) if pending_comma is None else None
            elif not ch.isspace():
                pending_comma = None
            out.append(ch)
            i += 1
    return "".join(out)


def loads_jsonc(text: str) -> Any:
    """Parse commented JSON; raises `JsoncSyntaxError` with the position in `text`."""
    try:
        return json.loads(strip_comments(text))
    except json.JSONDecodeError as error:
        raise JsoncSyntaxError(error.msg, error.lineno, error.colno) from error
    except RecursionError as error:  # the parser recurses per level: 100k nested arrays exhaust the stack
        raise JsoncSyntaxError("arrays or objects nested too deeply", 1, 1) from error
