"""umT5 text cache: `last_hidden_state` of each cleaned prompt, stored without the padding.

The encoder runs exactly as the official pipeline runs it (padding to 512 tokens, truncation,
special tokens, attention mask), but only the real tokens (prompt + eos) are written: they are
all the DiT needs, and padding is added back per batch by `collate_text`. An entry's key hashes
the cleaned text, the encoder's identity (weights and dtype), the tokenizer's identity,
`max_length` and a format version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from longcat_train.cache.keys import (
    CacheEntryCorrupt,
    module_identity,
    read_safetensors_verified,
    stable_hash,
    tokenizer_identity,
    write_safetensors_atomic,
)
from longcat_train.cache.prompt_text import clean_prompt
from longcat_train.cache.summary import CacheSummary, Outcome, cache_progress
from longcat_train.release_facts import TEXT_TOKENS

# Bump when what an entry holds or how it is computed changes; old entries then miss.
TEXT_FORMAT_VERSION = 1
EMPTY_PROMPT = ""
_LABEL_CHARS = 60

logger = logging.getLogger(__name__)


class TextCacheMiss(LookupError):
    """A prompt is needed but not cached (or corrupt), and this cache has no encoder."""


def _label(text: str) -> str:
    return repr(text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…")


class TextCache:
    """Content-keyed umT5 feature cache in `cache_dir`.

    `device` / `dtype`, when given, move the encoder there; features are stored in its dtype.
    With `text_encoder=None` the cache only reads: pass the `identity` a cache built with the
    encoder reported (its `.identity`), e.g. after the encoder was unloaded for training.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        tokenizer: Any,
        text_encoder: torch.nn.Module | None,
        max_length: int = TEXT_TOKENS,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        identity: str | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        if text_encoder is None:
            if identity is None:
                raise ValueError("TextCache without a text encoder needs the `identity` of the cache that wrote it")
            self.identity = identity
            return
        if device is not None or dtype is not None:
            text_encoder.to(device=device, dtype=dtype)
        parameter = next(text_encoder.parameters())
        # Features are stored in the dtype the encoder computes in.
        self.device, self.dtype = parameter.device, parameter.dtype
        text_encoder.eval()
        self.identity = stable_hash(
            {
                "encoder": module_identity(text_encoder),
                "tokenizer": tokenizer_identity(tokenizer),
                "max_length": max_length,
            }
        )

    def key(self, cleaned_text: str) -> str:
        return stable_hash({"format": TEXT_FORMAT_VERSION, "text": cleaned_text, "identity": self.identity})

    def path_for(self, prompt: str) -> Path:
        return self.cache_dir / f"{self.key(clean_prompt(prompt))}.safetensors"

    def _expected_metadata(self, cleaned_text: str) -> dict[str, str]:
        return {
            "format": str(TEXT_FORMAT_VERSION),
            "key": self.key(cleaned_text),
            "identity": self.identity,
            "text": cleaned_text,
        }

    def _read(self, path: Path, expected: dict[str, str]) -> torch.Tensor:
        tensors, metadata = read_safetensors_verified(path, expected, ("embeds",))
        embeds = tensors["embeds"]
        if embeds.dim() != 2 or str(embeds.shape[0]) != metadata.get("num_tokens"):
            raise CacheEntryCorrupt(
                path, f"embeds shape {list(embeds.shape)} disagrees with num_tokens {metadata.get('num_tokens')}"
            )
        return embeds

    @torch.no_grad()
    def encode(self, cleaned_texts: Sequence[str]) -> list[torch.Tensor]:
        """umT5 features `[L_i, C]` of already cleaned texts, L_i = real tokens including eos."""
        if self.text_encoder is None:
            raise TextCacheMiss("this TextCache has no text encoder to encode with")
        tokens = self.tokenizer(
            list(cleaned_texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return [hidden[i][mask[i].bool()].to(dtype=self.dtype).cpu() for i in range(hidden.shape[0])]

    def _write(self, cleaned_text: str, embeds: torch.Tensor) -> None:
        if not torch.isfinite(embeds).all():
            raise ValueError("the text encoder produced NaN or inf; umT5 overflows in float16, use bfloat16")
        metadata = {**self._expected_metadata(cleaned_text), "num_tokens": str(embeds.shape[0])}
        write_safetensors_atomic(self.cache_dir / f"{self.key(cleaned_text)}.safetensors", {"embeds": embeds}, metadata)

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(embeds [L, C], mask [L])` of the cleaned `prompt`, read and verified, or encoded and
        written when absent; a corrupt entry is rebuilt and logged as a warning."""
        cleaned = clean_prompt(prompt)
        path = self.cache_dir / f"{self.key(cleaned)}.safetensors"
        reason = ""
        if path.exists():
            try:
                embeds = self._read(path, self._expected_metadata(cleaned))
                return embeds, torch.ones(embeds.shape[0], dtype=torch.long)
            except CacheEntryCorrupt as corrupt:
                reason = corrupt.reason
                logger.warning("text cache entry %s is corrupt (%s); encoding it again", path, reason)
        if self.text_encoder is None:
            state = f"corrupt ({reason})" if reason else "missing"
            raise TextCacheMiss(f"text cache entry for {_label(cleaned)} ({path}) is {state}. Fix: run `longcat cache`.")
        (embeds,) = self.encode([cleaned])
        self._write(cleaned, embeds)
        return embeds, torch.ones(embeds.shape[0], dtype=torch.long)

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of "", the CFG negative and the caption-dropout input."""
        return self.get(EMPTY_PROMPT)

    def encode_many(self, prompts: Iterable[str], batch_size: int = 8, progress: bool = True) -> CacheSummary:
        """Make sure every prompt (and always the empty prompt) has a valid entry. Existing entries
        are read and verified in full (checksum of the bytes, finite values), so damage is repaired
        here rather than found hours into training; a failing batch is recorded per prompt with
        its reason and the rest proceed."""
        unique = list(dict.fromkeys([EMPTY_PROMPT, *(clean_prompt(p) for p in prompts)]))
        summary = CacheSummary(name="text")
        pending: list[tuple[str, Outcome, str]] = []
        for cleaned in unique:
            path = self.cache_dir / f"{self.key(cleaned)}.safetensors"
            if not path.exists():
                pending.append((cleaned, Outcome.ENCODED, ""))
                continue
            try:
                self._read(path, self._expected_metadata(cleaned))
                summary.record(Outcome.REUSED, _label(cleaned))
            except CacheEntryCorrupt as corrupt:
                logger.warning("text cache entry %s is corrupt (%s); encoding it again", path, corrupt.reason)
                pending.append((cleaned, Outcome.REBUILT, corrupt.reason))
        with cache_progress(progress) as bar:
            task = bar.add_task("umT5 prompts", total=len(unique), completed=summary.reused)
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                # A failure is recorded per prompt and the pass goes on; nothing stops it.
                try:
                    features = self.encode([cleaned for cleaned, _, _ in batch])
                except Exception as error:
                    for cleaned, _, _ in batch:
                        summary.record_failure(_label(cleaned), error)
                else:
                    for (cleaned, outcome, reason), embeds in zip(batch, features, strict=True):
                        try:
                            self._write(cleaned, embeds)
                            summary.record(outcome, _label(cleaned), reason)
                        except Exception as error:
                            summary.record_failure(_label(cleaned), error)
                bar.advance(task, len(batch))
        return summary


def collate_text(
    items: Sequence[tuple[torch.Tensor, torch.Tensor]], max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack unpadded `(embeds [L_i, C], mask [L_i])` into `(embeds [B, 1, L, C], mask [B, L])`,
    zero-padded to `max_len` or the longest item. With `text_tokens_zero_pad` the DiT zeroes
    padded tokens but still attends to them, so `max_len=512` reproduces the release exactly."""
    if not items:
        raise ValueError("collate_text needs at least one (embeds, mask) pair")
    lengths = [embeds.shape[0] for embeds, _ in items]
    length = max(lengths) if max_len is None else max_len
    if max(lengths) > length:
        raise ValueError(f"a prompt has {max(lengths)} tokens, more than max_len={length}")
    first = items[0][0]
    embeds_out = first.new_zeros((len(items), 1, length, first.shape[1]))
    mask_out = torch.zeros((len(items), length), dtype=torch.long)
    for row, (embeds, mask) in enumerate(items):
        embeds_out[row, 0, : embeds.shape[0]] = embeds
        mask_out[row, : mask.shape[0]] = mask
    return embeds_out, mask_out
