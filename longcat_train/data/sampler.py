"""Seeded, resumable, rank-sharded batches that never mix buckets."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator, Mapping, Sequence

from torch.utils.data import Sampler

from longcat_train.data.buckets import Bucket
from longcat_train.data.decode import seeded_rng
from longcat_train.data.items import ClipItem


MAX_EMPTY_EPOCHS = 100  # epochs drawn in a row without a batch before `next_batch` gives up


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of indices into `items`; every list is one bucket.

    Each epoch is planned from (`seed`, epoch) alone: `probabilities` are relative dataset
    weights (the config's `probability`); items of a dataset are kept with chance
    weight / largest weight, so weights steer the mix by thinning, never by repeating
    (use `repeats` for that). Then each bucket is shuffled and cut into batches
    (a short remainder is dropped with `drop_last`), and the batches are shuffled. The plan is
    cut to a multiple of `num_replicas` and rank r takes batches r, r + n, ... so ranks never
    overlap and all see the same number of batches.

    `state_dict()` holds the epoch and how many batches this rank has yielded; loading it
    continues with exactly the next batch. Note that a DataLoader with workers pulls batches
    ahead of the training step; when that matters, checkpoint the epoch and the number of
    batches the loop actually consumed (same keys as `state_dict()`), not the sampler's counter.
    """

    def __init__(
        self,
        items: Sequence[ClipItem],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
        probabilities: Mapping[str, float] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must be in [0, {num_replicas})")
        self.buckets: list[Bucket] = [item.bucket for item in items]
        self.datasets: list[str] = [item.dataset_id for item in items]
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        weights = {dataset: float(w) for dataset, w in (probabilities or {}).items()}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"dataset probabilities must not be negative: {weights}")
        present = {d: weights.get(d, 1.0) for d in set(self.datasets)}
        heaviest = max(present.values(), default=1.0)
        if heaviest <= 0:
            raise ValueError(f"every dataset has probability 0, nothing to train on: {weights}")
        self.keep_chance = {d: w / heaviest for d, w in present.items()}
        self.epoch = 0
        self.position = 0  # batches this rank has yielded in `epoch`

    def _global_plan(self, epoch: int) -> list[list[int]]:
        rng = seeded_rng(self.seed, f"bucket-sampler-epoch-{epoch}")
        by_bucket: dict[Bucket, list[int]] = defaultdict(list)
        for index, (bucket, dataset) in enumerate(zip(self.buckets, self.datasets)):
            keep = self.keep_chance[dataset]
            if keep >= 1.0 or rng.random() < keep:
                by_bucket[bucket].append(index)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):  # sorted: dict order must not depend on item order quirks
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches[: len(batches) - len(batches) % self.num_replicas]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, in order."""
        return self._global_plan(epoch)[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def next_batch(self) -> list[int]:
        """This rank's next batch, moving on to the next epoch when one is used up. The position is
        what `state_dict` saves, so a resumed run continues with exactly the batch that was next."""
        batches = self.epoch_batches(self.epoch)
        epochs_moved = 0
        while self.position >= len(batches):
            epochs_moved += 1
            if epochs_moved > MAX_EMPTY_EPOCHS:  # e.g. a batch size above every bucket's count: never spin
                raise ValueError(f"no batch of {self.batch_size} in {MAX_EMPTY_EPOCHS} epochs in a row")
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.epoch_batches(self.epoch)
        self.position += 1
        return batches[self.position - 1]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (DistributedSampler-style)."""
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "batch_size", "num_replicas"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has {getattr(self, key)}; "
                    f"resume with the same {key} or start a fresh run"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
