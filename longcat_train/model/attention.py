"""Attention backends behind one dispatcher.

Every call site in the transformer goes through `AttentionDispatcher`, so choosing a backend is a
config key (`attention_implementation`), never a code change. Tensors are `[B, heads, N, D]`.
`ATTENTION_BACKENDS` is the table of backends: a new one is its row there (function, the ops
selective checkpointing keeps, what it needs installed), which the config reads as text
(`config/extension_tables.py`) for the names `attention_implementation` accepts.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config.dependencies import Requirement, module_installed
from .activation_offload import keep_on_host
from .bsa_settings import BsaSettings

log = logging.getLogger(__name__)

# On Hopper, cuDNN attention measured 1.6-1.8x faster than SDPA's flash backend at 37k tokens
# (see docs/benchmarks.md); the others stay as fall-backs for shapes cuDNN refuses.
_CUDA_SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

# The ops behind PyTorch's SDPA kernels and our block-sparse attention (registered in `bsa.py`),
# whose outputs selective activation checkpointing keeps instead of recomputing.
_SDPA_OPS = frozenset({
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
})
_BSA_OPS = frozenset({"longcat::block_sparse_attention"})


def qualified_op_name(op) -> str | None:
    """"namespace::name" of a dispatched op (overload or packet), as checkpoint policies see it."""
    return getattr(getattr(op, "overloadpacket", op), "_qualified_op_name", None)


def is_attention_op(op) -> bool:
    """Whether a dispatched op (overload or packet) is one of `KEPT_ATTENTION_OPS`."""
    return qualified_op_name(op) in KEPT_ATTENTION_OPS


class AttentionBackendUnavailable(RuntimeError):
    pass


def _sdpa(q, k, v, attn_mask=None):
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# FlashAttention-4 (`pip install flash-attn-4`, the CuTe-DSL kernels of the flash-attn authors) on
# Hopper and Blackwell: at the 480p render's self-attention shape it ran at 667 TFLOP/s on an H200
# against cuDNN's 571, the fastest kernel PyTorch has (docs/benchmarks.md, session 12). Inference
# only: its backward is not the op selective checkpointing keeps, nor checked against SDPA here.
FLASH4_ARCHES = (9, 10)


def _flash4_gpu() -> bool:
    """Whether this machine's GPU is one flash-attn-4 is built for."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in FLASH4_ARCHES


