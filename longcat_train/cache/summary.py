"""What one caching pass did (encoded / reused / rebuilt / failed) and its progress bar."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class Outcome(Enum):
    ENCODED = "encoded"  # no entry existed
    REUSED = "reused"  # a valid entry existed
    REBUILT = "rebuilt"  # an entry existed but was corrupt; encoded again and rewritten


@dataclass(frozen=True)
class CacheIssue:
    label: str  # what the entry is for (a clip path, a prompt)
    reason: str


@dataclass
class CacheSummary:
    name: str
    encoded: int = 0
    reused: int = 0
    rebuilt: list[CacheIssue] = field(default_factory=list)
    failed: list[CacheIssue] = field(default_factory=list)

    def record(self, outcome: Outcome, label: str, reason: str = "") -> None:
        if outcome is Outcome.ENCODED:
            self.encoded += 1
        elif outcome is Outcome.REUSED:
            self.reused += 1
        else:
            self.rebuilt.append(CacheIssue(label, reason))

    def record_failure(self, label: str, error: Exception) -> None:
        self.failed.append(CacheIssue(label, f"{type(error).__name__}: {error}"))

    def as_table(self) -> Table:
        table = Table(title=f"{self.name} cache")
        for column in ("encoded", "reused", "rebuilt", "failed"):
            table.add_column(column, justify="right")
        table.add_row(str(self.encoded), str(self.reused), str(len(self.rebuilt)), str(len(self.failed)))
        return table

    def issues_table(self) -> Table:
        table = Table(title=f"{self.name} cache: entries rebuilt or failed")
        table.add_column("what")
        table.add_column("entry")
        table.add_column("reason")
        for kind, issues in (("rebuilt", self.rebuilt), ("failed", self.failed)):
            for issue in issues:
                table.add_row(kind, issue.label, issue.reason)
        return table


def cache_progress(enabled: bool) -> Progress:
    """A rich progress bar with count, elapsed time and ETA; `enabled=False` draws nothing."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
