"""`validation_prompt_file`: the prompts rendered at each validation and by `longcat validate`.

Two forms. A text file (musubi-tuner's habit): one prompt per line, blank lines and lines starting
with `#` skipped, and ` --i PATH` after a prompt for its start image (image-to-video; relative
paths start at the prompt file's folder). musubi's other per-prompt flags (`--w`, `--h`, `--f`,
`--d`, `--s`, `--g`, `--n`, ...) are ignored with one warning, as the render settings are the
`validation_*` keys. A `.json` file is SimpleTuner's `user_prompt_library`: an object of
`"name": "prompt"` or `"name": {"prompt": ...}` (`caption` and `tags` also name the prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_train.config.jsonc import JsoncSyntaxError, loads_jsonc
from longcat_train.config.problems import ProblemList

COMMENT = "#"
IMAGE_FLAG = "i"  # musubi-tuner's flag for a prompt's start image
_FLAG = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
_LIBRARY_PROMPT_KEYS = ("prompt", "caption", "tags")  # what SimpleTuner reads in a library entry


@dataclass(frozen=True)
class PromptEntry:
    """One render: its name (the library's, or `line<N>`), prompt, and start image (None: text-to-video)."""

    name: str
    prompt: str
    image: Path | None = None


def _text_entries(path: Path, text: str, problems: ProblemList) -> list[PromptEntry]:
    entries: list[PromptEntry] = []
    ignored: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(COMMENT):
            continue
        flags = list(_FLAG.finditer(line))
        prompt = line[: flags[0].start()].strip() if flags else line
        image: Path | None = None
        for index, flag in enumerate(flags):
            value = line[flag.end(): flags[index + 1].start() if index + 1 < len(flags) else len(line)].strip()
            if flag.group(1) != IMAGE_FLAG:
                ignored.add(f"--{flag.group(1)}")
                continue
            image = (path.parent / value).resolve() if value else None
            if image is None or not image.is_file():
                problems.add(path, f"line {number} --i", value, "start image does not exist" if value else "--i names no file",
                             "give an existing image (relative paths start at the prompt file's folder)")
        if not prompt:
            problems.add(path, f"line {number}", line, "no prompt before the flags", "write the prompt first, then --i PATH")
            continue
        entries.append(PromptEntry(f"line{number}", prompt, image))
    if ignored:
        problems.add(path, ", ".join(sorted(ignored)), None,
                     "per-prompt render settings are ignored: every render uses the validation_* keys",
                     "remove the flags, or set validation_resolution, validation_num_video_frames, ... in the config",
                     severity="warning")
    return entries


def _library_entries(path: Path, text: str, problems: ProblemList) -> list[PromptEntry]:
    try:
        library: Any = loads_jsonc(text)
    except JsoncSyntaxError as error:
        problems.add(path, f"line {error.line}", None, f"invalid JSON: {error.message}",
                     f"fix the syntax at line {error.line}, column {error.column}")
        return []
    if not isinstance(library, dict):
        problems.add(path, "(file)", type(library).__name__, "a prompt library is one JSON object",
                     'write {"name": "a prompt", ...}')
        return []
    entries: list[PromptEntry] = []
    for name, value in library.items():
        prompt = value if isinstance(value, str) else next(
            (value[k] for k in _LIBRARY_PROMPT_KEYS if isinstance(value, dict) and isinstance(value.get(k), str)), None)
        if prompt is None:
            problems.add(path, name, value, "an entry must be a prompt or an object with a \"prompt\"",
                         f'write "{name}": "a prompt" or "{name}": {{"prompt": "a prompt"}}')
            continue
        entries.append(PromptEntry(name, prompt))
    return entries


def read_prompt_file(path: Path, key_file: Path, problems: ProblemList) -> list[PromptEntry]:
    """The entries of `path` (problems added; `key_file` is the config naming it, for a missing file)."""
    if not path.is_file():
        problems.add(key_file, "validation_prompt_file", str(path), "file does not exist",
                     "give a text file with one prompt per line, or a SimpleTuner prompt library (.json); "
                     "relative paths start at the config file's folder")
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        problems.add(path, "(file)", None, f"cannot read the file: {error}", "save it as UTF-8 text")
        return []
    reader = _library_entries if path.suffix.lower() == ".json" else _text_entries
    errors_before = len(problems.errors)
    entries = reader(path, text, problems)
    if not entries and len(problems.errors) == errors_before:
        problems.add(path, "(file)", None, "holds no prompt", "write one prompt per line")
    return entries
