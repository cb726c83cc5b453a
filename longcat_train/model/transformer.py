"""The LongCat-Video DiT, with the released parameter names, in one readable file.

Numerics follow the official implementation (github.com/meituan-longcat/LongCat-Video):
timestep embedding, adaLN modulation, gated residuals and the final layer run in fp32; LayerNorms
normalise in fp32; RMSNorm normalises in fp32 and multiplies its weight in the input dtype; 3D RoPE
is computed in fp32 with adjacent-pair rotation. The network predicts x0 − ε.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .activation_offload import begin_block, host_offload
from .attention import AttentionDispatcher, is_attention_op, qualified_op_name
from .bsa_settings import BsaSettings
from .step_cache import StepCache
from .weight_keys import verify_weight_keys
from ..release_facts import PROJECTION_MODULES
from .fused_ops import gated_residual, layer_norm_affine, modulate, rms_norm_rope, swiglu
from .ulysses import SequenceParallel, TileRope, UlyssesAttention

CHECKPOINT_MODES = ("none", "full", "selective")
# Projections whose outputs selective checkpointing can keep (`keep_projections`), and the linear
# each names. Keeping one skips its GEMM in the recomputation; it works where the linear carries
# a LoRA on the fused path (`lora.fused_linear.lora_linear`, bf16 weights on CUDA).
PROJECTION_ROLES = {role: tuple(path.split(".")) for role, path in PROJECTION_MODULES.items()}


def _no_autocast(fn):
    """Run `fn` with autocast off, so fp32 islands stay fp32 under Accelerate's bf16 autocast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


class Fp32Linear(nn.Linear):
    """A linear layer evaluated in fp32 whatever the weight dtype (the official code does this with
    a float32 autocast region on CUDA). A module, not a function on its weight, so forward hooks
    and PEFT adapters on it (official LoRAs adapt the modulation and final layers) take effect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


@_no_autocast
def linear_fp32(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call an `Fp32Linear` (or the PEFT layer wrapping one) with autocast off, so a LoRA on it
    also computes in fp32."""
    return linear(x)


