"""Facts of the released LongCat-Video checkpoint that several layers need, in one torch-free place
(config rules, data decoding, caches, the memory plan, training and validation all read it):
the VAE's compression, the DiT's patch, the text length, the flow shift, the render defaults, the
official LoRAs' places, the refinement stage's sizes and the DiT / umT5-XXL configs."""

from __future__ import annotations

VAE_TEMPORAL_STRIDE = 4  # causal: frame 0 alone, then 4 frames per latent frame
VAE_SPATIAL_STRIDE = 8
LATENT_CHANNELS = 16
PATCH_SIZE = (1, 2, 2)  # the DiT's (time, height, width) patch
PIXEL_MULTIPLE = VAE_SPATIAL_STRIDE * PATCH_SIZE[1]  # every pixel size is a multiple of 16
TEXT_TOKENS = 512  # umT5 pads and truncates to this; the DiT was trained on padded text
FLOW_SHIFT = 12.0  # the scheduler's shift, used where no scheduler config is at hand
DEFAULT_FRAMES = 93  # what the base model renders, at 15 fps
DEFAULT_FPS = 15
# The release's CFG-and-step distillation LoRA (16 steps, no CFG), inside the checkpoint folder
CFG_STEP_LORA = "lora/cfg_step_lora.safetensors"
# The release's refinement LoRA (480p → 720p, 15 → 30 fps, with block-sparse attention)
REFINEMENT_LORA = "lora/refinement_lora.safetensors"
# The refinement stage's output sizes (height, width): the official 720p bucket table at 64-pixel
# granularity (VAE 8 × patch 2 × BSA block 4), one size per aspect ratio; a stage-1 video takes the
# size whose height/width, rounded to two decimals as the table labels it, is nearest its own.
REFINE_SIZES = (
    (448, 2048), (512, 1792), (576, 1600), (640, 1408), (704, 1280), (768, 1216), (832, 1088),
    (896, 1024), (960, 960), (1024, 896), (1088, 832), (1152, 768), (1216, 768), (1280, 704),
    (1344, 704), (1408, 640), (1472, 640), (1536, 576), (1664, 576), (1856, 512), (1920, 512),
)

# The block linears whose outputs selective checkpointing may keep (`keep_projections`), by role:
# role → the linear's path inside a block
PROJECTION_MODULES = {
    "qkv": "attn.qkv", "attention_out": "attn.proj", "cross_q": "cross_attn.q_linear",
    "cross_out": "cross_attn.proj", "ffn_w1": "ffn.w1", "ffn_w3": "ffn.w3",
}

# Every linear layer inside a block, by its path there: what a LoRA target (`lora_target_modules`)
# may name
BLOCK_LINEARS = (
    "adaLN_modulation.1", "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
    "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3",
)

RELEASE_DIT_CONFIG = dict(
    in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32, caption_channels=4096,
    mlp_ratio=4, adaln_tembed_dim=512, frequency_embedding_size=256, patch_size=[1, 2, 2],
    text_tokens_zero_pad=True, enable_bsa=False,
    bsa_params={"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
    enable_flashattn2=True, enable_flashattn3=False, cp_split_hw=None,
)

# umT5-XXL as the release's text_encoder/config.json describes it (transformers' UMT5Config keys)
RELEASE_UMT5_CONFIG = dict(
    vocab_size=256_384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
RELEASE_VOCAB_SIZE = RELEASE_UMT5_CONFIG["vocab_size"]


def is_valid_frame_count(frames: int) -> bool:
    """Clips need 4k + 1 frames (the VAE compresses time 4x after the first frame)."""
    return frames >= 1 and (frames - 1) % VAE_TEMPORAL_STRIDE == 0


def nearest_valid_frame_counts(frames: int) -> tuple[int, int]:
    """The valid counts just below and just above `frames` (both equal `frames` when it is valid;
    at least 1)."""
    below = max(1, 1 + VAE_TEMPORAL_STRIDE * ((frames - 1) // VAE_TEMPORAL_STRIDE))
    above = below if is_valid_frame_count(frames) else below + VAE_TEMPORAL_STRIDE
    return below, above


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a clip of `frames` x `height` x `width` pixels."""
    return (1 + (frames - 1) // VAE_TEMPORAL_STRIDE, height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE)


def token_count(frames: int, height: int, width: int) -> int:
    """The DiT's video tokens for one such clip (latents cut into `PATCH_SIZE` patches)."""
    t, h, w = latent_shape(frames, height, width)
    return (t // PATCH_SIZE[0]) * (h // PATCH_SIZE[1]) * (w // PATCH_SIZE[2])
