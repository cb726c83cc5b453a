"""`longcat cache` / training preparation: sharded encoding, reuse, and bad clips skipped."""

from longcat_train.config import load_config
from longcat_train.demo.synthetic import write_demo
from longcat_train.training.prepare import Shard, prepare_data


def _latent_files(root):
    return sorted((root / "cache" / "vae").rglob("*.safetensors"))


def test_two_shards_split_the_work_and_a_rerun_encodes_nothing(tmp_path):
    config = write_demo(tmp_path, steps=4)
    (tmp_path / "data" / "train" / "clips" / "clip_999.mp4").write_bytes(b"not a video")
    loaded = load_config(config)
    prepare_data(loaded, shard=Shard(0, 2))
    half = _latent_files(tmp_path)
    assert 0 < len(half) < 14  # 6 train + 1 eval clips, each with a start frame
    data = prepare_data(loaded, shard=Shard(1, 2))
    full = _latent_files(tmp_path)
    assert len(full) == 14 and set(half) < set(full)
    assert len(data.items) == 6 and len(data.eval_items) == 1
    assert any("clip_999" in str(s.path) for s in data.scans["clips"].skipped)
    stamps = {p: p.stat().st_mtime_ns for p in full}
    again = prepare_data(loaded)
    assert {p: p.stat().st_mtime_ns for p in _latent_files(tmp_path)} == stamps
    assert again.clip_latent(again.items[0]).mean.shape[0] == 16
    assert "" in again.text_features