class RMSNorm(nn.Module):
    """RMSNorm over the head dim: normalise in fp32, cast back, multiply the weight in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_rope(x, self.weight, self.eps)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: Sequence[int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C], (t, h, w) raster order


class TimestepEmbedder(nn.Module):
    def __init__(self, t_embed_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            Fp32Linear(frequency_embedding_size, t_embed_dim),
            nn.SiLU(),
            Fp32Linear(t_embed_dim, t_embed_dim),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: flat fp32 timesteps → fp32 embeddings."""
        h = linear_fp32(self.mlp[0], self.sinusoid(t, self.frequency_embedding_size))
        return linear_fp32(self.mlp[2], F.silu(h))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class FeedForwardSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Rope3D:
    """3D rotary embedding: head dims split t | h | w (44 | 42 | 42 at head_dim 128), base 10000,
    each angle shared by an adjacent pair of dims (rotation: `fused_ops.rope_eager`, or fused with
    RMSNorm in `fused_ops.rms_norm_rope`). Tables are cached per grid and device."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        self.dim_h = self.dim_w = 2 * (head_dim // 6)
        self.dim_t = head_dim - self.dim_h - self.dim_w
        self.base = base
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _axis_angles(self, n: int, dim: int) -> torch.Tensor:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
        return torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]  # [n, dim/2]

    def cos_sin(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, device)
        if key not in self._cache:
            t, h, w = grid
            at = self._axis_angles(t, self.dim_t)[:, None, None, :].expand(t, h, w, -1)
            ah = self._axis_angles(h, self.dim_h)[None, :, None, :].expand(t, h, w, -1)
            aw = self._axis_angles(w, self.dim_w)[None, None, :, :].expand(t, h, w, -1)
            angles = torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, -1).to(device)  # [N, D/2]
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]


class ConditionKeys:
    """The condition frames' self-attention keys and values in every block, computed once per render.

    Condition tokens attend only to each other, get timestep 0 and no text, so their hidden states
    are the same at every sampler step and for both CFG halves; the official pipeline caches their
    keys and values the same way (`_cache_clean_latents`). Made by
    `LongCatVideoTransformer3DModel.cache_condition`, then passed to every `forward` of the render,
    which then computes the noisy frames only."""

    def __init__(self, num_latents: int, batch: int) -> None:
        self.num_latents = num_latents
        self.batch = batch
        self.recording = True
        # the model's output for the condition frames ([B,16,c,H,W] fp32): the official sampler's
        # CFG-Zero* projection sums over every frame, these included
        self.prediction: torch.Tensor | None = None
        self._keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._next = 0

    def record(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep one block's condition keys and values `[B, H, c, D]`, token-major (`[B, c, H, D]`
        storage: the layout `prepend` joins them in), v copied out of its qkv projection."""
        self._keys.append(tuple(t.transpose(1, 2).contiguous() for t in (k, v)))

    def finish_recording(self) -> None:
        self.recording = False

    def start_pass(self) -> None:
        """Called at the start of each forward that uses the keys: blocks take them in order."""
        self._next = 0

    def prepend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy tokens' keys and values `[B, H, N, D]` of this block with the condition's in
        front. B is a multiple of the cached batch (a CFG batch repeats the renders): the cached
        rows are broadcast into the one concatenation, never copied on their own."""
        cond_k, cond_v = self._keys[self._next]
        self._next += 1
        if k.shape[0] % self.batch:
            raise ValueError(f"a batch of {k.shape[0]} rows cannot use a condition cached for {self.batch}")

        def joined(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            # joined along tokens in token-major storage, where each token's heads are one span to
            # copy (a head-major result would make the copy a transpose: 3x slower at 480p), and
            # returned as the [B, H, N, D] view that attention takes
            new = new.transpose(1, 2).unflatten(0, (-1, self.batch))  # [repeats, batch, N, H, D], a view
            joined = torch.cat([cached.expand(new.shape[0], *cached.shape), new], dim=2)
            return joined.flatten(0, 1).transpose(1, 2)

        return joined(cond_k, k), joined(cond_v, v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid, num_cond_latents: int, rope: Rope3D, attention: AttentionDispatcher,
                condition: Optional[ConditionKeys] = None):
        B, N, C = x.shape
        # [B, heads, N, D] views of token-major storage, kept token-major through the fused norm and
        # attention (cuDNN's output follows q's layout), so neither direction copies a transpose
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2))
        cos, sin = rope.cos_sin(grid, x.device)
        skipped = grid[0] * grid[1] * grid[2] - N  # condition tokens left out of x (their keys are cached)
        cos, sin = cos[skipped:], sin[skipped:]
        # RMSNorm + RoPE in one fused pass (same numerics as rope.apply(self.q_norm(q), grid))
        q = rms_norm_rope(q, self.q_norm.weight, self.q_norm.eps, cos, sin)
        k = rms_norm_rope(k, self.k_norm.weight, self.k_norm.eps, cos, sin)
        if condition is not None and condition.recording:
            condition.record(k, v)
        elif condition is not None:  # x holds the noisy tokens; they see the cached condition too
            k, v = condition.prepend(k, v)
            noise_grid = (grid[0] - condition.num_latents, grid[1], grid[2])
            out = attention.self_attention(q, k, v, noise_grid, grid).transpose(1, 2)
            return self.proj(out.reshape(B, N, C))
        if num_cond_latents > 0:
            # Condition tokens see only condition tokens; noisy tokens see everything.
            n_cond = num_cond_latents * (N // grid[0])
            cond_grid = (num_cond_latents, grid[1], grid[2])
            noise_grid = (grid[0] - num_cond_latents, grid[1], grid[2])
            out_cond = attention.self_attention(q[:, :, :n_cond], k[:, :, :n_cond], v[:, :, :n_cond], cond_grid, cond_grid)
            out_noise = attention.self_attention(q[:, :, n_cond:], k, v, noise_grid, grid)
            out = torch.cat([out_cond.transpose(1, 2), out_noise.transpose(1, 2)], dim=1)  # [B, N, H, D]
        else:
            out = attention.self_attention(q, k, v, grid, grid).transpose(1, 2)
        return self.proj(out.reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x, text, text_mask, n_cond_tokens: int, attention: AttentionDispatcher):
        """text: [B, L, C]; text_mask: [B, 1, 1, L] bool or None (all valid). Condition tokens get
        zero output: they never see the text."""
        B, N, C = x.shape
        xq = x[:, n_cond_tokens:]
        q = self.q_norm(self.q_linear(xq).view(B, -1, self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv_linear(text).view(B, -1, 2, self.num_heads, self.head_dim).unbind(2)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        out = attention.dense(q, k, v, attn_mask=text_mask)
        out = self.proj(out.transpose(1, 2).reshape(B, -1, C))
        if n_cond_tokens:
            out = torch.cat([out.new_zeros(B, n_cond_tokens, C), out], dim=1)
        return out


class LongCatBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, adaln_tembed_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Fp32Linear(adaln_tembed_dim, 6 * hidden_size))
        self.pre_crs_attn_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, int(hidden_size * mlp_ratio))
        # only the gated residual follows it: a LoRA on it may end the block's recomputation
        # before its base GEMM (`lora.fused_linear`)
        self.ffn.w2.ends_block = True
        for role, (parent, name) in PROJECTION_ROLES.items():
            getattr(getattr(self, parent), name).checkpoint_role = role

    def forward(self, x, t_emb, text, text_mask, grid, num_cond_latents, rope, attention, condition=None):
        """x: [B, N, C] in the weight dtype; t_emb: [B, T, C_t] fp32 (one modulation per latent frame
        of x). With `condition` (`ConditionKeys`): recording, x is the condition frames alone (no
        text); else x is the noisy frames alone and the condition's keys and values come cached."""
        B, N, C = x.shape
        T = t_emb.shape[1]
        mod = linear_fp32(self.adaLN_modulation[1], F.silu(t_emb)).unsqueeze(2)  # [B, T, 1, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        # fp32 LayerNorm/modulation/gating, each one fused pass (see fused_ops for the numerics)
        a = self.attn(modulate(x, shift_msa, scale_msa), grid, num_cond_latents, rope, attention, condition)
        x = gated_residual(x, a, gate_msa)
        recording = condition is not None and condition.recording
        n_cond_tokens = N if recording else num_cond_latents * (N // T)
        if n_cond_tokens < N:  # condition tokens never see the text: their cross-attention output is zero
            x = x + self.cross_attn(layer_norm_affine(x, self.pre_crs_attn_norm), text, text_mask, n_cond_tokens,
                                    attention)
        f = self.ffn(modulate(x, shift_mlp, scale_mlp))
        return gated_residual(x, f, gate_mlp)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int):
        super().__init__()
        self.linear = Fp32Linear(hidden_size, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Fp32Linear(adaln_tembed_dim, 2 * hidden_size))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = linear_fp32(self.adaLN_modulation[1], F.silu(t_emb)).unsqueeze(2).chunk(2, dim=-1)
        # the official code casts the modulated input back to the weight dtype before the fp32 linear
        return linear_fp32(self.linear, modulate(x, shift, scale))


