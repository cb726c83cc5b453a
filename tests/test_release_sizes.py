"""Components with the release's tensor sizes where size matters: umT5-XXL's 256,384-token
vocabulary (an embedding above 2^24 elements, ids deep in it) through the same caching path users
run. Tiny models alone hid a crash here (a float32 index past the last element)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longcat_train.cache.keys import module_identity, sample_indices
from longcat_train.cli import app
from longcat_train.components import load_tokenizer
from longcat_train.demo.synthetic import demo_configs, write_dataset
from longcat_train.demo.tiny_model import write_tiny_model
from longcat_train.release_facts import RELEASE_UMT5_CONFIG, RELEASE_VOCAB_SIZE

# wide enough that the embedding passes 2^24 elements (float32's last exact integer)
CAPTION_WIDTH = 128


@pytest.mark.parametrize("count", [1, 2, 255, 256, 257, 2**24 + 2, RELEASE_VOCAB_SIZE * 4096, 2**40 + 7])
def test_sampled_indices_are_exact_spread_and_in_bounds(count: int) -> None:
    index = sample_indices(count)
    assert index.dtype == torch.int64 and len(index) == min(count, 256)
    assert index[0] == 0 and index[-1] == count - 1
    assert (index.diff() > 0).all()


def test_identity_of_an_embedding_above_2_24_elements() -> None:
    # 256,384 x 72 = 18.5M elements: a float32 linspace rounds its last index to 18,459,648, one past the end
    embedding = torch.nn.Embedding(RELEASE_VOCAB_SIZE, 72)
    same = torch.nn.Embedding(RELEASE_VOCAB_SIZE, 72)
    same.load_state_dict(embedding.state_dict())
    assert module_identity(embedding) == module_identity(same)
    with torch.no_grad():
        same.weight[-1, -1] += 1.0  # the last element is sampled
    assert module_identity(embedding) != module_identity(same)


@pytest.fixture(scope="module")
def release_vocab_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release_vocab")
    checkpoint = write_tiny_model(root / "model", dit_config={"caption_channels": CAPTION_WIDTH},
                                       vocab_size=RELEASE_VOCAB_SIZE)
    write_dataset(root / "data", count=2, val_count=1)
    return demo_configs(root, checkpoint, steps=2)


def test_release_vocabulary_tokenizer_and_encoder_have_the_release_size(release_vocab_run: Path) -> None:
    model = release_vocab_run.parent / "model"
    tokenizer = load_tokenizer(model)
    encoder_config = json.loads((model / "text_encoder" / "config.json").read_text())
    assert len(tokenizer) == encoder_config["vocab_size"] == RELEASE_UMT5_CONFIG["vocab_size"]
    ids = tokenizer("a wide scene with a coloured square sliding across").input_ids
    assert max(ids) > RELEASE_VOCAB_SIZE - 1000  # real prompts index rows deep in the embedding
    assert CAPTION_WIDTH * RELEASE_VOCAB_SIZE > 2**24


def test_cache_command_encodes_captions_with_the_release_vocabulary(release_vocab_run: Path) -> None:
    result = CliRunner().invoke(app, ["cache", "--config", str(release_vocab_run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # the empty prompt, three captions (two training clips, one held out) and the validation prompt
    assert "cached 2 training items, 1 eval items, 5 prompts; 0 failed" in " ".join(result.output.split())
    assert len(list((release_vocab_run.parent / "cache" / "text").glob("*.safetensors"))) == 5
