"""Prompt cleaning exactly as the official LongCat-Video pipeline does it before tokenizing."""

from __future__ import annotations

import html
import re

import ftfy

_WHITESPACE_RUN = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Repair mojibake (ftfy), unescape HTML entities twice (captions scraped from the web are often
    escaped twice), collapse whitespace runs to one space, strip the ends."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE_RUN.sub(" ", text).strip()
