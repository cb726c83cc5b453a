"""Config problems: what is wrong, where, and how to fix it, collected and reported together."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

Severity = Literal["error", "warning"]
_VALUE_WIDTH = 60


class _MissingType:
    """Marks a key that is absent (as opposed to present with the value null)."""

    def __repr__(self) -> str:
        return "(missing)"


MISSING: Any = _MissingType()


def json_value(value: Any) -> Any:
    """`value` as a JSON document holds it: a path as its text, what JSON cannot hold as its repr."""
    if isinstance(value, Path):
        return str(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def show_value(value: Any, limit: int | None = _VALUE_WIDTH) -> str:
    """A bad value, JSON-like as the user wrote it (a path or a repr as is), cut to `limit` characters."""
    if value is MISSING:
        return "(missing)"
    plain = json_value(value)
    text = plain if isinstance(plain, str) and not isinstance(value, str) else json.dumps(plain, ensure_ascii=False)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class ConfigProblem:
    """One problem: the file, the key path (`datasets[1].video.num_frames`), the value, the rule
    it breaks and the fix. Warnings are reported but do not stop a run."""

    file: Path | str | None
    key: str
    value: Any
    rule: str
    fix: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file is not None else ""
        return f"{where}{self.key} = {show_value(self.value)}: {self.rule}. Fix: {self.fix}"

    def as_json(self) -> dict[str, Any]:
        return {
            "file": None if self.file is None else str(self.file),
            "key": self.key,
            "value": None if self.value is MISSING else json_value(self.value),
            "missing": self.value is MISSING,
            "rule": self.rule,
            "fix": self.fix,
            "severity": self.severity,
        }


def problems_document(problems: list[ConfigProblem]) -> dict[str, Any]:
    """The start of every `--json` document: `ok` unless a problem is an error, and the problems."""
    return {"ok": not any(p.severity == "error" for p in problems), "problems": [p.as_json() for p in problems]}


@dataclass
class ProblemList:
    """Accumulates problems while every check runs, so the user sees all of them at once."""

    problems: list[ConfigProblem] = field(default_factory=list)

    def add(
        self,
        file: Path | str | None,
        key: str,
        value: Any,
        rule: str,
        fix: str,
        severity: Severity = "error",
    ) -> None:
        self.problems.append(ConfigProblem(file, key, value, rule, fix, severity))

    def extend(self, problems: list[ConfigProblem]) -> None:
        self.problems.extend(problems)

    @property
    def errors(self) -> list[ConfigProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[ConfigProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    def keys(self, file: Path | str | None = None) -> set[str]:
        return {p.key for p in self.problems if file is None or p.file == file}


def _short_path(file: Path | str | None) -> str:
    """The file relative to the current directory when it is below it (tables stay narrow)."""
    if file is None:
        return ""
    if isinstance(file, Path):
        try:
            return str(file.relative_to(Path.cwd()))
        except ValueError:
            return str(file)
    return file


class ValueTable(Table):
    """The table every command prints: it never cuts a value to `…` (its columns fold in a narrow
    terminal; the CLI prints piped output on a console wide enough that nothing folds; the table is
    at least as wide as its title, which holds dataset ids), and a `str` title or cell is plain text,
    so a user's `datasets[clips]` or `a[b].mp4` is not taken for rich markup. A styled cell is passed
    as `Text`; a column as its header or a `Column`."""

    def __init__(self, *columns: str | Column, title: str | None = None, **options: Any) -> None:
        if title is not None:
            options.setdefault("min_width", cell_len(title))
        super().__init__(*columns, title=None if title is None else escape(title), **options)
        for column in self.columns:
            column.overflow = "fold"

    def add_row(self, *cells: Any, **options: Any) -> None:
        super().add_row(*(escape(c) if isinstance(c, str) else c for c in cells), **options)


def problems_table(problems: list[ConfigProblem], title: str, title_style: str) -> Table:
    table = ValueTable(
        Column("file", style="dim"), Column("key", style="bold"), "value", "problem", Column("fix", style="green"),
        title=title, title_style=title_style, show_lines=True, title_justify="left",
    )
    for problem in problems:
        style = "red" if problem.severity == "error" else "yellow"
        table.add_row(
            _short_path(problem.file),
            problem.key,
            show_value(problem.value, limit=None),
            Text(problem.rule, style=style),
            problem.fix,
        )
    return table


def warnings_table(warnings: list[ConfigProblem]) -> Table:
    return problems_table(warnings, "warnings", "bold yellow")


class ConfigError(Exception):
    """Every error found in the config files (and any warnings found with them)."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        super().__init__(f"{len(errors)} config error(s):\n" + "\n".join(f"- {p}" for p in errors))

    @property
    def errors(self) -> list[ConfigProblem]:
        return [p for p in self.problems if p.severity == "error"]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        errors = self.errors
        noun = "problem" if len(errors) == 1 else "problems"
        yield problems_table(errors, f"{len(errors)} config {noun}; nothing was started", "bold red")
        warnings = [p for p in self.problems if p.severity == "warning"]
        if warnings:
            yield warnings_table(warnings)
