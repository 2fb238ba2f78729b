"""Resumable, data-parallel batching of a map-style dataset (`len(ds)`, `ds[i]`).

Order: epoch `e` visits `permutation(seed, e)` of the indices `0..n-1` (numpy PCG64 seeded by
`SeedSequence([seed, e])`; the identity when `shuffle=False`), so the order is a pure function of
(seed, epoch) and resuming at (epoch, batch_index) replays exactly the batches an uninterrupted
run would have seen.

Data parallelism: the epoch's order is cut into global batches of `W * B` indices (W ranks, B the
per-rank micro-batch size); rank `r` takes slice `[r*B, (r+1)*B)` of each. One process with
`B' = W * B` therefore sees exactly the union of what W ranks see, so the global batch does not
depend on W. Training drops the incomplete last global batch of each epoch; evaluation
(`eval_batches`) covers every example once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import default_collate

from lmcraft.errors import LmcraftError

__all__ = ["ResumableLoader", "epoch_order", "eval_batches"]

Collate = Callable[[list[Any]], Any]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of epoch `epoch`: a permutation of `range(n)` fixed by (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)


class ResumableLoader:
    """Endless stream of training micro-batches with a saveable position (epoch, batch_index).

    `next_batch()` returns the batch at the current position and advances it, rolling over into
    the next epoch; `len(loader)` is the number of micro-batches per epoch on each rank.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        batch_size: int,
        collate_fn: Collate | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn or default_collate
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch = 0
        self.batch_index = 0
        self._order: tuple[int, np.ndarray] | None = None
        if len(self) == 0:
            raise LmcraftError(
                f"the training set has {len(dataset)} examples, fewer than one global batch "
                f"(micro_batch_size {batch_size} x {world_size} ranks); use a smaller batch or more data"
            )

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def indices(self, epoch: int, batch_index: int) -> np.ndarray:
        """Dataset indices of this rank's micro-batch `batch_index` in epoch `epoch`."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), self.seed, epoch, self.shuffle))
        start = (batch_index * self.world_size + self.rank) * self.batch_size
        return self._order[1][start : start + self.batch_size]

    def next_batch(self) -> Any:
        if self.batch_index >= len(self):
            self.epoch, self.batch_index = self.epoch + 1, 0
        batch = self.collate_fn([self.dataset[int(i)] for i in self.indices(self.epoch, self.batch_index)])
        self.batch_index += 1
        return batch

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed, "shuffle": self.shuffle,
            "num_examples": len(self.dataset), "batch_size": self.batch_size, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the data geometry must match the one the state was saved with."""
        for key in ("seed", "shuffle", "num_examples", "batch_size", "world_size"):
            mine = len(self.dataset) if key == "num_examples" else getattr(self, key)
            if state[key] != mine:
                raise LmcraftError(
                    f"cannot resume the data position exactly: the checkpoint was made with {key}={state[key]!r} "
                    f"but this run has {key}={mine!r}; resume with the same data and batch settings"
                )
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


def eval_batches(
    dataset: Sequence[Any],
    batch_size: int,
    collate_fn: Collate | None = None,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[Any, bool]]:
    """Yield `(batch, counts)` covering every example once across ranks, in dataset order.

    Every rank yields the same number of batches (sharded models need all ranks in each forward);
    a rank whose slice of the last global batch is empty re-reads the first example of that batch
    with `counts=False`, and its result must be ignored. `max_batches` caps the global batches.
    """
    collate = collate_fn or default_collate
    n, step = len(dataset), batch_size * world_size
    num_global = -(-n // step)
    if max_batches is not None:
        num_global = min(num_global, max_batches)
    for g in range(num_global):
        lo = g * step + rank * batch_size
        idx = list(range(lo, min(lo + batch_size, n)))
        yield (collate([dataset[i] for i in idx]), True) if idx else (collate([dataset[g * step]]), False)
