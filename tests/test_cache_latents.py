"""The VAE latent cache: normalisation per the spec, content keys, reuse, corruption, failures."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from rich.console import Console

from longcat_train.cache import CachedLatent, LatentCache, LatentCacheMiss, LatentJob
from longcat_train.components import load_vae

# The release's latent statistics, typed in from the model notes rather than read from the
# config, so the test checks the cache against the spec and not against itself.
SPEC_MEAN = torch.tensor([
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]).view(16, 1, 1, 1)
SPEC_STD = torch.tensor([
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]).view(16, 1, 1, 1)
FRAMES, HEIGHT, WIDTH = 9, 32, 32


@pytest.fixture(scope="module")
def vae(tiny_model: Path) -> AutoencoderKLWan:
    return load_vae(tiny_model)


def make_pixels(seed: int, frames: int = FRAMES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, HEIGHT, WIDTH, generator=generator) * 2 - 1


def fingerprint(index: int, mtime: float = 1000.0) -> dict[str, object]:
    return {"path": f"/data/clip{index}.mp4", "size": 1234 + index, "mtime": mtime, "window": [0, FRAMES]}


class CountingPixels:
    """A pixels_fn that records how often the cache asked for the pixels."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return make_pixels(self.seed)


def jobs_for(count: int, mtimes: dict[int, float] | None = None) -> tuple[list[LatentJob], list[CountingPixels]]:
    sources = [CountingPixels(seed) for seed in range(count)]
    jobs = [
        LatentJob(fingerprint(i, (mtimes or {}).get(i, 1000.0)), sources[i], "clip", f"clip{i}.mp4")
        for i in range(count)
    ]
    return jobs, sources