@functools.cache
def _flash4_forward() -> Callable | None:
    """flash-attn-4's forward, `[B, N, H, D]` q, k, v → out, where it is installed and this GPU is
    one it was built for; None elsewhere."""
    if not _flash4_gpu():
        return None
    try:
        from flash_attn.cute import flash_attn_func

        def forward(q, k, v):
            out = flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # (out, lse) in some releases

        # its own call into the DSL warns on each new shape about an argument it passes on purpose
        warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted to a JitArgument",
                                category=UserWarning)
        # one small call against SDPA first: a kernel that fails to build or disagrees on this
        # machine falls back to SDPA with a warning instead of failing a user's render
        q, k, v = torch.randn(3, 1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
        expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        torch.testing.assert_close(forward(q, k, v), expected, atol=2e-2, rtol=2e-2)
    except ImportError:
        return None
    except Exception as error:  # noqa: BLE001 - any failure of the optional kernel means SDPA
        log.warning("flash-attn-4 is installed but failed its check on this GPU (%s); using SDPA",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    log.info("dense attention in inference: FlashAttention-4 (flash-attn-4)")
    return forward


def flash4_applies(q: torch.Tensor, attn_mask) -> bool:
    """Whether `auto` runs this attention on FlashAttention-4: unmasked bf16/fp16 inference on CUDA."""
    return (q.is_cuda and attn_mask is None and not torch.is_grad_enabled()
            and q.dtype in (torch.bfloat16, torch.float16) and _flash4_forward() is not None)


def flash4_install_hint() -> str | None:
    """A line for a Hopper/Blackwell GPU whose renders would run faster on flash-attn-4, which is
    not installed (an installed one that failed its check has said so itself); None elsewhere."""
    if not _flash4_gpu() or module_installed("flash_attn.cute"):
        return None
    return ('renders use PyTorch attention: `pip install "longcat-train[flash4]"` (flash-attn-4) makes '
            "them about 10 % faster on this GPU")


def dense_inference_kernel() -> str:
    """The kernel `auto` runs unmasked dense attention on in inference here: "flash-attn-4" or "sdpa"."""
    return "flash-attn-4" if _flash4_forward() is not None else "sdpa"


def _flash4(q, k, v):  # [B, H, N, D] views, as every backend takes them
    return _flash4_forward()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _auto(q, k, v, attn_mask=None):
    """The fastest dense kernel here: FlashAttention-4 for inference where it applies, else SDPA."""
    if flash4_applies(q, attn_mask):
        return _flash4(q, k, v)
    return _sdpa(q, k, v, attn_mask)


def _flash(q, k, v, attn_mask=None):
    if attn_mask is not None:
        return _sdpa(q, k, v, attn_mask)
    try:  # flash-attn 3 (Hopper) first, then 2
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
    except ImportError:
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _xformers(q, k, v, attn_mask=None):
    if attn_mask is not None:
        return _sdpa(q, k, v, attn_mask)
    import xformers.ops

    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionBackend:
    """One `attention_implementation`: its dense attention function, the ops whose outputs selective
    checkpointing keeps (a kernel missing here is silently recomputed), and its words. The words
    are keywords with literal values: the config reads them from this file's text, so `config check`
    names a missing package without torch."""

    dense: Callable  # (q, k, v, attn_mask=None) -> out: cross-attention, and self-attention when not block-sparse
    kept_ops: frozenset[str]  # its attention ops ("namespace::name") whose outputs checkpointing keeps
    _: KW_ONLY
    note: str = ""  # said after the name in `attention_implementation`'s description (config.md)
    requires: tuple[str, ...] = ()  # modules it needs, any one of them (none: PyTorch's own)
    install: str = ""  # the command that installs them

    @property
    def requirement(self) -> Requirement | None:
        return Requirement(self.requires, self.install) if self.requires else None


# Every backend: the names `attention_implementation` accepts, in this order, through the config's
# `ATTENTION_CHOICES`, read from here. `auto` and `bsa` run SDPA (FlashAttention-4 in inference where
# `flash4_applies`) for dense attention and block-sparse attention for video self-attention where
# `AttentionDispatcher.bsa_decision` says so.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "auto": AttentionBackend(_auto, _SDPA_OPS | _BSA_OPS,
                             note="fastest available per shape: flash-attn-4 in renders where it is installed (Hopper, "
                                  "Blackwell), else SDPA; block-sparse where the released model uses it"),
    "sdpa": AttentionBackend(_sdpa, _SDPA_OPS),
    # flash and xformers fall back to SDPA with a mask; their own kernels are not listed, so
    # selective checkpointing recomputes them (as it always has)
    "flash": AttentionBackend(_flash, _SDPA_OPS, requires=("flash_attn", "flash_attn_interface"),
                              install="pip install flash-attn --no-build-isolation"),
    "xformers": AttentionBackend(_xformers, _SDPA_OPS, requires=("xformers",), install="pip install xformers"),
    "bsa": AttentionBackend(_auto, _SDPA_OPS | _BSA_OPS, requires=("triton",), install="pip install triton (Linux)"),
}
BACKENDS = tuple(ATTENTION_BACKENDS)

# The ops whose outputs selective activation checkpointing keeps instead of recomputing: every
# backend's, so the checkpoint policy cannot miss one.
KEPT_ATTENTION_OPS = frozenset().union(*(backend.kept_ops for backend in ATTENTION_BACKENDS.values()))


