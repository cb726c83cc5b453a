"""A tiny random LongCat-Video in the official checkpoint layout, built on the CPU in seconds.

Same classes, same file layout and same config keys as the release (sharded fp32 DiT with an
index, Wan VAE with the real latent statistics, umT5 encoder, umT5-style SentencePiece tokenizer,
flow-matching scheduler with shift 12), only small. Tests and `longcat demo` load it through the
same code paths as the real 13.6B checkpoint. Everything is deterministic given `seed`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from ..release_facts import FLOW_SHIFT

TINY_DIT_CONFIG: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 2,
    "caption_channels": 32,
    "mlp_ratio": 4,
    "adaln_tembed_dim": 32,
    "frequency_embedding_size": 256,
    "patch_size": [1, 2, 2],
    "text_tokens_zero_pad": True,
    "enable_flashattn2": False,
    "enable_flashattn3": False,
    "enable_bsa": False,
    "bsa_params": {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
    "cp_split_hw": None,
}
DIT_SHARDS = 3

# Captions in the style of video datasets; the tokenizer is trained on them so that ordinary
# demo prompts split into real subwords rather than unknown tokens.
_TOKENIZER_CORPUS = (
    "A cat walks slowly across a sunny kitchen floor and stops to look at the camera.",
    "The camera pans over snowy mountains at dawn while clouds drift through the valley.",
    "A red car drives along a coastal road as waves crash on the rocks below.",
    "Close-up of a woman smiling in soft window light, shallow depth of field.",
    "A small boat sails on a calm blue lake surrounded by green hills.",
    "Time-lapse of a busy city street at night with glowing traffic lights.",
    "A dog runs through tall grass in a field, chasing a yellow ball.",
    "Rain falls on a quiet street; people with umbrellas hurry past a cafe.",
    "An aerial shot of a forest in autumn, orange and red leaves moving in the wind.",
    "A chef slices fresh vegetables on a wooden board in a bright restaurant kitchen.",
    "Two children build a sandcastle on the beach while the tide comes in.",
    "A white bird spreads its wings and flies over the ocean at sunset.",
    "Slow motion of water drops splashing into a glass bowl.",
    "A man rides a bicycle down a narrow alley with colourful walls.",
    "Fireworks explode in the dark sky above a river and a bridge.",
    "A horse gallops across a dusty plain under a wide open sky.",
    "The moving square turns from blue to green and slides to the right.",
    "A bright circle bounces from left to right on a dark background.",
    "Candles flicker on a table as a hand lights one more.",
    "A train crosses a stone bridge in the mountains, smoke rising behind it.",
    "Old photographs lie on a table; the camera moves slowly over them.",
    "A dancer spins on a stage in a single spotlight, her dress flowing.",
    "Leaves float down a stream past smooth grey stones.",
    "A robot arm picks up a cube and places it on a shelf.",
    "Snow falls gently on a cabin in the woods with smoke from the chimney.",
    "A hot air balloon rises above fields at sunrise.",
    "The wind moves waves of wheat under a cloudy summer sky.",
    "A cup of coffee steams on a desk next to an open book.",
    "Cars and buses cross a wide bridge during the evening rush hour.",
    "A turtle swims over a coral reef full of small fish.",
    "High quality, realistic, cinematic lighting, 4k, detailed textures.",
    "Blurry, low quality, distorted, watermark, text, jpeg artifacts.",
)
_TOKENIZER_VOCAB_SIZE = 400  # an upper bound: the corpus supports fewer pieces

TINY_VAE_CONFIG: dict[str, Any] = {
    # Wan 2.1 structure (three downsamplings: spatial 8; two of them temporal: 4), narrow channels.
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    # The release's statistics (also diffusers' defaults), written explicitly so the file says so.
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}


def write_umt5_tokenizer(directory: Path, vocab_size: int | None = None) -> int:
    """An umT5-style tokenizer, trained here on the corpus above since no vocabulary may be
    downloaded: a SentencePiece Unigram model with NFKC normalisation, as umT5's own, loaded
    through transformers' T5 tokenizer (which converts it to a fast `tokenizer.json`). Trained
    with `sentencepiece` on one thread because its result is bit-identical run to run; the
    `tokenizers` Unigram trainer orders tied pieces differently on every run, changing the ids.

    With `vocab_size` (the release's is 256,384) filler pieces that no text matches are put between
    the special tokens and the trained ones, so the vocabulary has exactly that size and ordinary
    prompts use ids near its top, as real umT5 prompts reach rows deep in the embedding.
    Returns the vocabulary size."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS),
        model_writer=model,
        model_type="unigram",
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        hard_vocab_limit=False,  # the corpus is small; take what it supports
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # umT5 has no bos
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5TokenizerFast.from_pretrained(directory, extra_ids=0, local_files_only=True)
    tokenizer.save_pretrained(directory)
    if vocab_size is None:
        return len(tokenizer)
    definition = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = definition["model"]["vocab"]
    specials, trained = pieces[:3], pieces[3:]  # <pad>, </s>, <unk> keep ids 0, 1, 2
    if vocab_size < len(pieces):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(pieces)} trained pieces")
    fillers = [[f"\u2042{i}", -100.0] for i in range(vocab_size - len(pieces))]
    definition["model"]["vocab"] = specials + fillers + trained
    # the grown vocabulary lives in tokenizer.json alone; the small SentencePiece model would shadow it
    (directory / "spiece.model").unlink()
    (directory / "tokenizer.json").write_text(json.dumps(definition, ensure_ascii=False), encoding="utf-8")
    return vocab_size


