"""`--set key=value` overrides: `learning_rate=2e-4`, `datasets[clips].video.num_frames=33`.

The value is parsed as JSON when it is valid JSON (numbers, true/false/null, lists, quoted
strings) and taken as a plain string otherwise, so paths and prompts need no quoting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from longcat_train.config.problems import ProblemList

OVERRIDE_SOURCE = "--set"
_DATASET_KEY = re.compile(r"^datasets\[([^\]]+)\]\.(.+)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Override:
    """One parsed override. `dataset` is None for a training key, else an index or a dataset id."""

    path: tuple[str, ...]
    value: Any
    dataset: int | str | None = None

    @property
    def text(self) -> str:
        key = ".".join(self.path)
        return key if self.dataset is None else f"datasets[{self.dataset}].{key}"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(items: tuple[str, ...] | list[str], problems: ProblemList) -> list[Override]:
    parsed: list[Override] = []
    for item in items:
        key, sep, raw_value = item.partition("=")
        key = key.strip()
        dataset: int | str | None = None
        match = _DATASET_KEY.match(key)
        if match:
            selector, key = match.group(1).strip(), match.group(2)
            dataset = int(selector) if selector.isdigit() else selector
        path = tuple(key.split("."))
        if not sep or not all(_NAME.match(part) for part in path):
            problems.add(
                OVERRIDE_SOURCE,
                item,
                item,
                "an override must look like KEY=VALUE",
                "write e.g. --set learning_rate=2e-4 or --set datasets[my-clips].video.num_frames=33",
            )
            continue
        parsed.append(Override(path, _parse_value(raw_value), dataset))
    return parsed


def apply_override(target: dict[str, Any], override: Override) -> None:
    """Set `override.path` inside `target`, creating nested tables as needed."""
    node = target
    for part in override.path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[override.path[-1]] = override.value
