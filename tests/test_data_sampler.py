"""BucketBatchSampler: bucket purity, determinism, exact resume, rank sharding (the same stream for any
number of processes × accumulated batches), probabilities."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from longcat_train.data.buckets import Bucket, Placement
from longcat_train.data.items import ClipItem, FileStamp
from longcat_train.data.sampler import BucketBatchSampler

_BUCKETS = [Bucket(32, 48, 9), Bucket(48, 32, 9), Bucket(32, 32, 5)]


def _items(count: int = 60, dataset: str = "d") -> list[ClipItem]:
    items = []
    for n in range(count):
        bucket = _BUCKETS[n % 3 if n < 45 else 0]  # uneven bucket sizes
        items.append(
            ClipItem(
                dataset_id=dataset, source=FileStamp(Path(f"/data/{dataset}{n}.mp4"), 1, 1, ""), caption="",
                bucket=bucket, frame_indices=tuple(range(bucket.num_frames)), fps=15.0, window_index=0,
                source_size=(bucket.height, bucket.width),
                placement=Placement((bucket.height, bucket.width), (0, 0, bucket.height, bucket.width)),
            )
        )
    return items


def test_batches_never_mix_buckets_and_cover_each_item_once() -> None:
    items = _items()
    batches = list(BucketBatchSampler(items, batch_size=4, seed=1))
    assert all(len({items[i].bucket for i in batch}) == 1 for batch in batches)
    assert all(len(batch) == 4 for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    # buckets of 30, 15 and 15 items: drop_last loses 2 + 3 + 3
    assert len(flat) == 60 - 8


def test_keep_partial_batches_without_drop_last() -> None:
    batches = list(BucketBatchSampler(_items(), batch_size=4, seed=1, drop_last=False))
    assert sorted(i for b in batches for i in b) == list(range(60))


def test_same_seed_same_order_new_epoch_new_order() -> None:
    a = BucketBatchSampler(_items(), batch_size=4, seed=5)
    b = BucketBatchSampler(_items(), batch_size=4, seed=5)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) != first_a  # epoch 1 reshuffles
    assert list(BucketBatchSampler(_items(), batch_size=4, seed=6)) != first_a


def test_resume_mid_epoch_continues_with_the_next_batch() -> None:
    uninterrupted = BucketBatchSampler(_items(), batch_size=4, seed=9)
    reference = list(uninterrupted) + list(uninterrupted)  # two epochs

    run = BucketBatchSampler(_items(), batch_size=4, seed=9)
    consumed = list(itertools.islice(iter(run), 5))
    state = run.state_dict()
    assert state["epoch"] == 0 and state["next_batch"] == 5

    resumed = BucketBatchSampler(_items(), batch_size=4, seed=9)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert consumed + rest == reference  # nothing repeated, nothing skipped
    assert resumed.state_dict()["epoch"] == 2


def test_resume_rejects_a_different_batch_size() -> None:
    state = BucketBatchSampler(_items(), batch_size=4, seed=9).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(_items(), batch_size=2, seed=9).load_state_dict(state)


def test_ranks_take_the_single_process_stream_in_rounds_across_epochs() -> None:
    """Rank r of N takes the stream's batches r, r + N, ...; the stream runs on into the next epoch
    (epoch 0 has 29 batches of 2: the tenth round of 3 ends in epoch 1), and each batch's seed is its
    place in the stream, whoever takes it."""
    items = _items()
    single = BucketBatchSampler(items, batch_size=2, seed=3)
    assert len(single.epoch_plan(0)) == 29
    stream = [single.next_batch() for _ in range(3 * 12)]
    ranks = [BucketBatchSampler(items, batch_size=2, seed=3, num_replicas=3, rank=r) for r in range(3)]
    rounds = [[rank.next_batch() for rank in ranks] for _ in range(12)]
    assert [batch for round_ in rounds for batch in round_] == stream
    first_epoch = [i for batch in stream[:29] for i in batch.indices]
    assert len(first_epoch) == len(set(first_epoch))  # an epoch never repeats an item
    assert len({batch.seed for batch in stream}) == len(stream)
    assert all(r.state_dict()["epoch"] == 1 and r.state_dict()["next_batch"] == 7 for r in ranks)


def test_a_state_resumes_on_another_rank_count_with_the_same_batches_per_step() -> None:
    """2 processes × accumulation 1 saved after 3 rounds; 1 process × 2 goes on with batch 6."""
    items = _items()
    reference = BucketBatchSampler(items, batch_size=2, seed=3)
    stream = [reference.next_batch() for _ in range(10)]
    pair = [BucketBatchSampler(items, batch_size=2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for _ in range(3):
        for rank in pair:
            rank.next_batch()
    single = BucketBatchSampler(items, batch_size=2, seed=3, accumulation=2)
    single.load_state_dict(pair[0].state_dict())
    assert [single.next_batch() for _ in range(4)] == stream[6:10]
    with pytest.raises(ValueError, match=r"2 batches per optimizer step \(2 processes × gradient_accumulation_steps 1\)"
                                         r".*this run takes 1 \(1 × 1\).*product with gradient_accumulation_steps is 2"):
        BucketBatchSampler(items, batch_size=2, seed=3).load_state_dict(pair[0].state_dict())


def test_a_state_from_before_the_stream_resumes_at_the_same_batch() -> None:
    """Such states counted a rank's own batches (`position`): 2 ranks × 3 batches = stream batch 6."""
    items = _items()
    reference = BucketBatchSampler(items, batch_size=2, seed=3)
    stream = [reference.next_batch() for _ in range(8)]
    resumed = BucketBatchSampler(items, batch_size=2, seed=3, num_replicas=2, rank=1)
    resumed.load_state_dict({"epoch": 0, "position": 3, "seed": 3, "batch_size": 2, "num_replicas": 2})
    assert resumed.next_batch() == stream[7]
    with pytest.raises(ValueError, match="batches per optimizer step"):
        BucketBatchSampler(items, batch_size=2, seed=3).load_state_dict(
            {"epoch": 0, "position": 3, "seed": 3, "batch_size": 2, "num_replicas": 2})


