"""Config problems: what is wrong, where, and how to fix it, collected and reported together."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

Severity = Literal["error", "warning"]
_VALUE_WIDTH = 60


class _MissingType:
    """Marks a key that is absent (as opposed to present with the value null)."""

    def __repr__(self) -> str:
        return "(missing)"


MISSING: Any = _MissingType()


def show_value(value: Any) -> str:
    """A short rendering of a bad value, JSON-like as the user wrote it, truncated."""
    if value is MISSING:
        return "(missing)"
    if isinstance(value, Path):
        text = str(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


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


def problems_table(problems: list[ConfigProblem], title: str) -> Table:
    table = Table(title=title, show_lines=True, title_justify="left", expand=False)
    table.add_column("file", overflow="fold", style="dim")
    table.add_column("key", overflow="fold", style="bold")
    table.add_column("value", overflow="fold")
    table.add_column("problem", overflow="fold")
    table.add_column("fix", overflow="fold", style="green")
    for problem in problems:
        style = "red" if problem.severity == "error" else "yellow"
        table.add_row(
            _short_path(problem.file),
            problem.key,
            show_value(problem.value),
            Text(problem.rule, style=style),
            problem.fix,
        )
    return table


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
        yield problems_table(errors, f"[bold red]{len(errors)} config {noun}; nothing was started[/]")
        warnings = [p for p in self.problems if p.severity == "warning"]
        if warnings:
            yield problems_table(warnings, "[bold yellow]warnings[/]")