def _write_dit(directory: Path, config: Mapping[str, Any]) -> None:
    from longcat_train.model import LongCatVideoTransformer3DModel  # heavy; only needed here

    dit = LongCatVideoTransformer3DModel(**config)  # float32, as the release stores it
    total_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    # Sharded like the release (shards + index.json) so the sharded loading path is exercised.
    dit.save_pretrained(directory, max_shard_size=total_bytes // DIT_SHARDS + 1, safe_serialization=True)


def tiny_umt5_config(vocab_size: int, width: int) -> UMT5Config:
    """umT5's structure (gated-GELU FFN, relative position buckets, untied embeddings), two layers."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    config.architectures = ["UMT5EncoderModel"]
    return config


def write_tiny_model(root: str | Path, seed: int = 0, dit_config: Mapping[str, Any] | None = None,
                          vocab_size: int | None = None) -> Path:
    """Write `dit/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` under `root`; returns `root`.

    `dit_config` entries override `TINY_DIT_CONFIG`; the text encoder's width follows its
    `caption_channels`. `vocab_size` gives tokenizer and encoder that many entries (the release's
    256,384 for tests of release-size embeddings; default: the trained pieces alone). The caller's
    global RNG state is left untouched.
    """
    root = Path(root)
    config = {**TINY_DIT_CONFIG, **(dit_config or {})}
    vocab_size = write_umt5_tokenizer(root / "tokenizer", vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        write_vae(root / "vae", TINY_VAE_CONFIG)
        torch.manual_seed(seed + 1)
        UMT5EncoderModel(tiny_umt5_config(vocab_size, config["caption_channels"])).save_pretrained(root / "text_encoder")
        torch.manual_seed(seed + 2)
        _write_dit(root / "dit", config)
    write_scheduler(root / "scheduler")
    return root


def write_vae(directory: Path, config: Mapping[str, Any]) -> None:
    """A Wan 2.1 VAE (random weights, float32) with `config`; the release's latent statistics
    are diffusers' defaults, written out when `config` names them."""
    AutoencoderKLWan(**config).save_pretrained(directory, safe_serialization=True)


def write_scheduler(directory: Path) -> None:
    """The release's flow-matching scheduler config (1000 steps, shift 12)."""
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT).save_pretrained(directory)