def test_normalisation_matches_spec(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    pixels = make_pixels(7)
    cache = LatentCache(tmp_path, vae)
    latent = cache.get_or_encode(fingerprint(0), lambda: pixels)
    with torch.no_grad():
        posterior = vae.encode(pixels.unsqueeze(0)).latent_dist
    expected_mean = (posterior.mean[0] - SPEC_MEAN) / SPEC_STD
    expected_std = posterior.std[0] / SPEC_STD
    assert latent.mean.shape == (16, 1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(latent.mean, expected_mean)
    torch.testing.assert_close(latent.std, expected_std)
    # What is read back from disk is the same as what was encoded.
    reread = LatentCache(tmp_path, vae).get_or_encode(fingerprint(0), lambda: pytest.fail("must not re-encode"))
    torch.testing.assert_close(reread.mean, expected_mean, rtol=0, atol=0)
    # A sample is mean + std·ε with ε from the given generator.
    sample = latent.sample(torch.Generator().manual_seed(3))
    noise = torch.randn(latent.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, expected_mean + expected_std * noise)


def test_second_run_encodes_nothing(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    jobs, sources = jobs_for(3)
    first = LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    assert (first.encoded, first.reused, first.rebuilt, first.failed) == (3, 0, [], [])
    jobs, sources = jobs_for(3)
    second = LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    assert (second.encoded, second.reused, second.rebuilt, second.failed) == (0, 3, [], [])
    assert [source.calls for source in sources] == [0, 0, 0]  # no clip was even decoded


def test_changing_one_fingerprint_reencodes_exactly_one(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    jobs, _ = jobs_for(3)
    LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    jobs, sources = jobs_for(3, mtimes={1: 2000.0})  # clip 1 was touched
    summary = LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    assert (summary.encoded, summary.reused) == (1, 2)
    assert [source.calls for source in sources] == [0, 1, 0]


def test_other_vae_weights_never_reuse_entries(vae: AutoencoderKLWan, tiny_model: Path, tmp_path: Path) -> None:
    jobs, _ = jobs_for(2)
    LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    changed = load_vae(tiny_model)
    with torch.no_grad():
        next(changed.parameters()).mul_(1.01)
    jobs, sources = jobs_for(2)
    summary = LatentCache(tmp_path, changed).encode_many(jobs, progress=False)
    assert (summary.encoded, summary.reused) == (2, 0)
    # Tiling changes the numbers too, so it is part of the key as well.
    assert LatentCache(tmp_path, vae, tiling=True).identity != LatentCache(tmp_path, vae).identity


def test_clips_and_start_frames_live_apart(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    cache = LatentCache(tmp_path, vae)
    clip = cache.get_or_encode(fingerprint(0), lambda: make_pixels(0))
    start = cache.get_or_encode(fingerprint(0), lambda: make_pixels(0, frames=1), kind="start_frame")
    assert start.mean.shape[1] == 1 and clip.mean.shape[1] == 3
    assert cache.path_for(fingerprint(0), "clip").parent == tmp_path / "clips"
    assert cache.path_for(fingerprint(0), "start_frame").parent == tmp_path / "start_frames"
    assert len(list((tmp_path / "clips").iterdir())) == 1
    assert len(list((tmp_path / "start_frames").iterdir())) == 1


def test_truncated_cache_file_is_rebuilt(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    jobs, _ = jobs_for(2)
    cache = LatentCache(tmp_path, vae)
    cache.encode_many(jobs, progress=False)
    path = cache.path_for(fingerprint(1))
    original = cache.get_or_encode(fingerprint(1), lambda: pytest.fail("must not re-encode"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    jobs, sources = jobs_for(2)
    summary = LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    assert (summary.encoded, summary.reused) == (0, 1)
    assert [issue.label for issue in summary.rebuilt] == ["clip1.mp4"]
    assert "safetensors" in summary.rebuilt[0].reason
    assert sources[1].calls == 1
    rebuilt = LatentCache(tmp_path, vae).get_or_encode(fingerprint(1), lambda: pytest.fail("must not re-encode"))
    torch.testing.assert_close(rebuilt.mean, original.mean, rtol=0, atol=0)


def test_flipped_bytes_are_detected_on_read_and_rebuilt(
    vae: AutoencoderKLWan, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = LatentCache(tmp_path, vae)
    original = cache.get_or_encode(fingerprint(0), lambda: make_pixels(0))
    path = cache.path_for(fingerprint(0))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same length, damaged payload: only the checksum can tell
    path.write_bytes(bytes(data))
    source = CountingPixels(0)
    with caplog.at_level("WARNING"):
        again = cache.get_or_encode(fingerprint(0), source)
    assert source.calls == 1
    assert "checksum" in caplog.text and str(path) in caplog.text
    torch.testing.assert_close(again.mean, original.mean, rtol=0, atol=0)


def test_the_caching_pass_repairs_a_flipped_byte_instead_of_reusing_it(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    # `longcat cache` and train's start-up pass run encode_many: damage must be repaired there,
    # not found when training first draws the clip (possibly hours in).
    jobs, _ = jobs_for(2)
    LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    path = LatentCache(tmp_path, vae).path_for(fingerprint(1))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    jobs, sources = jobs_for(2)
    summary = LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    assert (summary.encoded, summary.reused) == (0, 1)
    assert [issue.label for issue in summary.rebuilt] == ["clip1.mp4"] and "checksum" in summary.rebuilt[0].reason
    assert [source.calls for source in sources] == [0, 1]
    jobs, sources = jobs_for(2)
    assert LatentCache(tmp_path, vae).encode_many(jobs, progress=False).reused == 2


def test_entry_with_other_fingerprint_metadata_is_not_trusted(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    cache = LatentCache(tmp_path, vae)
    cache.get_or_encode(fingerprint(0), lambda: make_pixels(0))
    cache.get_or_encode(fingerprint(1), lambda: make_pixels(1))
    # A file copied over another entry's name: valid safetensors, wrong content.
    cache.path_for(fingerprint(1)).write_bytes(cache.path_for(fingerprint(0)).read_bytes())
    jobs, sources = jobs_for(2)
    summary = cache.encode_many(jobs, progress=False)
    assert len(summary.rebuilt) == 1 and "metadata" in summary.rebuilt[0].reason
    assert [source.calls for source in sources] == [0, 1]


def test_failing_items_are_reported_and_the_rest_proceed(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    def unreadable() -> torch.Tensor:
        raise OSError("moov atom not found")

    jobs: list[LatentJob] = [
        LatentJob(fingerprint(0), lambda: make_pixels(0), "clip", "good.mp4"),
        LatentJob(fingerprint(1), unreadable, "clip", "broken.mp4"),
        LatentJob(fingerprint(2), lambda: make_pixels(2)[:2], "clip", "two_channels.mp4"),
    ]
    summary = LatentCache(tmp_path, vae).encode_many(jobs, progress=False)
    assert summary.encoded == 1
    reasons = {issue.label: issue.reason for issue in summary.failed}
    assert reasons.keys() == {"broken.mp4", "two_channels.mp4"}
    assert "moov atom" in reasons["broken.mp4"] and "[3, F, H, W]" in reasons["two_channels.mp4"]
    console = Console(file=io.StringIO(), width=200)
    console.print(summary.issues_table())
    assert "broken.mp4" in console.file.getvalue() and "two_channels.mp4" in console.file.getvalue()


def test_read_only_cache_reads_entries_and_reports_misses(vae: AutoencoderKLWan, tmp_path: Path) -> None:
    writer = LatentCache(tmp_path, vae)
    written = writer.get_or_encode(fingerprint(0), lambda: make_pixels(0))
    reader = LatentCache(tmp_path, None, identity=writer.identity)
    never: Callable[[], torch.Tensor] = lambda: pytest.fail("a read-only cache cannot encode")  # noqa: E731
    read: CachedLatent = reader.get_or_encode(fingerprint(0), never)
    torch.testing.assert_close(read.std, written.std, rtol=0, atol=0)
    with pytest.raises(LatentCacheMiss, match="longcat cache"):
        reader.get_or_encode(fingerprint(5), never)
    with pytest.raises(ValueError, match="identity"):
        LatentCache(tmp_path, None)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (make_pixels(0, frames=8), "1 \\+ 4·k frames"),
        (make_pixels(0)[:, :, :20], "multiples of 8"),
        ((make_pixels(0) + 1) * 127.5, "scaled to \\[-1, 1\\]"),
    ],
)
def test_pixels_the_vae_would_mangle_are_refused(
    vae: AutoencoderKLWan, tmp_path: Path, pixels: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LatentCache(tmp_path, vae).get_or_encode(fingerprint(0), lambda: pixels)
    assert not LatentCache(tmp_path, vae).path_for(fingerprint(0)).exists()


def test_dtype_argument_runs_the_vae_in_that_dtype(tiny_model: Path, tmp_path: Path) -> None:
    vae = load_vae(tiny_model)
    cache = LatentCache(tmp_path, vae, dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16
    latent = cache.get_or_encode(fingerprint(0), lambda: make_pixels(0))
    assert latent.mean.dtype == torch.float32  # stored in float32 whatever the VAE ran in
    assert cache.identity != LatentCache(tmp_path, load_vae(tiny_model)).identity
