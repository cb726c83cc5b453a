"""Block-sparse attention's settings as the checkpoint's `bsa_params` give them, and how many key
blocks they keep: plain arithmetic that the attention dispatcher (which imports the Triton
kernels only when block-sparse attention runs) and the kernels' driver both read."""

from __future__ import annotations

import math
from dataclasses import dataclass


def kept_kv_block_count(n_kv_blocks: int, sparsity: float) -> int:
    """Key blocks kept per query block by block-sparse attention: ``int((1 - sparsity) * n)``, at
    least 1."""
    return max(1, int((1.0 - sparsity) * n_kv_blocks))


@dataclass(frozen=True)
class BsaSettings:
    sparsity: float = 0.9375
    chunk_3d_shape_q: tuple[int, int, int] = (4, 4, 4)
    chunk_3d_shape_k: tuple[int, int, int] = (4, 4, 4)

    def density(self, grid_k: tuple[int, int, int]) -> float:
        """The fraction of key blocks each query block attends to over the `grid_k` token grid."""
        n_blocks = math.prod(math.ceil(size / c) for size, c in zip(grid_k, self.chunk_3d_shape_k))
        return kept_kv_block_count(n_blocks, self.sparsity) / n_blocks

    @classmethod
    def from_params(cls, params: dict | None) -> "BsaSettings":
        params = params or {}
        return cls(
            sparsity=float(params.get("sparsity", 0.9375)),
            chunk_3d_shape_q=tuple(params.get("chunk_3d_shape_q", (4, 4, 4))),
            chunk_3d_shape_k=tuple(params.get("chunk_3d_shape_k", (4, 4, 4))),
        )
