"""From datasets on disk to cached latents and text features: what `longcat cache` does and what
`longcat train` does first.

Each encoder is loaded, used for everything missing, and unloaded before the next one, so the
denoiser's training steps never share the GPU with the VAE or umT5.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.markup import escape

from ..cache import CachedLatent, LatentCache, LatentJob, TextCache, clean_prompt
from ..components import free_device_memory, load_text_encoder, load_tokenizer, load_vae
from ..config import LoadedConfig
from ..data import ClipItem, DatasetScan, DataSpec, load_clip_pixels, load_start_frame_pixels, scan_dataset
from ..run_lock import hold_directory


@dataclass
class PreparedData:
    """Usable items with cached latents, and every prompt's features (cleaned text → (embeds, mask))."""

    items: list[ClipItem]
    eval_items: list[ClipItem]
    scans: dict[str, DatasetScan]
    latent_caches: dict[str, LatentCache]  # dataset id → read-only cache
    text_features: dict[str, tuple[torch.Tensor, torch.Tensor]]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item or prompt, reason)

    def clip_latent(self, item: ClipItem) -> CachedLatent:
        return self.latent_caches[item.dataset_id].get_or_encode(item.fingerprint(), _no_pixels, "clip")

    def start_latent(self, item: ClipItem) -> CachedLatent | None:
        fingerprint = item.start_frame_fingerprint()
        if fingerprint is None:
            return None
        return self.latent_caches[item.dataset_id].get_or_encode(fingerprint, _no_pixels, "start_frame")

    def text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_features[clean_prompt(prompt)]


def _no_pixels() -> torch.Tensor:
    raise RuntimeError("a cache entry vanished during training; run `longcat cache` again")


def data_specs(loaded: LoadedConfig) -> dict[str, DataSpec]:
    alignment = loaded.training.aspect_bucket_alignment
    return {d.id: DataSpec.from_dataset_config(d, alignment=alignment) for d in loaded.datasets}


def scan_datasets(loaded: LoadedConfig) -> dict[str, DatasetScan]:
    specs = data_specs(loaded)
    start_frames = {i: s for i, s in specs.items() if s.kind.gives_start_frames}
    return {
        d.id: scan_dataset(specs[d.id], start_frames, seed=loaded.training.seed)
        for d in loaded.datasets
        if not d.kind.gives_start_frames
    }


def text_cache_dir(loaded: LoadedConfig) -> Path:
    if loaded.text_embeds is not None:
        return Path(loaded.text_embeds.cache_dir)
    return Path(loaded.training.output_dir) / "cache" / "text"


def validation_prompts(loaded: LoadedConfig) -> list[str]:
    cfg = loaded.training
    prompts = (cfg.validation_prompt, cfg.validation_negative_prompt, *(e.prompt for e in loaded.prompt_entries))
    return [p for p in prompts if p]


@dataclass(frozen=True)
class Shard:
    """This process's share of the encoding work: job i belongs to rank i % world. Entries are
    content-keyed and written atomically, so ranks never collide; `barrier` waits for all."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None

    def take(self, jobs: list) -> list:
        return jobs[self.rank :: self.world]


def _writing(cache_dir: Path, what: str, shard: Shard, console: Console):
    """Held while this run writes into `cache_dir` (by its first rank; its other ranks share the
    work): a second run that writes there waits, saying for whom, instead of encoding the same
    entries alongside."""
    if shard.rank != 0:
        return contextlib.nullcontext()
    return hold_directory(Path(cache_dir), f"writing the {what}", wait=True, on_wait=console.print)


def _cache_latents(loaded, scans, root, device, console, failed, shard: Shard) -> dict[str, LatentCache]:
    cfg = loaded.training
    vae_dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    vae = load_vae(root, dtype=vae_dtype, device=device)
    caches: dict[str, LatentCache] = {}
    try:
        for dataset_id, scan in scans.items():
            if not scan.items:
                continue
            cache_dir = loaded.dataset(dataset_id).cache_dir_vae
            cache = LatentCache(cache_dir, vae, tiling=cfg.vae_enable_tiling, slicing=cfg.vae_enable_slicing)
            jobs = {}
            for item in scan.items:
                jobs[(item.key, "clip")] = LatentJob(
                    item.fingerprint(), lambda item=item: load_clip_pixels(item), "clip", item.key
                )
                start = item.start_frame_fingerprint()
                if start is not None:
                    jobs[(item.key, "start")] = LatentJob(
                        start, lambda item=item: load_start_frame_pixels(item), "start_frame", item.key
                    )
            with _writing(cache_dir, "latent cache", shard, console):
                summary = cache.encode_many(shard.take(list(jobs.values())), progress=console.is_terminal)
                shard.barrier()
            console.print(summary.as_table())
            if summary.failed or summary.rebuilt:
                console.print(summary.issues_table())
            failed.extend((issue.label, issue.reason) for issue in summary.failed)
            # every rank drops the items whose entries some rank failed to write
            present = {key for key, job in jobs.items() if cache.path_for(job.fingerprint, job.kind).is_file()}
            scan.items = [i for i in scan.items if (i.key, "clip") in present
                          and ((i.key, "start") in present or (i.key, "start") not in jobs)]
            caches[dataset_id] = LatentCache(cache_dir, None, identity=cache.identity)
    finally:
        del vae
        free_device_memory(device)
    return caches


def _cache_text(loaded, prompts, root, device, console, failed, shard: Shard) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    encoder_dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    tokenizer = load_tokenizer(root)
    encoder = load_text_encoder(root, dtype=encoder_dtype, device=device)
    try:
        cache = TextCache(text_cache_dir(loaded), tokenizer, encoder)
        with _writing(text_cache_dir(loaded), "text cache", shard, console):
            summary = cache.encode_many(shard.take(list(dict.fromkeys(prompts))), progress=console.is_terminal)
            shard.barrier()
        console.print(summary.as_table())
        if summary.failed:
            console.print(summary.issues_table())
            failed.extend((issue.label, issue.reason) for issue in summary.failed)
        # the encoder is still loaded: anything another rank failed to write is encoded here
        features = {}
        for prompt in ["", *prompts]:
            cleaned = clean_prompt(prompt)
            if cleaned not in features:
                features[cleaned] = cache.get(cleaned)
    finally:
        del encoder
        free_device_memory(device)
    return features


def prepare_data(
    loaded: LoadedConfig, device: str | torch.device = "cpu", console: Console | None = None, shard: Shard = Shard()
) -> PreparedData:
    """Scan every dataset, cache every missing latent and caption, and return what training reads.
    Bad clips are skipped and reported; nothing here raises for a single bad file."""
    console = console or Console()
    root = Path(loaded.training.pretrained_model_name_or_path)
    scans = scan_datasets(loaded)
    for scan in scans.values():
        for skipped in scan.skipped:
            console.print(f"[yellow]skipped[/] {escape(f'{skipped.path}: {skipped.reason}')}", soft_wrap=True)
    failed: list[tuple[str, str]] = []
    caches = _cache_latents(loaded, scans, root, device, console, failed, shard)
    captions = [item.caption for scan in scans.values() for item in scan.items]
    text = _cache_text(loaded, [*captions, *validation_prompts(loaded)], root, device, console, failed, shard)
    eval_id = loaded.training.eval_dataset_id
    train_ids = {d.id for d in loaded.training_datasets}
    return PreparedData(
        items=[item for i, scan in scans.items() if i in train_ids for item in scan.items],
        eval_items=list(scans[eval_id].items) if eval_id in scans else [],
        scans=scans,
        latent_caches=caches,
        text_features=text,
        failed=failed,
    )
