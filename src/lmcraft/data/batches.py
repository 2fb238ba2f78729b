"""Batch makers for pre-training: examples -> one batch, transformed by the objective (masks, permutations).

Randomness of the transforms: training batches draw from the global torch generator, whose state every checkpoint
saves (so a resumed run is bit-exact, and each rank draws its own masks); evaluation batches use a generator seeded
by (seed, index of the batch's first example), so every evaluation scores the same masks:

    generator seed = seed * 1_000_003 + first index
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcraft.objectives import Objective

__all__ = ["BatchMaker", "Indexed"]


class BatchMaker:
    """Items -> one batch for the objective: stacked windows or a list of sentence pairs, then `objective.transform`.

    With `seed` None the transform draws from the global torch generator (training). With a seed, items come as
    (index, item) (see `Indexed`) and the generator is seeded by (seed, first index).
    """

    def __init__(self, objective: Objective, pairs: bool, seed: int | None = None) -> None:
        self.objective, self.pairs, self.seed = objective, pairs, seed

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        import torch

        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(items[0][0]))
            items = [item for _, item in items]
        batch = {"pairs": items} if self.pairs else {"input_ids": torch.stack([it["input_ids"] for it in items])}
        return self.objective.transform(batch, generator)


class Indexed:
    """A map-style dataset whose items are `(index, item)` (for `BatchMaker` with a seed)."""

    def __init__(self, dataset: Sequence[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]
