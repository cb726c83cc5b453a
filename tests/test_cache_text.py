"""The umT5 text cache: official tokenisation, no stored padding, keys, reuse, corruption, collate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import UMT5EncoderModel

from longcat_train.cache import EMPTY_PROMPT, TextCache, TextCacheMiss, clean_prompt, collate_text
from longcat_train.components import load_text_encoder, load_tokenizer

PROMPTS = ["A cat walks slowly across a sunny kitchen floor.", "A red car drives along a coastal road."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> UMT5EncoderModel:
    return load_text_encoder(tiny_model)


def by_hand(tokenizer: Any, encoder: UMT5EncoderModel, text: str) -> tuple[torch.Tensor, int]:
    """The official pipeline's features: padded to 512, then the real tokens."""
    tokens = tokenizer(
        [text], padding="max_length", max_length=512, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden[0], int(tokens.attention_mask.sum())


def test_stored_text_has_no_padding_and_matches_the_official_encoding(
    tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path
) -> None:
    cache = TextCache(tmp_path, tokenizer, encoder)
    embeds, mask = cache.get(PROMPTS[0])
    padded, length = by_hand(tokenizer, encoder, PROMPTS[0])
    assert length == len(tokenizer(PROMPTS[0])["input_ids"])  # prompt tokens + eos
    assert embeds.shape == (length, encoder.config.d_model)
    assert mask.tolist() == [1] * length
    torch.testing.assert_close(embeds, padded[:length])
    # Read back from disk: identical, and still unpadded.
    reread, _ = TextCache(tmp_path, tokenizer, encoder).get(PROMPTS[0])
    torch.testing.assert_close(reread, embeds, rtol=0, atol=0)


def test_empty_prompt_is_always_cached(tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path) -> None:
    cache = TextCache(tmp_path, tokenizer, encoder)
    summary = cache.encode_many(PROMPTS, progress=False)
    assert summary.encoded == len(PROMPTS) + 1
    assert cache.path_for(EMPTY_PROMPT).is_file()
    reader = TextCache(tmp_path, tokenizer, None, identity=cache.identity)
    embeds, mask = reader.empty_prompt()
    assert embeds.shape == (1, encoder.config.d_model) and mask.tolist() == [1]  # just eos
    torch.testing.assert_close(embeds, by_hand(tokenizer, encoder, "")[0][:1])


def test_second_run_encodes_nothing_and_one_changed_caption_encodes_one(
    tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path
) -> None:
    first = TextCache(tmp_path, tokenizer, encoder).encode_many(PROMPTS, batch_size=2, progress=False)
    assert (first.encoded, first.reused) == (3, 0)
    second = TextCache(tmp_path, tokenizer, encoder).encode_many(PROMPTS, progress=False)
    assert (second.encoded, second.reused) == (0, 3)
    edited = [PROMPTS[0], "A blue car drives along a coastal road."]
    third = TextCache(tmp_path, tokenizer, encoder).encode_many(edited, progress=False)
    assert (third.encoded, third.reused) == (1, 2)


def test_prompts_are_keyed_by_their_cleaned_text(tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path) -> None:
    cache = TextCache(tmp_path, tokenizer, encoder)
    summary = cache.encode_many(["  A cat &amp;amp; a\n dog ", "A cat & a dog"], progress=False)
    assert summary.encoded == 2  # the empty prompt and one cleaned caption
    assert cache.path_for("A cat &amp; a dog") == cache.path_for("A cat & a dog")
    assert cache.key("A cat & a dog") != cache.key("A cat & a cat")


def test_identity_covers_max_length_and_encoder_weights(
    tokenizer: Any, encoder: UMT5EncoderModel, tiny_model: Path, tmp_path: Path
) -> None:
    base = TextCache(tmp_path, tokenizer, encoder)
    assert TextCache(tmp_path, tokenizer, encoder, max_length=256).identity != base.identity
    changed = load_text_encoder(tiny_model)
    with torch.no_grad():
        changed.shared.weight[5] += 0.5
    assert TextCache(tmp_path, tokenizer, changed).identity != base.identity
    in_bf16 = load_text_encoder(tiny_model)
    assert TextCache(tmp_path, tokenizer, in_bf16, dtype=torch.bfloat16).identity != base.identity
    assert next(in_bf16.parameters()).dtype == torch.bfloat16
    assert TextCache(tmp_path, load_tokenizer(tiny_model), encoder).identity == base.identity


def test_long_prompts_are_truncated_to_max_length(tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path) -> None:
    cache = TextCache(tmp_path, tokenizer, encoder, max_length=16)
    embeds, mask = cache.get(" ".join([PROMPTS[0]] * 10))
    assert embeds.shape[0] == 16 and mask.sum() == 16


def test_truncated_text_cache_file_is_rebuilt(tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path) -> None:
    cache = TextCache(tmp_path, tokenizer, encoder)
    cache.encode_many(PROMPTS, progress=False)
    original, _ = cache.get(PROMPTS[1])
    path = cache.path_for(PROMPTS[1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    summary = TextCache(tmp_path, tokenizer, encoder).encode_many(PROMPTS, progress=False)
    assert (summary.encoded, summary.reused, len(summary.rebuilt)) == (0, 2, 1)
    assert PROMPTS[1][:20] in summary.rebuilt[0].label
    rebuilt, _ = TextCache(tmp_path, tokenizer, None, identity=cache.identity).get(PROMPTS[1])
    torch.testing.assert_close(rebuilt, original, rtol=0, atol=0)


def test_the_caching_pass_rebuilds_a_flipped_byte_and_says_so(tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path) -> None:
    cache = TextCache(tmp_path, tokenizer, encoder)
    cache.encode_many(PROMPTS, progress=False)
    original, _ = cache.get(PROMPTS[0])
    path = cache.path_for(PROMPTS[0])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    summary = TextCache(tmp_path, tokenizer, encoder).encode_many(PROMPTS, progress=False)
    assert (summary.encoded, summary.reused) == (0, 2)
    assert len(summary.rebuilt) == 1 and "checksum" in summary.rebuilt[0].reason
    rebuilt, _ = TextCache(tmp_path, tokenizer, None, identity=cache.identity).get(PROMPTS[0])
    torch.testing.assert_close(rebuilt, original, rtol=0, atol=0)


def test_read_only_cache_reports_a_missing_prompt(tokenizer: Any, encoder: UMT5EncoderModel, tmp_path: Path) -> None:
    identity = TextCache(tmp_path, tokenizer, encoder).identity
    with pytest.raises(TextCacheMiss, match="longcat cache"):
        TextCache(tmp_path, tokenizer, None, identity=identity).get("never encoded")


def test_collate_pads_with_zeros_to_the_batch_max() -> None:
    short = (torch.full((2, 4), 1.0), torch.ones(2, dtype=torch.long))
    long = (torch.full((5, 4), 2.0), torch.ones(5, dtype=torch.long))
    embeds, mask = collate_text([short, long])
    assert embeds.shape == (2, 1, 5, 4) and mask.shape == (2, 5)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert embeds[0, 0, :2].eq(1.0).all() and embeds[0, 0, 2:].eq(0.0).all()
    assert embeds[1, 0].eq(2.0).all()
    fixed, fixed_mask = collate_text([short], max_len=8)
    assert fixed.shape == (1, 1, 8, 4) and fixed_mask.sum() == 2
    with pytest.raises(ValueError, match="max_len=3"):
        collate_text([long], max_len=3)


def test_clean_prompt_follows_the_official_cleaning() -> None:
    assert clean_prompt("  The cafÃ©\t\n is   open ") == "The café is open"
    assert clean_prompt("Tom &amp;amp; Jerry &lt;3") == "Tom & Jerry <3"
    assert clean_prompt("") == ""
