"""Resumable loader: order is a function of (seed, epoch), positions resume, ranks partition the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcraft.errors import LmcraftError
from lmcraft.train.loader import ResumableLoader, epoch_order, eval_batches

DATA = list(range(23))


def _ids(batch: torch.Tensor) -> list[int]:
    return batch.tolist()


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    assert np.array_equal(epoch_order(23, 5, 1), epoch_order(23, 5, 1))
    assert not np.array_equal(epoch_order(23, 5, 1), epoch_order(23, 5, 2))
    assert not np.array_equal(epoch_order(23, 5, 1), epoch_order(23, 6, 1))
    assert sorted(epoch_order(23, 5, 1)) == DATA
    assert epoch_order(5, 0, 3, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_stream_rolls_over_epochs_and_resumes_exactly() -> None:
    loader = ResumableLoader(DATA, 4, seed=3)
    assert len(loader) == 5  # 23 // 4, the incomplete batch is dropped
    stream = [_ids(loader.next_batch()) for _ in range(12)]
    assert sorted(sum(stream[:5], [])) == sorted(epoch_order(23, 3, 0)[:20].tolist())
    assert loader.epoch == 2 and loader.batch_index == 2

    fresh = ResumableLoader(DATA, 4, seed=3)
    for _ in range(7):
        fresh.next_batch()
    resumed = ResumableLoader(DATA, 4, seed=3)
    resumed.load_state_dict(fresh.state_dict())
    assert [_ids(resumed.next_batch()) for _ in range(5)] == stream[7:12]


def test_resume_refuses_different_geometry() -> None:
    state = ResumableLoader(DATA, 4, seed=3).state_dict()
    with pytest.raises(LmcraftError, match="batch_size=4"):
        ResumableLoader(DATA, 2, seed=3).load_state_dict(state)
    with pytest.raises(LmcraftError, match="fewer than one global batch"):
        ResumableLoader(DATA[:3], 2, world_size=2)


def test_ranks_split_the_single_process_batch() -> None:
    single = ResumableLoader(DATA, 6, seed=1)
    ranks = [ResumableLoader(DATA, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == 3
    for _ in range(7):
        assert _ids(single.next_batch()) == _ids(ranks[0].next_batch()) + _ids(ranks[1].next_batch())


def test_eval_batches_cover_everything_once_with_equal_counts() -> None:
    for n in (23, 18):  # 18 = 12 + 6: rank 2's slice of the second global batch is empty
        per_rank = [list(eval_batches(DATA[:n], 4, rank=r, world_size=3)) for r in range(3)]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 2
        counted = sorted(i for batches in per_rank for b, counts in batches if counts for i in _ids(b))
        assert counted == DATA[:n]
    assert [counts for _, counts in per_rank[2]] == [True, False]
    assert len(list(eval_batches(DATA, 4, max_batches=2))) == 2
