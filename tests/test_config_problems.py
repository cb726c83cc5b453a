"""Bad configs are rejected with a problem that names the key and the fix; all problems at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from longcat_train.config import ConfigError, load_config
from tests.config_factory import base_datasets, base_training, write_checkpoint, write_pair

Mutation = Callable[[dict[str, Any], list[dict[str, Any]], Path], None]


def _set(key: str, value: Any) -> Mutation:
    def mutate(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
        training[key] = value

    return mutate


def _set_dataset(index: int, key: str, value: Any) -> Mutation:
    def mutate(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
        if key.startswith("video."):
            datasets[index].setdefault("video", {})[key.split(".", 1)[1]] = value
        else:
            datasets[index][key] = value

    return mutate


def _drop(key: str) -> Mutation:
    def mutate(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
        training.pop(key, None)

    return mutate


def _no_length(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    training["max_train_steps"] = None
    training["num_train_epochs"] = None


def _duplicate_id(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    datasets.append(dict(datasets[1]))


def _strict_without_start_frames(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    datasets[0].pop("conditioning_data")
    datasets[0]["strict_pairing"] = True


def _checkpoint_without_vae(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    ckpt = write_checkpoint(root / "partial")
    (ckpt / "vae" / "config.json").unlink()
    training["pretrained_model_name_or_path"] = str(ckpt)


def _qwen_text_encoder(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    ckpt = write_checkpoint(
        root / "qwen", {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}
    )
    training["pretrained_model_name_or_path"] = str(ckpt)


def _keep_without_selective(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    training["keep_projections"] = ["qkv"]
    training["gradient_checkpointing_mode"] = "full"


def _fsdp_with(key: str, value: Any) -> Mutation:
    def mutate(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
        training |= {"distributed_strategy": "fsdp", key: value}

    return mutate


def _default_checkpoint_missing(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
    training["pretrained_model_name_or_path"] = None


# (case id, mutation, key named by the problem, text that must appear in the fix [, in the rule])
CASES: list[tuple[str, Mutation, str, str, str]] = [
    ("unknown key with suggestion", _set("lerning_rate", 1e-4), "lerning_rate", '"learning_rate"', "unknown key"),
    ("wrong type", _set("lora_rank", "eight"), "lora_rank", "a whole number", "wrong type"),
    ("validation frames rule", _set("validation_num_video_frames", 90), "validation_num_video_frames", "89 or 93", "(frames - 1) % 4"),
    ("dataset frames rule", _set_dataset(0, "video.num_frames", 50), "datasets[0].video.num_frames", "49 or 53", "% 4"),
    ("min_frames rule", _set_dataset(0, "video.min_frames", 10), "datasets[0].video.min_frames", "9 or 13", "% 4"),
    ("max below num_frames", _set_dataset(0, "video.max_frames", 49), "datasets[0].video.max_frames", "at least 93", "max_frames"),
    ("resolution not /16", _set("validation_resolution", "480x830"), "validation_resolution", "816 or 832", "multiple of 16"),
    ("resolution format", _set("validation_resolution", "480p"), "validation_resolution", '"480x832"', "HEIGHTxWIDTH"),
    ("alignment", _set("aspect_bucket_alignment", 48), "aspect_bucket_alignment", "32", "16, 32 or 64"),
    ("dataset resolution not /16", _set_dataset(0, "resolution", 500), "datasets[0].resolution", "480 or 512", "multiple of 16"),
    ("conditioning id missing", _set_dataset(0, "conditioning_data", ["nope"]), "datasets[0].conditioning_data", "'start-frames'", "does not exist"),
    ("conditioning names clips", _set_dataset(0, "conditioning_data", ["clips-val"]), "datasets[0].conditioning_data", '"dataset_type": "conditioning"', "not start frames"),
    ("eval id missing", _set("eval_dataset_id", "val"), "eval_dataset_id", "held-out split", "'val'"),
    ("strict pairing, no start frames", _strict_without_start_frames, "datasets[0].conditioning_data", "strict_pairing", "no fallback"),
    ("missing data dir", _set_dataset(1, "instance_data_dir", "data/none"), "datasets[1].instance_data_dir", "folder", "does not exist"),
    ("duplicate id", _duplicate_id, "datasets[3].id", "own id", "duplicate"),
    ("model family", _set("model_family", "wan"), "model_family", "'longcat_video'", "one of"),
    ("model type", _set("model_type", "full"), "model_type", "'lora'", "one of"),
    ("model flavour", _set("model_flavour", "turbo"), "model_flavour", "'final'", "one of"),
    ("base precision", _set("base_model_precision", "fp16"), "base_model_precision", "'int8-quanto'", "one of"),
    ("attention", _set("attention_implementation", "sage"), "attention_implementation", "'sdpa'", "one of"),
    ("attention (SimpleTuner name)", _set("attention_mechanism", "sageattention"), "attention_mechanism", "'flash'", "one of"),
    ("instanceprompt without prompt", _set_dataset(0, "caption_strategy", "instanceprompt"), "datasets[0].instance_prompt", "instance_prompt", "needs instance_prompt"),
    ("lora rank", _set("lora_rank", 0), "lora_rank", "greater than 0", "greater than 0"),
    ("learning rate", _set("learning_rate", -1.0), "learning_rate", "greater than 0", "greater than 0"),
    ("no training length", _no_length, "max_train_steps", "num_train_epochs", "no end"),
    ("checkpoint limit", _set("checkpoints_total_limit", 0), "checkpoints_total_limit", "at least 1", "greater than or equal to 1"),
    ("resume path", _set("resume_from_checkpoint", "runs/nope"), "resume_from_checkpoint", '"latest"', "does not exist"),
    ("block swap range", _set("musubi_blocks_to_swap", 48), "musubi_blocks_to_swap", "at most 47", "less than or equal to 47"),
    ("group offload type", _set("group_offload_type", "disk"), "group_offload_type", "'block_level'", "one of"),
    ("checkpoint dir missing", _set("pretrained_model_name_or_path", "meituan-longcat/LongCat-Video"), "pretrained_model_name_or_path", "hf download", "local directories only"),
    ("checkpoint without vae", _checkpoint_without_vae, "pretrained_model_name_or_path", "vae/", "vae/"),
    ("text encoder not umT5", _qwen_text_encoder, "pretrained_model_name_or_path", "umT5-XXL", "Qwen2.5-VL"),
    ("default checkpoint missing", _default_checkpoint_missing, "pretrained_model_name_or_path", "--local-dir", "LongCat-Video"),
    ("backend file missing", _set("data_backend_config", "nope.json"), "data_backend_config", "existing file", "does not exist"),
    ("dataset key at wrong level", _set_dataset(0, "num_frames", 93), "datasets[0].num_frames", '"video"', "unknown key"),
    ("training key in a dataset", _set_dataset(0, "aspect_bucket_alignment", 32), "datasets[0].aspect_bucket_alignment", "config.json", "unknown key"),
    ("fps", _set_dataset(0, "fps", 0), "datasets[0].fps", "use 15", "positive"),
    ("i2v probability range", _set_dataset(0, "i2v_probability", 1.5), "datasets[0].i2v_probability", "at most 1", "less than or equal"),
    ("is_i2v on start frames", _set_dataset(1, "is_i2v", True), "datasets[1].is_i2v", "conditioning", "\"video\" datasets"),
    ("kept projection name", _set("keep_projections", ["qkvv"]), "keep_projections[0]", "'attention_out'", "one of"),
    ("kept projections without selective", _keep_without_selective, "keep_projections", '"selective"', "does not use"),
    ("fsdp with block swap", _fsdp_with("musubi_blocks_to_swap", 8), "musubi_blocks_to_swap", '"ddp"', "fsdp shards"),
    ("fsdp with group offload", _fsdp_with("enable_group_offload", True), "enable_group_offload", "false", "fsdp shards"),
    ("fsdp with quantized weights", _fsdp_with("base_model_precision", "int8-quanto"), "base_model_precision", '"bf16"',
     "quantized"),
    ("fsdp with the step cache", _fsdp_with("validation_step_cache", 0.05), "validation_step_cache", '"ddp"',
     "skip decisions"),
    ("unknown distributed strategy", _set("distributed_strategy", "zero3"), "distributed_strategy", "fsdp", ""),
]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _problems(tmp_path: Path, mutation: Mutation) -> ConfigError:
    training, datasets = base_training(tmp_path), base_datasets()
    mutation(training, datasets, tmp_path)
    config = write_pair(tmp_path, training, datasets)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    return caught.value


def test_base_config_is_valid(tmp_path: Path) -> None:
    loaded = load_config(write_pair(tmp_path, base_training(tmp_path), base_datasets()))
    assert [d.id for d in loaded.training_datasets] == ["clips"]
    assert loaded.warnings == []


@pytest.mark.parametrize(("mutation", "key", "fix", "rule"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_rejected_naming_key_and_fix(
    tmp_path: Path, mutation: Mutation, key: str, fix: str, rule: str
) -> None:
    error = _problems(tmp_path, mutation)
    matching = [p for p in error.errors if p.key == key]
    assert matching, f"no problem for {key}; got {[str(p) for p in error.errors]}"
    assert any(fix in p.fix and rule in p.rule for p in matching), [str(p) for p in matching]
    assert key in str(error)  # the plain message names the key too


def test_cases_are_distinct() -> None:
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    def several(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
        training["lora_rank"] = 0
        training["validation_num_video_frames"] = 90
        training["eval_dataset_id"] = "val"
        datasets[0]["video"]["num_frames"] = 50
        datasets[1]["instance_data_dir"] = "data/none"

    keys = {p.key for p in _problems(tmp_path, several).errors}
    assert {
        "lora_rank",
        "validation_num_video_frames",
        "eval_dataset_id",
        "datasets[0].video.num_frames",
        "datasets[1].instance_data_dir",
    } <= keys


def test_a_bad_key_gives_one_problem_not_follow_on_noise(tmp_path: Path) -> None:
    # max_train_steps of the wrong type must not also be reported as "no training length".
    def mutate(training: dict[str, Any], datasets: list[dict[str, Any]], root: Path) -> None:
        training["max_train_steps"] = "lots"
        training["num_train_epochs"] = None

    assert [p.key for p in _problems(tmp_path, mutate).errors] == ["max_train_steps"]


def test_json_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{\n  "lora_rank": 8 // rank\n  "learning_rate": 1e-4\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    (problem,) = caught.value.errors
    assert "line 3, column 3" in problem.key and "line 3, column 3" in problem.fix


def test_backend_that_is_not_a_list(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), {"id": "clips"})
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert any("[ ... ]" in p.fix for p in caught.value.errors)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.json")
    assert "config init" in caught.value.errors[0].fix


def test_resolution_off_alignment_is_a_warning(tmp_path: Path) -> None:
    training = base_training(tmp_path)
    training["aspect_bucket_alignment"] = 64
    loaded = load_config(write_pair(tmp_path, training, base_datasets()))
    warning = next(p for p in loaded.warnings if p.key == "datasets[0].resolution")
    assert "448 or 512" in warning.rule and "aspect_bucket_alignment to 32" in warning.fix


def test_kept_projections_that_cannot_act_are_warnings(tmp_path: Path) -> None:
    training = base_training(tmp_path)
    training |= {"keep_projections": ["qkv", "ffn_w1"], "base_model_precision": "int8-quanto",
                 "lora_target_modules": ["attn.qkv", "attn.proj"]}
    loaded = load_config(write_pair(tmp_path, training, base_datasets()))
    rules = [p.rule for p in loaded.warnings if p.key == "keep_projections"]
    assert any("int8-quanto" in r for r in rules) and any("['ffn_w1']" in r and "ffn.w1" in r for r in rules)


def test_error_renders_as_a_rich_table(tmp_path: Path) -> None:
    from rich.console import Console

    error = _problems(tmp_path, _set("lora_rank", 0))
    console = Console(width=200, record=True)
    console.print(error)
    text = console.export_text()
    assert "lora_rank" in text and "greater than 0" in text and "nothing was started" in text


def test_problem_file_is_the_file_that_holds_the_key(tmp_path: Path) -> None:
    error = _problems(tmp_path, _set_dataset(0, "video.num_frames", 50))
    (problem,) = error.errors
    assert Path(str(problem.file)).name == "multidatabackend.json"
    assert json.loads((tmp_path / "multidatabackend.json").read_text())[0]["video"]["num_frames"] == problem.value
