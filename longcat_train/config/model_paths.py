"""Where the LongCat-Video checkpoint lives, what a usable checkpoint directory holds, and the mode
the files this package writes get.

Torch-free on purpose: `config check` must answer in well under a second, before any heavy import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from longcat_train.config.problems import ProblemList
from longcat_train.release_facts import CFG_STEP_LORA, REFINEMENT_LORA

LONGCAT_HOME_ENV = "LONGCAT_HOME"
HUB_REPOSITORY = "meituan-longcat/LongCat-Video"
# Flavour -> folder name under $LONGCAT_HOME/models.
FLAVOUR_DIRS: dict[str, str] = {"final": "LongCat-Video"}
# Each subfolder of the release and the files of which one marks it as present.
MODEL_MARKERS: dict[str, tuple[str, ...]] = {
    "dit": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.json", "spiece.model", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}

WEIGHT_FOLDERS = ("dit", "vae", "text_encoder")
# Weight files that are pickles: loading one can execute code, so only safetensors are read.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})


def longcat_home() -> Path:
    return Path(os.environ.get(LONGCAT_HOME_ENV) or "~/.cache/longcat").expanduser()


def default_checkpoint_dir(flavour: str = "final") -> Path:
    """`$LONGCAT_HOME/models/<name>` for `flavour` (LONGCAT_HOME defaults to ~/.cache/longcat)."""
    return longcat_home() / "models" / FLAVOUR_DIRS[flavour]


def download_hint(target: Path) -> str:
    return (
        f"download the release into it: `hf download {HUB_REPOSITORY} --local-dir {target}` "
        f"(or set pretrained_model_name_or_path to where it already is; `longcat demo` makes a tiny one)"
    )


def missing_distill_lora(root: Path) -> tuple[str, str, str] | None:
    """(path, rule, fix) when checkpoint `root` lacks the cfg_step LoRA that distilled previews
    apply (16 steps without CFG of the base model alone render noise, not a preview); else None."""
    return _missing_release_lora(root, CFG_STEP_LORA, "distilled previews need the official cfg_step LoRA",
                                 "distilled")


def missing_refinement_lora(root: Path) -> tuple[str, str, str] | None:
    """(path, rule, fix) when checkpoint `root` lacks the refinement LoRA that the 720p refinement
    stage applies (the base model was not trained to refine); else None."""
    return _missing_release_lora(root, REFINEMENT_LORA, "refined previews need the official refinement LoRA",
                                 "refine")


def _missing_release_lora(root: Path, relative: str, rule: str, option: str) -> tuple[str, str, str] | None:
    path = root / relative
    if path.is_file():
        return None
    return (str(path), f"{rule}, which is not there",
            f"copy {relative} of the LongCat-Video release into {root}, or render without {option}")


def is_umt5_config(config: dict[str, object]) -> bool:
    architectures = config.get("architectures") or []
    return config.get("model_type") == "umt5" or (
        isinstance(architectures, list) and "UMT5EncoderModel" in architectures
    )


def check_checkpoint_dir(root: Path, key: str, file: Path, from_default: bool, problems: ProblemList) -> None:
    """Report a missing directory, missing subfolders (by name) and a text encoder that is not umT5."""
    if not root.is_dir():
        if from_default:
            problems.add(
                file,
                key,
                None,
                f"null selects the default checkpoint {root}, which does not exist",
                download_hint(root),
            )
        else:
            looks_like_hub_id = str(root).count("/") >= 1 and HUB_REPOSITORY.split("/")[1] in str(root)
            rule = f"checkpoint directory {root} does not exist"
            if looks_like_hub_id:
                rule += " (hub ids are not downloaded: this trainer reads local directories only)"
            problems.add(file, key, str(root), rule, download_hint(root))
        return
    missing = [
        name for name, markers in MODEL_MARKERS.items() if not any((root / name / m).is_file() for m in markers)
    ]
    if missing:
        detail = ", ".join(f"{name}/ (needs {' or '.join(MODEL_MARKERS[name])})" for name in missing)
        problems.add(
            file,
            key,
            str(root),
            f"checkpoint is missing {detail}",
            "point it at a complete download of LongCat-Video: dit/, vae/, text_encoder/, tokenizer/, scheduler/",
        )
    for name in WEIGHT_FOLDERS:
        pickled = sorted(p.name for p in (root / name).glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickled and not any((root / name).glob("*.safetensors")):
            problems.add(
                file, key, str(root / name),
                f"{name}/ holds weights only as pickle files ({', '.join(pickled)}), which are never loaded: "
                "unpickling can run any code",
                "download the release's .safetensors files, or convert these to .safetensors (safetensors.torch.save_file) on a machine you trust",
            )
    encoder_config = root / "text_encoder" / "config.json"
    if encoder_config.is_file():
        _check_text_encoder(encoder_config, key, file, problems)


def _check_text_encoder(path: Path, key: str, file: Path, problems: ProblemList) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.add(file, key, str(path), f"cannot read {path}: {error}", "restore text_encoder/ from the release")
        return
    if not isinstance(config, dict) or not is_umt5_config(config):
        model_type = config.get("model_type") if isinstance(config, dict) else None
        problems.add(
            file,
            key,
            str(path),
            f"text encoder is model_type {model_type!r}, not umT5: LongCat-Video's DiT takes the "
            "4096-wide hidden states of umT5-XXL (UMT5EncoderModel); guides naming Qwen2.5-VL are "
            "wrong for this checkpoint",
            "use the text_encoder/ folder that ships with LongCat-Video (umT5-XXL)",
        )
