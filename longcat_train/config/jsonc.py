"""JSON with `//` and `/* */` comments and trailing commas, as the LongCat-Video guides write it.

Written here because none of the pinned dependencies parses commented JSON and the grammar is
small: comments and trailing commas are blanked out (newlines kept, so the standard `json`
module's line/column in an error still point at the user's text), then `json.loads` parses.
A UTF-8 byte-order mark (Windows editors write one) is dropped; a key given twice in one object
is an error naming both lines, as `json` would silently keep the last value.
"""

from __future__ import annotations

import json
import re
from typing import Any

BYTE_ORDER_MARK = "\ufeff"
# A JSON string (escapes included) or one structural character: enough to find each object's keys.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]')


class JsoncSyntaxError(ValueError):
    """Invalid JSON; `line` and `column` are 1-based positions in the original text."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{message} at line {line}, column {column}")
        self.message = message
        self.line = line
        self.column = column


class DuplicateKeyError(JsoncSyntaxError):
    """A key written twice in one object; `line`/`column` point at the second, `first_line` at the first."""

    def __init__(self, key: str, first_line: int, line: int, column: int) -> None:
        super().__init__(f'"{key}" is given twice in one object (first at line {first_line})', line, column)
        self.key = key
        self.first_line = first_line


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise _Duplicate(key)
        table[key] = value
    return table


def _position(text: str, index: int) -> tuple[int, int]:
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def _locate_duplicate(text: str, key: str) -> DuplicateKeyError:
    """Where `key` is given twice in one object of `text` (comment-free), found by walking its tokens."""
    tokens = list(_TOKEN.finditer(text))
    objects: list[dict[str, int] | None] = []  # per open bracket: the keys seen (None for a list)
    for number, token in enumerate(tokens):
        kind = token.group()
        if kind in "{[":
            objects.append({} if kind == "{" else None)
        elif kind in "}]":
            objects.pop()
        elif kind.startswith('"') and objects and objects[-1] is not None:
            is_key = number + 1 < len(tokens) and tokens[number + 1].group() == ":"
            if is_key and json.loads(kind) == key:
                seen = objects[-1]
                if key in seen:
                    return DuplicateKeyError(key, seen[key], *_position(text, token.start()))
                seen[key] = _position(text, token.start())[0]
    return DuplicateKeyError(key, 1, 1, 1)  # unreachable for text `json` parsed


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
    """Parse commented JSON; raises `JsoncSyntaxError` (`DuplicateKeyError` for a repeated key)
    with the position in `text`."""
    plain = strip_comments(text.removeprefix(BYTE_ORDER_MARK))
    try:
        return json.loads(plain, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as error:
        raise JsoncSyntaxError(error.msg, error.lineno, error.colno) from error
    except _Duplicate as duplicate:
        raise _locate_duplicate(plain, duplicate.key) from None
    except RecursionError as error:  # the parser recurses per level: 100k nested arrays exhaust the stack
        raise JsoncSyntaxError("arrays or objects nested too deeply", 1, 1) from error
