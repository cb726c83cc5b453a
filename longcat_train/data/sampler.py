"""Seeded, resumable, rank-sharded batches that never mix buckets."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from torch.utils.data import Sampler

from longcat_train.data.buckets import Bucket
from longcat_train.data.decode import seeded_rng
from longcat_train.data.items import ClipItem


MAX_EMPTY_EPOCHS = 100  # epochs drawn in a row without a batch before `next_batch` gives up


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


class PlannedBatch(NamedTuple):
    """One batch of the stream: indices into the items, and the seed of every random draw made for
    it (a function of its place in the stream, so the same for any number of processes)."""

    indices: list[int]
    seed: int


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of indices into `items`; every list is one bucket.

    Each epoch is planned from (`seed`, epoch) alone: `probabilities` are relative dataset
    weights (the config's `probability`); items of a dataset are kept with chance
    weight / largest weight, so weights steer the mix by thinning, never by repeating
    (use `repeats` for that). Then each bucket is shuffled and cut into batches
    (a short remainder is dropped with `drop_last`), and the batches are shuffled.

    The epochs' plans follow one another as one stream of batches, read in rounds: in each round
    rank r of `num_replicas` takes the batch at the round's start + r, and the next round starts
    `num_replicas` batches later. So an optimizer step of N processes × A accumulated batches takes
    N·A consecutive batches of the stream whatever N and A are (2 processes × 1 and 1 process × 2
    train on the same samples), ranks never overlap, and a round may run on into the next epoch
    rather than drop batches.

    `state_dict()` holds the epoch and where in its plan the next round starts (`next_batch`), which
    means the same for any number of ranks; `batches_per_step` (N·A, given by the caller) must match
    on resume, as it decides which batches one optimizer step averages. Note that a DataLoader with
    workers pulls batches ahead of the training step; when that matters, checkpoint the epoch and
    the position the loop actually consumed (same keys as `state_dict()`), not the sampler's.
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
        accumulation: int = 1,
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
        self.batches_per_step = num_replicas * accumulation
        weights = {dataset: float(w) for dataset, w in (probabilities or {}).items()}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"dataset probabilities must not be negative: {weights}")
        present = {d: weights.get(d, 1.0) for d in set(self.datasets)}
        heaviest = max(present.values(), default=1.0)
        if heaviest <= 0:
            raise ValueError(f"every dataset has probability 0, nothing to train on: {weights}")
        self.keep_chance = {d: w / heaviest for d, w in present.items()}
        self.epoch = 0
        self.position = 0  # where in `epoch`'s plan the next round starts
        self._plans: dict[int, list[list[int]]] = {}  # the last two epochs' plans (a round can span them)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of `epoch`, in stream order."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = self._plan(epoch)
        return self._plans[epoch]

    def _plan(self, epoch: int) -> list[list[int]]:
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
        return batches

    def _locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(epoch, position) moved on past the ends of epochs until it names a batch."""
        empty_in_row = 0
        while position >= len(plan := self.epoch_plan(epoch)):
            empty_in_row = empty_in_row + 1 if not plan else 0
            if empty_in_row > MAX_EMPTY_EPOCHS:  # e.g. a batch size above every bucket's count: never spin
                raise ValueError(f"no batch of {self.batch_size} in {MAX_EMPTY_EPOCHS} epochs in a row")
            epoch, position = epoch + 1, position - len(plan)
        return epoch, position

    def next_batch(self) -> PlannedBatch:
        """This rank's batch of the next round, running on into the next epochs when one is used up.
        The position is what `state_dict` saves, so a resumed run continues with exactly the round
        that was next."""
        epoch, position = self._locate(self.epoch, self.position + self.rank)
        digest = hashlib.sha256(f"{self.seed}:batch-{epoch}-{position}".encode()).digest()
        batch = PlannedBatch(self.epoch_plan(epoch)[position], int.from_bytes(digest[:8], "big") >> 1)
        self.epoch, self.position = self._locate(self.epoch, self.position + self.num_replicas)
        return batch

    def __len__(self) -> int:
        """Rounds that start in the current epoch from here (this rank takes one batch in each)."""
        remaining = len(self.epoch_plan(self.epoch)) - self.position
        return max(0, -(-remaining // self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the rounds that start in the current epoch; then the next epoch."""
        epoch = self.epoch
        for _ in range(len(self)):
            yield self.next_batch().indices
        if self.epoch == epoch:  # the last round ended exactly at the end, or the epoch was empty
            self.epoch, self.position = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (DistributedSampler-style)."""
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_batch": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "batches_per_step": self.batches_per_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "batch_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has {getattr(self, key)}; "
                    f"resume with the same {key} or start a fresh run"
                )
        saved_replicas = int(state.get("num_replicas", 1))
        # states from before the stream hold no `batches_per_step`: their rank count must match
        saved_step = int(state.get("batches_per_step", saved_replicas * self.batches_per_step // self.num_replicas))
        if saved_step != self.batches_per_step:
            raise ValueError(
                f"it was trained with {saved_step} batches per optimizer step ({_processes(saved_replicas)} × "
                f"gradient_accumulation_steps {saved_step // saved_replicas}), this run takes "
                f"{self.batches_per_step} ({self.num_replicas} × {self.batches_per_step // self.num_replicas}), "
                "so its steps would average other samples. Resume on any number of processes whose product "
                f"with gradient_accumulation_steps is {saved_step} (processes that share each sample's tokens, "
                "distributed_strategy ulysses, count as one), or start a fresh run"
            )
        self.epoch = int(state["epoch"])
        # before the stream, `position` counted this rank's batches of an epoch shared round-robin
        self.position = int(state["next_batch"]) if "next_batch" in state else int(state["position"]) * saved_replicas
