"""The LongCat-Video transformer, its attention backends and its FLOP counter."""

from .attention import AttentionBackendUnavailable, AttentionDispatcher
from .weight_keys import WeightKeyError
from .transformer import CHECKPOINT_MODES, LongCatVideoTransformer3DModel

__all__ = [
    "AttentionBackendUnavailable",
    "AttentionDispatcher",
    "CHECKPOINT_MODES",
    "WeightKeyError",
    "LongCatVideoTransformer3DModel",
]
