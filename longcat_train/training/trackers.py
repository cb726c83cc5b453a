"""Experiment trackers behind one small writer interface (`add_scalar`, `add_image`, `close`):
TensorBoard always available, wandb when installed and chosen by `report_to`."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class _Wandb:
    def __init__(self, project: str, name: str | None, config: dict, directory: Path):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, config=config, dir=str(directory))

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self._run.log({tag: value}, step=global_step)

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str = "HWC") -> None:
        self._run.log({tag: self._wandb.Image(img)}, step=global_step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Fans every call out to the chosen trackers."""

    def __init__(self, writers: list):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(tag, value, global_step)

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str = "HWC") -> None:
        for writer in self.writers:
            writer.add_image(tag, img, global_step, dataformats=dataformats)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_trackers(report_to: str, output_dir: Path, project: str, run_name: str | None, config: dict) -> Trackers | None:
    writers = []
    if report_to in ("tensorboard", "all"):
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(log_dir=str(Path(output_dir) / "logs")))
    if report_to in ("wandb", "all"):
        if importlib.util.find_spec("wandb") is None:
            log.warning("report_to=%s asks for wandb, which is not installed (pip install wandb); skipping it", report_to)
        else:
            writers.append(_Wandb(project, run_name, config, Path(output_dir)))
    return Trackers(writers) if writers else None
