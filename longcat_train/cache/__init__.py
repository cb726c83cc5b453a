"""Content-keyed caches of VAE latents and umT5 text features (safetensors on disk)."""

from longcat_train.cache.keys import CacheEntryCorrupt
from longcat_train.cache.latents import (
    LATENT_FORMAT_VERSION,
    CachedLatent,
    LatentCache,
    LatentCacheMiss,
    LatentJob,
    LatentKind,
)
from longcat_train.cache.prompt_text import clean_prompt
from longcat_train.cache.summary import CacheIssue, CacheSummary, Outcome
from longcat_train.cache.text import EMPTY_PROMPT, TEXT_FORMAT_VERSION, TextCache, TextCacheMiss, collate_text

__all__ = [
    "EMPTY_PROMPT",
    "LATENT_FORMAT_VERSION",
    "TEXT_FORMAT_VERSION",
    "CacheEntryCorrupt",
    "CacheIssue",
    "CacheSummary",
    "CachedLatent",
    "LatentCache",
    "LatentCacheMiss",
    "LatentJob",
    "LatentKind",
    "Outcome",
    "TextCache",
    "TextCacheMiss",
    "clean_prompt",
    "collate_text",
]
