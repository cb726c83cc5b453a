"""Facts of the released LongCat-Video checkpoint (its DiT and umT5-XXL configs) and a builder of its
transformer with random weights: what benchmarks, the memory planner and the release-shaped
end-to-end run share."""

from __future__ import annotations

import torch

from .transformer import LongCatVideoTransformer3DModel

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


def random_transformer(device: str | torch.device, dtype: torch.dtype, depth: int = 48, seed: int = 0,
                       **overrides):
    """The release architecture (with `overrides` of its config keys) with random weights allocated
    directly on `device` in `dtype` (built on the meta device first, so host RAM never holds it;
    no global default dtype is touched, so a thread may build one while another loads a model)."""
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel.from_config({**RELEASE_DIT_CONFIG, "depth": depth, **overrides})
    # nn.Module's `to`: diffusers' override warns about float32-kept modules this model has none of
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model
