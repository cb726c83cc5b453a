"""The names and words of the extension tables in the code, read from their source text.

A LoRA file format is one row of `LORA_FORMATS` (`lora/formats.py`), an attention backend one row
of `ATTENTION_BACKENDS` (`model/attention.py`); each row carries its own words (`note`, `title`,
`requires`, `install`) as plain literals. The config needs those names and words (the values it
accepts, `config.md`, the CLI's help, the packages a value needs) but loads before torch and sits
below `lora/` and `model/` in the layers, so it cannot import them: it reads their tables as text
with `ast` instead, and the code's table stays the only place a name is written.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from longcat_train.config.dependencies import Requirement

# The package's folder, found beside this file: `importlib.util.find_spec("longcat_train.lora.formats")`
# would import `longcat_train.lora` (and torch) to find it.
PACKAGE = Path(__file__).parents[1]


class ExtensionTableError(ValueError):
    """A code table the config cannot read as text (a developer's mistake, found at import)."""


@dataclass(frozen=True)
class Choice:
    """One name of an extension table, with the words the docs and the CLI use for it."""

    note: str = ""  # said after the name in the key's description: "`official` (LongCat's own format)"
    title: str = ""  # the name in a sentence ("official LongCat"); LoRA formats need one (CLI, errors)
    requires: Requirement | None = None  # an optional package it needs (checked when the config loads)


# The keyword arguments of a row the config reads, and the literal each must be (tuples hold strings).
CHOICE_WORDS: dict[str, type] = {"note": str, "title": str, "requires": tuple, "install": str}


def extension_choices(source: Path, table: str) -> dict[str, Choice]:
    """The rows of the code table `table` in `source`, in order, as the config's `Choice`s."""
    choices = {}
    for name, words in read_table_rows(source, table, CHOICE_WORDS).items():
        requires = words.get("requires", ())
        if requires and not words.get("install"):
            raise ExtensionTableError(f"{source}: {table}[{name!r}] has `requires` but no `install`; "
                                      'add install="<the command that installs it>"')
        choices[name] = Choice(note=words.get("note", ""), title=words.get("title", ""),
                               requires=Requirement(requires, words["install"]) if requires else None)
    return choices


def read_table_rows(source: Path, table: str, words: dict[str, type]) -> dict[str, dict[str, object]]:
    """Each key of the module-level dict literal `table` in `source`, in order, with those keyword
    arguments of its row (a call) that `words` names, as values. Other keywords (the row's functions)
    are the code's and are skipped; a named one that is not a literal of its type is an error."""
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    value = _assigned_value(tree, table)
    if not isinstance(value, ast.Dict):
        raise ExtensionTableError(f"{source}: no module-level `{table} = {{...}}` (a dict literal) to read the "
                                  f"config's names from; keep the table a dict literal at the top level")
    rows: dict[str, dict[str, object]] = {}
    for key, row in zip(value.keys, value.values, strict=True):
        name = _literal(key)
        where = f"{source}:{row.lineno}: {table}[{name!r}]"
        if not isinstance(name, str):
            raise ExtensionTableError(f"{source}:{row.lineno}: a key of {table} that is not a string literal; "
                                      "write the name as a plain string")
        if not isinstance(row, ast.Call):
            raise ExtensionTableError(f"{where} is not a call; write the row as `Row(..., note=\"...\")`")
        if any(keyword.arg is None for keyword in row.keywords):
            raise ExtensionTableError(f"{where} unpacks keywords (**); write each of {', '.join(words)} out")
        rows[name] = {keyword.arg: _word(keyword, words[keyword.arg], where)
                      for keyword in row.keywords if keyword.arg in words}
    return rows


def _assigned_value(tree: ast.Module, name: str) -> ast.expr | None:
    """The value of the last top-level `name = ...` or `name: T = ...` (what the module ends up with)."""
    found = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            found = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            found = node.value
    return found


def _literal(node: ast.expr | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


def _word(keyword: ast.keyword, kind: type, where: str) -> object:
    value = _literal(keyword.value)
    strings = not isinstance(value, tuple) or all(isinstance(item, str) for item in value)
    if not isinstance(value, kind) or not strings:
        raise ExtensionTableError(
            f"{where}: {keyword.arg}= is not a literal {'tuple of strings' if kind is tuple else 'string'}; the config "
            "reads it as text (without importing the module), so write the value itself, not a name or an expression"
        )
    return value