def check_backend_available(name: str) -> None:
    """Raise a clear error when a backend named explicitly cannot run here."""
    if name not in BACKENDS:
        raise AttentionBackendUnavailable(
            f"attention_implementation={name!r} is unknown; choose one of {', '.join(BACKENDS)}"
        )
    requirement = ATTENTION_BACKENDS[name].requirement
    if requirement is not None and not requirement.available():
        raise AttentionBackendUnavailable(
            f"attention_implementation={name!r} needs {requirement.modules[0]} ({requirement.install}); "
            "use 'sdpa' or 'auto' instead"
        )


# The official model turns block-sparse attention on for its 720p stage: 704x1280 and up, i.e.
# 44 x 80 = 3,520 tokens per latent frame after the VAE and the 2x2 patch.
BSA_AUTO_MIN_TOKENS_PER_FRAME = 44 * 80


class AttentionDispatcher:
    """Chooses the attention function for dense attention and, where it applies, block-sparse
    video self-attention.

    `auto` uses PyTorch SDPA (cuDNN first on CUDA; FlashAttention-4 in inference where it is
    installed) for dense attention, and BSA for video
    self-attention on CUDA when the config enables it (the released config's `enable_bsa`) or the
    clip is of the 720p class where the official model uses it; `bsa` uses it wherever it can run.
    Each decision is logged once with its reason.
    """

    def __init__(self, implementation: str = "auto", use_bsa: bool = False, bsa: BsaSettings | None = None):
        check_backend_available(implementation)
        self.implementation = implementation
        self.bsa = bsa or BsaSettings()
        self.bsa_enabled = use_bsa
        self._dense = ATTENTION_BACKENDS[implementation].dense
        # whether training's dense attention is an SDPA op, whose output activation offload stashes
        self._sdpa_output = self._dense in (_sdpa, _auto)
        self._logged: set[tuple[bool, str]] = set()

    def dense(self, q, k, v, attn_mask=None):
        """Cross-attention (and any other non-video attention)."""
        out = self._dense(q, k, v, attn_mask)
        if self._sdpa_output:
            keep_on_host(out, "cross_attention")  # see `self_attention`
        return out

    def bsa_decision(self, on_cuda: bool, grid_k: tuple[int, int, int]) -> tuple[bool, str]:
        """(use block-sparse attention?, why) for a self-attention over the `grid_k` token grid."""
        if self.implementation not in ("auto", "bsa"):
            return False, f"attention_implementation={self.implementation}"
        if grid_k[0] <= 1:
            return False, "a single latent frame (images never use block-sparse attention)"
        if self.implementation == "bsa":
            return True, "attention_implementation=bsa"
        if not on_cuda:
            return False, "not on CUDA"
        if self.bsa_enabled:
            return True, "enable_bsa in the config"
        if grid_k[1] * grid_k[2] >= BSA_AUTO_MIN_TOKENS_PER_FRAME:
            return True, f"720p-class clip ({grid_k[1]}x{grid_k[2]} tokens per frame)"
        return False, f"below the 720p class ({grid_k[1]}x{grid_k[2]} tokens per frame)"

    def self_attention(self, q, k, v, grid_q: tuple[int, int, int], grid_k: tuple[int, int, int]):
        use, why = self.bsa_decision(q.is_cuda, grid_k)
        if (use, why) not in self._logged:
            self._logged.add((use, why))
            log.info("self-attention: %s (%s)", "block-sparse" if use else "dense", why)
        if use:
            from .bsa import block_sparse_attention

            # (it hands the output selective checkpointing keeps to activation offload itself)
            return block_sparse_attention(
                q, k, v, grid_q, grid_k,
                sparsity=self.bsa.sparsity,
                chunk_3d_shape_q=self.bsa.chunk_3d_shape_q,
                chunk_3d_shape_k=self.bsa.chunk_3d_shape_k,
            )
        out = self._dense(q, k, v)
        if self._sdpa_output:
            # the SDPA op's own output, which selective checkpointing caches: with activation
            # offload its bytes wait on the host until the block is recomputed
            keep_on_host(out, "self_attention")
        return out
