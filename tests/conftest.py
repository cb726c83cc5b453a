"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_train.demo.synthetic import write_demo
from longcat_train.demo.tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LongCat-Video in the official layout (dit/, vae/, text_encoder/, tokenizer/,
    scheduler/), written once per test session. Treat it as read-only."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_longcat"), seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`longcat demo`'s tiny model, clips and config (40 steps) in one folder; runs write their
    caches there, so later runs find them."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, steps=40)
    return root
