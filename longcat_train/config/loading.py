"""`load_config`: read config.json and multidatabackend.json, apply overrides, check everything.

Every problem in both files is collected before anything is raised, and nothing heavy (torch,
models, media) is touched, so a broken config fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_train.config.checks import BackendEntry, check_datasets, check_paths, check_training
from longcat_train.config.datasets import DatasetConfig, TextEmbedsConfig, VideoOptions
from longcat_train.config.jsonc import DuplicateKeyError, JsoncSyntaxError, loads_jsonc
from longcat_train.config.model_paths import default_checkpoint_dir
from longcat_train.config.model_problems import accepted_keys, validate_table
from longcat_train.config.overrides import OVERRIDE_SOURCE, Override, apply_override, parse_overrides
from longcat_train.config.problems import ConfigError, ConfigProblem, ProblemList
from longcat_train.config.prompt_file import PromptEntry, read_prompt_file
from longcat_train.config.simpletuner import (
    SIMPLETUNER_DATASET_KEYS,
    SIMPLETUNER_TRAINING_KEYS,
    fill_placeholders,
    names_of_one_setting,
    strip_cli_prefixes,
    translate,
)
from longcat_train.config.training import TrainingConfig

FILE_KEY = "(file)"


@dataclass(frozen=True)
class LoadedConfig:
    """Both files, validated, with every path made absolute.

    `datasets` holds the enabled video/image/conditioning entries in file order; disabled ones
    are in `disabled_datasets`; the `text_embeds` entry (if any) is separate. `warnings` are
    problems that do not stop a run. `prompt_entries` are the prompts of `validation_prompt_file`.
    """

    training: TrainingConfig
    datasets: list[DatasetConfig]
    config_path: Path
    backend_path: Path
    text_embeds: TextEmbedsConfig | None = None
    disabled_datasets: list[DatasetConfig] = field(default_factory=list)
    warnings: list[ConfigProblem] = field(default_factory=list)
    prompt_entries: list[PromptEntry] = field(default_factory=list)

    def dataset(self, dataset_id: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.id == dataset_id:
                return dataset
        raise KeyError(dataset_id)

    @property
    def training_datasets(self) -> list[DatasetConfig]:
        """Video/image datasets that are trained on (not start frames, not the eval split)."""
        return [
            d
            for d in self.datasets
            if d.kind.trained and d.id != self.training.eval_dataset_id
        ]

    @property
    def eval_dataset(self) -> DatasetConfig | None:
        eval_id = self.training.eval_dataset_id
        return None if eval_id is None else self.dataset(eval_id)

    @property
    def model_dir(self) -> Path:
        path = self.training.pretrained_model_name_or_path
        assert path is not None  # always resolved by load_config
        return path


def resolve_path(raw: Path, base: Path) -> Path:
    """An absolute path for `raw`: relative to `base`; when nothing is there but something is
    relative to the current directory (SimpleTuner's convention), that one."""
    path = raw.expanduser()
    if path.is_absolute():
        return path
    candidate = Path(os.path.abspath(base / path))
    from_cwd = Path(os.path.abspath(path))
    return from_cwd if not candidate.exists() and from_cwd.exists() else candidate


def _read_json_file(path: Path, key: str, referenced_from: Path | str | None, problems: ProblemList) -> Any:
    """The parsed content of `path`, or None with a problem added."""
    if not path.is_file():
        where, fix_key = (referenced_from, key) if referenced_from is not None else (path, FILE_KEY)
        problems.add(
            where,
            fix_key,
            str(path),
            "file does not exist" if not path.exists() else "is not a file",
            "give the path of an existing file (relative paths start at the config file's folder); "
            "`longcat config init DIR` writes examples to start from",
        )
        return None
    try:
        return loads_jsonc(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as error:
        problems.add(
            path, f"{FILE_KEY} line {error.line}", error.key, f"duplicate key: {error.message}",
            f"keep one of lines {error.first_line} and {error.line} (JSON would silently keep only the last)",
        )
    except JsoncSyntaxError as error:
        problems.add(
            path,
            f"{FILE_KEY} line {error.line}, column {error.column}",
            None,
            f"invalid JSON: {error.message}",
            f"fix the syntax at line {error.line}, column {error.column} (// and /* */ comments "
            "and trailing commas are fine; keys and strings need double quotes)",
        )
    except (OSError, UnicodeDecodeError) as error:
        problems.add(path, FILE_KEY, None, f"cannot read the file: {error}", "save it as UTF-8 text")
    return None


def _dataset_selector_index(override: Override, raw_entries: list[Any]) -> int | None:
    if isinstance(override.dataset, int):
        return override.dataset if override.dataset < len(raw_entries) else None
    for index, entry in enumerate(raw_entries):
        if isinstance(entry, dict) and entry.get("id") == override.dataset:
            return index
    return None


_TRAINING_KEYS = accepted_keys(TrainingConfig)
_DATASET_KEYS = accepted_keys(DatasetConfig)
_VIDEO_KEYS = accepted_keys(VideoOptions)


def load_config(
    config_path: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    check_files: bool = True,
    check_model: bool = True,
) -> LoadedConfig:
    """Load and check `config_path` and the `data_backend_config` it names.

    `overrides` are `key=value` strings (see `overrides.py`). With `check_files=False` the
    checkpoint, dataset directories and resume path are not looked at (the dataset list is
    still read); `check_model=False` skips only the checkpoint (for work that needs no
    model, such as `data check`). Raises `ConfigError` with every error found.
    """
    config_path = Path(os.path.abspath(Path(config_path).expanduser()))
    problems = ProblemList()
    parsed_overrides = parse_overrides(tuple(overrides), problems)
    raw_training = _read_json_file(config_path, FILE_KEY, None, problems)
    if not isinstance(raw_training, dict):
        # Without the settings nothing else can be checked; report what is known so far.
        if raw_training is not None or config_path not in {p.file for p in problems.problems}:
            problems.add(config_path, FILE_KEY, raw_training, "config.json must hold one JSON object",
                         'write {"model_family": "longcat_video", ...}')
        raise ConfigError(problems.problems)

    raw_training = strip_cli_prefixes(raw_training, config_path, problems)
    overridden: set[str] = set()
    dataset_overrides: list[Override] = []
    for override in parsed_overrides:
        if override.dataset is None:
            # `--set validation_steps=null` replaces the setting whichever name the file gives it
            ours, names = names_of_one_setting(override.path[0], SIMPLETUNER_TRAINING_KEYS)
            for name in names - {ours}:
                raw_training.pop(name, None)
            override = dataclasses.replace(override, path=(ours, *override.path[1:]))
            apply_override(raw_training, override)
            overridden.add(override.path[0])
        else:
            dataset_overrides.append(override)
    placeholders = dict(raw_training)  # SimpleTuner's `{model_family}` & co. in either file
    translated = translate(fill_placeholders(raw_training, placeholders), SIMPLETUNER_TRAINING_KEYS, config_path, "", problems)

    validated_from = len(problems.problems)
    training = validate_table(
        TrainingConfig, translated.table, config_path, "", problems,
        elsewhere={"in a dataset entry of multidatabackend.json": _DATASET_KEYS,
                    "under a dataset's \"video\" section in multidatabackend.json": _VIDEO_KEYS},
    )
    if training is None:  # only when a bad key has no default; keep checking the datasets
        training = TrainingConfig()
    training_problem_keys = problems.keys()

    config_dir = config_path.parent
    cwd = Path.cwd()

    def base_for(key: str) -> Path:
        return cwd if key in overridden else config_dir

    training, from_default = _resolve_training_paths(training, base_for)
    backend_path = training.data_backend_config
    backend_raw = _read_json_file(backend_path, "data_backend_config", config_path, problems)
    entries: list[BackendEntry] = []
    if backend_raw is not None and not isinstance(backend_raw, list):
        problems.add(backend_path, FILE_KEY, type(backend_raw).__name__,
                     "multidatabackend.json must hold a JSON list of dataset entries", "wrap the entries in [ ... ]")
    elif backend_raw is not None:
        raw_entries = [fill_placeholders(entry, placeholders) for entry in backend_raw]
        entries = _validate_entries(
            raw_entries, dataset_overrides, translated.dataset_defaults, backend_path, training, problems
        )
    dataset_problem_keys = problems.keys() - training_problem_keys

    cross = ProblemList()
    check_training(training, config_path, cross)
    if backend_raw is not None and isinstance(backend_raw, list):
        check_datasets(entries, training, config_path, backend_path, cross)
    if check_files:
        check_paths(training, from_default if check_model else None, entries, config_path, backend_path, cross)
    # A key that already failed validation was replaced by its default for these checks; what
    # they say about it would be noise.
    already = training_problem_keys | dataset_problem_keys
    problems.extend([p for p in cross.problems if p.key not in already])
    translated.name_as_written(problems, validated_from)

    prompt_file = training.validation_prompt_file
    prompt_entries = [] if prompt_file is None else read_prompt_file(prompt_file, config_path, problems)

    if problems.errors:
        raise ConfigError(problems.problems)
    datasets = [e.model for e in entries if isinstance(e.model, DatasetConfig)]
    text_embeds = [e.model for e in entries if isinstance(e.model, TextEmbedsConfig) and not e.model.disabled]
    return LoadedConfig(
        training=training,
        datasets=[d for d in datasets if not d.disabled],
        config_path=config_path,
        backend_path=backend_path,
        text_embeds=next((t for t in text_embeds if t.default), text_embeds[0] if text_embeds else None),
        disabled_datasets=[d for d in datasets if d.disabled],
        warnings=problems.warnings,
        prompt_entries=prompt_entries,
    )


def _resolve_training_paths(training: TrainingConfig, base_for: Any) -> tuple[TrainingConfig, bool]:
    """Absolute paths in `training`; also whether the checkpoint path came from the flavour."""
    checkpoint = training.pretrained_model_name_or_path
    from_default = checkpoint is None
    update: dict[str, Any] = {
        "output_dir": resolve_path(training.output_dir, base_for("output_dir")),
        "data_backend_config": resolve_path(training.data_backend_config, base_for("data_backend_config")),
        "pretrained_model_name_or_path": default_checkpoint_dir(training.model_flavour)
        if checkpoint is None
        else resolve_path(checkpoint, base_for("pretrained_model_name_or_path")),
    }
    for key in ("validation_prompt_file", "validation_continuation_video"):
        if getattr(training, key) is not None:
            update[key] = resolve_path(getattr(training, key), base_for(key))
    resume = training.resume_from_checkpoint
    if resume is not None and resume != "latest":
        update["resume_from_checkpoint"] = str(resolve_path(Path(resume), base_for("resume_from_checkpoint")))
    return training.model_copy(update=update), from_default


def _validate_entries(
    raw_entries: list[Any],
    overrides: list[Override],
    dataset_defaults: dict[str, Any],
    backend_path: Path,
    training: TrainingConfig,
    problems: ProblemList,
) -> list[BackendEntry]:
    overridden: set[tuple[int, str]] = set()
    for override in overrides:
        index = _dataset_selector_index(override, raw_entries)
        if index is None or not isinstance(raw_entries[index], dict):
            problems.add(
                OVERRIDE_SOURCE, override.text, override.value, f"no dataset entry {override.dataset!r}",
                "select a dataset by its position (datasets[0]) or its id (datasets[my-clips])",
            )
            continue
        apply_override(raw_entries[index], override)
        overridden.add((index, override.path[0]))

    backend_dir = backend_path.parent
    entries: list[BackendEntry] = []
    for index, raw in enumerate(raw_entries):
        key = f"datasets[{index}]"
        if not isinstance(raw, dict):
            problems.add(backend_path, key, raw, "a dataset entry must be a JSON object",
                         'write {"id": "...", "dataset_type": "video", "instance_data_dir": "..."}')
            entries.append(BackendEntry(index, raw, None))
            continue
        translated = translate(raw, SIMPLETUNER_DATASET_KEYS, backend_path, key, problems)
        refused = problems.keys(backend_path)
        raw = translated.table
        if raw.get("dataset_type") != "text_embeds":
            raw = {**dataset_defaults, **raw}
        validated_from = len(problems.problems)
        model: DatasetConfig | TextEmbedsConfig | None
        if raw.get("dataset_type") == "text_embeds":
            model = validate_table(TextEmbedsConfig, raw, backend_path, key, problems)
        else:
            model = validate_table(
                DatasetConfig, raw, backend_path, key, problems,
                elsewhere={"in config.json": _TRAINING_KEYS, "under this entry's \"video\" section": _VIDEO_KEYS},
            )
        translated.name_as_written(problems, validated_from, key)
        if f"{key}.type" in refused:
            # a remote dataset has no instance_data_dir; the refusal's fix says to add one
            problems.problems = [p for p in problems.problems if p.key != f"{key}.instance_data_dir"]
        entries.append(BackendEntry(index, raw, _resolve_entry_paths(model, index, overridden, backend_dir, training)))
    return entries


def _resolve_entry_paths(
    model: DatasetConfig | TextEmbedsConfig | None,
    index: int,
    overridden: set[tuple[int, str]],
    backend_dir: Path,
    training: TrainingConfig,
) -> DatasetConfig | TextEmbedsConfig | None:
    def base_for(key: str) -> Path:
        return Path.cwd() if (index, key) in overridden else backend_dir

    if isinstance(model, TextEmbedsConfig):
        return model.model_copy(update={"cache_dir": resolve_path(model.cache_dir, base_for("cache_dir"))})
    if isinstance(model, DatasetConfig):
        cache = model.cache_dir_vae
        return model.model_copy(
            update={
                "instance_data_dir": resolve_path(model.instance_data_dir, base_for("instance_data_dir")),
                "cache_dir_vae": training.output_dir / "cache" / "vae" / model.id
                if cache is None
                else resolve_path(cache, base_for("cache_dir_vae")),
            }
        )
    return None
