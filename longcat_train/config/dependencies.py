"""Optional packages behind config values (an attention kernel, a tracker, a quantizer), checked
when the config loads: a missing one is an error naming the key and the install command, not a
crash after caching or a run that silently drops the choice. Torch-free: `find_spec` imports nothing."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    """Packages a value needs: available when any one of `modules` is importable."""

    modules: tuple[str, ...]
    install: str  # the command that installs it

    def available(self) -> bool:
        return any(module_installed(module) for module in self.modules)


def module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


WANDB = Requirement(("wandb",), "pip install wandb")
QUANTO = Requirement(("optimum.quanto",), "pip install optimum-quanto")
TORCHAO = Requirement(("torchao",), "pip install torchao")

REPORT_TO_REQUIREMENTS: dict[str, Requirement] = {"wandb": WANDB, "all": WANDB}
PRECISION_REQUIREMENTS: dict[str, Requirement] = {
    "int8-quanto": QUANTO, "int4-quanto": QUANTO, "fp8-torchao": TORCHAO,
}


def missing_requirement(key: str, value: object, requirement: Requirement | None, file: Path) -> tuple | None:
    """The problem's fields (file, key, value, rule, fix) when `requirement` is not installed."""
    if requirement is None or requirement.available():
        return None
    return (file, key, value, f"needs the {requirement.modules[0].split('.')[0]} package, which is not installed",
            f"install it ({requirement.install}), or choose another value")
