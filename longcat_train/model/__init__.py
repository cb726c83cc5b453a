"""The LongCat-Video transformer, its attention backends and its FLOP counter."""

from .attention import AttentionBackendUnavailable, AttentionDispatcher
from .checkpoint_keys import CheckpointKeyError
from .transformer import CHECKPOINT_MODES, LongCatVideoTransformer3DModel

__all__ = [
    "AttentionBackendUnavailable",
    "AttentionDispatcher",
    "CHECKPOINT_MODES",
    "CheckpointKeyError",
    "LongCatVideoTransformer3DModel",
]