def _keep_policy(kept: frozenset[str], ctx, op, *args, **kwargs):
    """Selective checkpointing's choice per op: keep the outputs of the kinds in `kept` —
    "self_attention" / "cross_attention" (attention ops over at least as many keys as queries are
    self-attention: cross-attention sees 512 text tokens) and the `PROJECTION_ROLES` of fused LoRA
    linears — and recompute everything else."""
    if is_attention_op(op):
        kind = "self_attention" if args[1].shape[-2] >= args[0].shape[-2] else "cross_attention"
    elif qualified_op_name(op) == "longcat::lora_linear":
        kind = args[6]
    else:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if kind in kept else CheckpointPolicy.PREFER_RECOMPUTE


class LongCatVideoTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """LongCat-Video DiT. Constructor keys are the release's `dit/config.json` keys; the runtime-only
    keys (`enable_*`, `bsa_params`, `cp_split_hw`) are accepted and only steer attention."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LongCatBlock"]
    _skip_layerwise_casting_patterns = ["x_embedder", "t_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 48,
        num_heads: int = 32,
        caption_channels: int = 4096,
        mlp_ratio: int = 4,
        adaln_tembed_dim: int = 512,
        frequency_embedding_size: int = 256,
        patch_size: Sequence[int] = (1, 2, 2),
        enable_flashattn3: bool = False,
        enable_flashattn2: bool = False,
        enable_xformers: bool = False,
        enable_bsa: bool = False,
        bsa_params: Optional[dict] = None,
        cp_split_hw: Optional[Sequence[int]] = None,
        text_tokens_zero_pad: bool = False,
    ):
        super().__init__()
        if tuple(patch_size)[0] != 1:
            raise ValueError("LongCat-Video patchifies only spatially: patch_size[0] must be 1")
        self.patch_size = tuple(patch_size)
        self.out_channels = out_channels
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(
            [LongCatBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), out_channels, adaln_tembed_dim)
        self.rope = Rope3D(hidden_size // num_heads)
        self.attention = AttentionDispatcher("auto", use_bsa=enable_bsa, bsa=BsaSettings.from_params(bsa_params))
        self.gradient_checkpointing = False
        self.checkpoint_mode = "full"
        self.selective_blocks = depth
        self.offload_block_inputs = False
        self.keep_cross_attention = False
        self.keep_projections: frozenset[str] = frozenset()
        self.sequence_parallel: SequenceParallel | None = None

    # ----- runtime settings -------------------------------------------------------------------
    def set_sequence_parallel(self, sequence_parallel: SequenceParallel | None) -> None:
        """Share each sample's tokens with the other processes of `sequence_parallel`'s group
        (`ulysses.py`): every one of them calls forward with the same inputs and gets the whole
        prediction; None: this process computes whole samples."""
        self.sequence_parallel = sequence_parallel

    def set_attention_implementation(self, implementation: str, use_bsa: bool | None = None) -> None:
        use_bsa = self.config.enable_bsa if use_bsa is None else use_bsa
        self.attention = AttentionDispatcher(
            implementation, use_bsa=use_bsa, bsa=BsaSettings.from_params(self.config.bsa_params)
        )

    @contextlib.contextmanager
    def using_attention(self, implementation: str, use_bsa: bool | None = None):
        """`set_attention_implementation` while the block runs; the previous setting comes back after."""
        previous = self.attention
        self.set_attention_implementation(implementation, use_bsa)
        try:
            yield
        finally:
            self.attention = previous

    def set_activation_checkpointing(
        self, mode: str, selective_blocks: int | None = None, offload_block_inputs: bool = False,
        keep_cross_attention: bool = False, keep_projections: Sequence[str] = (),
    ) -> None:
        """`none`, `full` (recompute each block) or `selective` (recompute each block but keep the
        attention outputs and log-sum-exp, so attention never runs twice). `selective_blocks` limits
        the kept attention outputs to the first N blocks (the rest recompute fully) to fit a memory
        budget; None means all blocks. `offload_block_inputs` keeps the checkpointed block inputs in
        pinned host memory (copied asynchronously, fetched back one block ahead) on CUDA.
        `offload_block_inputs` also sends the kept attention outputs there. `keep_cross_attention`:
        whether `selective` keeps cross-attention outputs too: ~1 ms of recompute per block saved for
        0.29 GiB per block at 480x832x93, on the GPU or (offloaded) in pinned host memory, where
        three kinds of kept tensors add up to ~98 GiB at 720x1280x93. `keep_projections`: names from
        `PROJECTION_ROLES` whose outputs `selective` keeps as well (each skips a GEMM in the
        recomputation for its output's bytes, e.g. "qkv" 0.86 GiB per block at 480x832x93)."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {CHECKPOINT_MODES}")
        unknown = sorted(set(keep_projections) - set(PROJECTION_ROLES))
        if unknown:
            raise ValueError(f"keep_projections {unknown}: choose from {sorted(PROJECTION_ROLES)}")
        self.gradient_checkpointing = mode != "none"
        self.checkpoint_mode = mode if mode != "none" else "full"
        self.selective_blocks = len(self.blocks) if selective_blocks is None else selective_blocks
        self.offload_block_inputs = offload_block_inputs and mode != "none"
        self.keep_cross_attention = keep_cross_attention
        self.keep_projections = frozenset(keep_projections)

    # ----- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' loader (meta-device build, shard-by-shard streaming with dtype cast), after a
        header-only check that names every missing, unexpected or mis-shaped key."""
        root = Path(pretrained_model_name_or_path)
        folder = root / kwargs.get("subfolder", "") if kwargs.get("subfolder") else root
        if folder.is_dir():
            config = json.loads((folder / "config.json").read_text())
            with torch.device("meta"):
                skeleton = cls.from_config(config)
            verify_weight_keys(folder, skeleton.state_dict())
            del skeleton
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ----- forward ----------------------------------------------------------------------------
    def _run_block(self, index: int, block, *args):
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(*args)
        if not (self.checkpoint_mode == "selective" and index < self.selective_blocks):
            begin_block(index, frozenset())
            return checkpoint(block, *args, use_reentrant=False)
        kept = frozenset({"self_attention", *self.keep_projections}
                         | ({"cross_attention"} if self.keep_cross_attention else set()))
        begin_block(index, kept)
        context = functools.partial(create_selective_checkpoint_contexts, functools.partial(_keep_policy, kept))
        return checkpoint(block, *args, use_reentrant=False, context_fn=context)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        num_cond_latents: int = 0,
        condition: Optional[ConditionKeys] = None,
        step_cache: Optional[StepCache] = None,
    ) -> torch.Tensor:
        """hidden_states [B,16,T,H,W]; timestep [B] or [B,T] (σ·1000); encoder_hidden_states
        [B,1,L,C]; encoder_attention_mask [B,L] or None → prediction of x0 − ε, [B,16,T,H,W] fp32.
        With `condition` (from `cache_condition`), hidden_states and timestep hold the noisy frames
        only (they follow the cached condition frames) and `num_cond_latents` is unused; while the
        condition records, they hold the condition frames and there is no text. `step_cache`
        (renders, opt-in): may skip the blocks after the first (`step_cache.StepCache`)."""
        recording = condition is not None and condition.recording
        if condition is not None:
            if self.sequence_parallel is not None:
                raise ValueError("a cached condition is not supported with sequence parallelism")
            if not recording:
                condition.start_pass()
            num_cond_latents = 0
        B, _, T, H, W = hidden_states.shape
        before = condition.num_latents if condition is not None and not recording else 0
        grid = (before + T, H // self.patch_size[1], W // self.patch_size[2])
        dtype = self.x_embedder.proj.weight.dtype
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, T)
        # like the release: inputs (timesteps included) are rounded to the weight dtype first
        x = self.x_embedder(hidden_states.to(dtype))
        t_emb = self.t_embedder(timestep.to(dtype).float().flatten()).view(B, T, -1)

        text = None if recording else self.y_embedder(encoder_hidden_states.to(dtype)).squeeze(1)  # [B, L, C]
        text_mask = None
        if encoder_attention_mask is not None and not recording:
            if self.config.text_tokens_zero_pad:
                # padded tokens become exact zeros and stay attendable, as in the release
                text = text * encoder_attention_mask[:, :, None].to(text.dtype)
            else:
                text_mask = encoder_attention_mask.bool()[:, None, None, :]

        tile, rope, attention, shared = grid, self.rope, self.attention, self.sequence_parallel
        if shared is not None:  # this process's band of every frame; self-attention gathers the rest
            band = shared.band(grid, self.blocks[0].attn.num_heads)
            x, tile = shared.split(x, grid, band)
            rope, attention = TileRope(self.rope, band), UlyssesAttention(self.attention, band)

        offload = self.offload_block_inputs and x.is_cuda and torch.is_grad_enabled()
        with host_offload() if offload else contextlib.nullcontext():
            args = (t_emb, text, text_mask, tile, num_cond_latents, rope, attention, condition)
            x = first = self._run_block(0, self.blocks[0], x, *args)
            reused = None if step_cache is None else step_cache.reusable(first)
            if reused is not None:
                x = first + reused
            else:
                for index, block in enumerate(self.blocks[1:], 1):
                    x = self._run_block(index, block, x, *args)
                if step_cache is not None:
                    step_cache.store(first, x)

        out = self.final_layer(x, t_emb)  # [B, N, p_h*p_w*C_out] fp32
        if shared is not None:
            out = shared.gather(out, tile, band)
        _, ph, pw = self.patch_size
        out = out.view(B, T, grid[1], grid[2], ph, pw, self.out_channels)
        out = out.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, self.out_channels, T, grid[1] * ph, grid[2] * pw)
        return out.float()

    @torch.no_grad()
    def cache_condition(self, cond_latents: torch.Tensor) -> ConditionKeys:
        """Run the clean condition frames `[B,16,c,H,W]` through every block once (timestep 0, no
        text) and keep their keys and values, for a render's `forward(..., condition=...)` calls."""
        B, _, c, _, _ = cond_latents.shape
        condition = ConditionKeys(c, B)
        # through forward, so hooks on the whole model (FSDP, offloading) run as in a render step
        condition.prediction = self(cond_latents, torch.zeros(B, c, device=cond_latents.device), None,
                                    condition=condition)
        condition.finish_recording()
        return condition
