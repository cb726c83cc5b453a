"""Validate one raw table against a pydantic model, turning its errors into `ConfigProblem`s.

pydantic reports every field error of a table at once; this module adds what a person needs to
act: the key path as written in the file, "did you mean" for unknown keys, and a fix per rule.
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from longcat_train.config.problems import MISSING, ProblemList

ModelT = TypeVar("ModelT", bound=BaseModel)

_BOUNDS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
}


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "text in double quotes",
    "list": "a JSON list [ ... ]",
    "model": "a JSON object { ... }",
    "dict": "a JSON object { ... }",
    "path": "a path in double quotes",
}


def accepted_keys(model: type[BaseModel]) -> list[str]:
    """Field names and their alternative names (aliases) that a table of `model` accepts."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        keys.append(name)
        if isinstance(info.validation_alias, AliasChoices):
            keys.extend(str(c) for c in info.validation_alias.choices if c != name)
    return keys


def _nested_model(info: FieldInfo) -> type[BaseModel] | None:
    candidates = [info.annotation, *typing.get_args(info.annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_for(model: type[BaseModel], key: str) -> tuple[str, FieldInfo] | None:
    for name, info in model.model_fields.items():
        if key == name or (isinstance(info.validation_alias, AliasChoices) and key in info.validation_alias.choices):
            return name, info
    return None


def _key_path(model: type[BaseModel], loc: Sequence[str | int]) -> tuple[str, type[BaseModel], FieldInfo | None]:
    """The path of `loc` as the user writes it, the model owning its last key, and that field.

    Below a field that is not a nested table, string segments are pydantic's names for union
    members (`float` in `fps.float`), not keys: they are dropped.
    """
    path = ""
    owner, info = model, None
    current: type[BaseModel] | None = model
    for segment in loc:
        if isinstance(segment, int):
            path += f"[{segment}]"
        elif current is not None:
            path += f".{segment}" if path else segment
            found = _field_for(current, segment)
            owner, info = current, (found[1] if found else None)
            current = _nested_model(info) if info is not None else None
    return path, owner, info


def _example(info: FieldInfo | None) -> str:
    if info is None or info.default is None or info.is_required():
        return ""
    default = info.default
    try:
        return f" (default {json.dumps(default if not isinstance(default, Path) else str(default))})"
    except (TypeError, ValueError):
        return ""


# Similarity (difflib's ratio) above which an unknown key is taken for a typo of a known one: one or
# two letters off (`lora_rnak`, `seeed`: 0.89). Below it a suggestion misleads: `vae_batch_size` is
# 0.80 from `train_batch_size`, `lora_type` 0.67 from `lora_init`.
TYPO_SIMILARITY = 0.85


def _unknown_key_fix(key: str, owner: type[BaseModel], elsewhere: dict[str, list[str]]) -> str:
    close = difflib.get_close_matches(key, accepted_keys(owner), n=1, cutoff=TYPO_SIMILARITY)
    if close:
        return f'did you mean "{close[0]}"? (rename it)'
    for place, keys in elsewhere.items():
        if key in keys:
            return f"this key belongs {place}; move it there"
    return "remove it; every accepted key is listed in docs/config.md"


def _problem_text(error: dict[str, Any], info: FieldInfo | None) -> tuple[str, str]:
    kind, ctx = error["type"], error.get("ctx") or {}
    if "fix" in ctx:
        return error["msg"], str(ctx["fix"])
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}", f"use one of {ctx.get('expected')}"
    if kind in _BOUNDS:
        bound_key, words = _BOUNDS[kind]
        return error["msg"], f"use a value {words} {ctx.get(bound_key)}{_example(info)}"
    if kind == "missing":
        return "required key is missing", "add it (see docs/config.md)"
    if kind.endswith(("_type", "_parsing")):
        expected = next((words for prefix, words in _TYPE_WORDS.items() if kind.startswith(prefix)), "a value of the right type")
        return f"wrong type: {error['msg']}", f"write {expected}{_example(info)}"
    return error["msg"], f"see docs/config.md for what this key accepts{_example(info)}"


def validate_table(
    model: type[ModelT],
    raw: dict[str, Any],
    file: Path | str,
    prefix: str,
    problems: ProblemList,
    elsewhere: dict[str, list[str]] | None = None,
) -> ModelT | None:
    """`model` built from `raw`, with every problem added to `problems`.

    When some keys are bad, the model is rebuilt from the good keys only (defaults for the rest)
    so later cross-checks still run; None when even that fails (e.g. a required key is bad).
    """
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        failed = _collect(error, model, raw, file, prefix, problems, elsewhere or {})
    try:
        return model.model_validate({k: v for k, v in raw.items() if k not in failed})
    except ValidationError:
        return None


def _collect(
    error: ValidationError,
    model: type[BaseModel],
    raw: dict[str, Any],
    file: Path | str,
    prefix: str,
    problems: ProblemList,
    elsewhere: dict[str, list[str]],
) -> set[str]:
    by_key: dict[str, list[tuple[dict[str, Any], type[BaseModel], FieldInfo | None]]] = {}
    failed_top: set[str] = set()
    for item in error.errors():
        loc = item["loc"]
        if loc and isinstance(loc[0], str):
            failed_top.add(loc[0])
        path, owner, info = _key_path(model, loc)
        by_key.setdefault(path, []).append((dict(item), owner, info))
    for path, items in by_key.items():
        key = f"{prefix}.{path}" if prefix and path else prefix or path
        first, owner, info = items[0]
        value = first.get("input", MISSING) if first["type"] != "missing" else MISSING
        if first["type"] == "extra_forbidden":
            last = path.rsplit(".", 1)[-1]
            problems.add(file, key, value, "unknown key", _unknown_key_fix(last, owner, elsewhere))
            continue
        texts = [_problem_text(item, info) for item, _, _ in items]
        rule = " or ".join(dict.fromkeys(text[0] for text in texts))
        rule_fixes = [text[1] for (item, _, _), text in zip(items, texts) if "fix" in (item.get("ctx") or {})]
        fix = rule_fixes[0] if rule_fixes else texts[0][1]
        problems.add(file, key, value, rule, fix)
    return failed_top