def test_dataset_probability_thins_a_dataset() -> None:
    items = _items(60, "common") + _items(60, "rare")
    sampler = BucketBatchSampler(items, batch_size=1, seed=0, probabilities={"rare": 0.25})
    counts = {"common": 0, "rare": 0}
    for _ in range(4):
        for batch in sampler:
            counts[items[batch[0]].dataset_id] += 1
    assert counts["common"] == 240
    assert 30 < counts["rare"] < 90  # about 60 of 240


def test_probabilities_are_relative_weights() -> None:
    items = _items(60, "heavy") + _items(60, "light")
    sampler = BucketBatchSampler(items, batch_size=1, seed=0, probabilities={"heavy": 4.0, "light": 1.0})
    counts = {"heavy": 0, "light": 0}
    for _ in range(4):
        for batch in sampler:
            counts[items[batch[0]].dataset_id] += 1
    assert counts["heavy"] == 240 and 30 < counts["light"] < 90
    with pytest.raises(ValueError, match="probability 0"):
        BucketBatchSampler(items, batch_size=1, seed=0, probabilities={"heavy": 0, "light": 0})


def test_len_matches_iteration() -> None:
    sampler = BucketBatchSampler(_items(), batch_size=4, seed=2, num_replicas=2, rank=1)
    assert len(sampler) == len(list(sampler))


def test_next_batch_walks_the_epochs_as_iteration_does_and_resumes_from_state() -> None:
    reference = BucketBatchSampler(_items(), batch_size=4, seed=3)
    expected = list(reference) + list(reference)
    run = BucketBatchSampler(_items(), batch_size=4, seed=3)
    taken = [run.next_batch().indices for _ in range(7)]
    resumed = BucketBatchSampler(_items(), batch_size=4, seed=3)
    resumed.load_state_dict(run.state_dict())
    taken += [resumed.next_batch().indices for _ in range(len(expected) - 7)]
    assert taken == expected


def test_next_batch_refuses_to_spin_when_no_batch_can_be_formed() -> None:
    sampler = BucketBatchSampler(_items(), batch_size=10_000, seed=3)
    with pytest.raises(ValueError, match="no batch of 10000"):
        sampler.next_batch()
