"""The tiny random LongCat-Video and synthetic data behind `longcat demo` and the tests."""

from longcat_train.demo.tiny_model import TINY_DIT_CONFIG, write_tiny_model

__all__ = ["TINY_DIT_CONFIG", "write_tiny_model"]
