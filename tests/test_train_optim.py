"""Optimizer groups (decay split, LLRD, head LR) and LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmcraft.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["names"]}


def test_decay_split_and_frozen_params() -> None:
    net = Net()
    net.layers[0].weight.requires_grad_(False)
    groups = _by_name(param_groups(net, weight_decay=0.1, lr=1e-3))
    assert "layers.0.weight" not in groups
    assert groups["layers.1.weight"]["weight_decay"] == 0.1 and groups["head.weight"]["weight_decay"] == 0.1
    for name in ("emb.weight", "layers.1.bias", "norm.weight", "norm.bias", "head.bias"):
        assert groups[name]["weight_decay"] == 0.0, name
    decayed = _by_name(param_groups(net, lr=1e-3, weight_decay=0.1, decay_embeddings=True))
    assert decayed["emb.weight"]["weight_decay"] == 0.1
    assert "layers.0.weight" in _by_name(param_groups(net, lr=1e-3, weight_decay=0.1, trainable_only=False))


def test_layerwise_lr_decay_and_head_lr() -> None:
    def layer_of(name: str) -> int | None:
        if name.startswith("emb."):
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        return None

    groups = _by_name(param_groups(Net(), lr=1.0, weight_decay=0.0, layer_lr_decay=0.5, layer_of=layer_of, head_lr=7.0,
                                   is_head=lambda n: n.startswith("head.")))
    assert groups["emb.weight"]["lr"] == 0.5**3
    assert [groups[f"layers.{i}.weight"]["lr"] for i in range(3)] == [0.25, 0.5, 1.0]
    assert groups["norm.weight"]["lr"] == 1.0 and groups["head.weight"]["lr"] == 7.0
    with pytest.raises(ValueError, match="layer_of"):
        param_groups(Net(), lr=1.0, weight_decay=0.0, layer_lr_decay=0.5)


def test_optimizer_needs_trainable_params() -> None:
    net = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(param_groups(net, lr=1e-3, weight_decay=0.0), 1e-3, (0.9, 0.999), 1e-8)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_up_to_the_peak(schedule: str) -> None:
    assert [lr_multiplier(schedule, s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(schedule, 4, 4, 100) == 1.0


def test_schedule_shapes() -> None:
    m = 0.1
    assert lr_multiplier("cosine", 10, 0, 10, m) == pytest.approx(m)
    assert lr_multiplier("cosine", 5, 0, 10, m) == pytest.approx(m + (1 - m) / 2)
    assert lr_multiplier("linear", 5, 0, 10, m) == pytest.approx(1 - (1 - m) / 2)
    assert lr_multiplier("constant", 9, 0, 10, m) == 1.0
    wsd = [lr_multiplier("wsd", s, 0, 10, m, decay_fraction=0.2) for s in range(11)]
    assert wsd[:8] == [1.0] * 8 and wsd[9] == pytest.approx((1 + m) / 2) and wsd[10] == pytest.approx(m)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("step", 0, 0, 10)


def test_scheduler_scales_each_group() -> None:
    net = Net()
    groups = param_groups(net, lr=2.0, weight_decay=0.1)
    opt = build_optimizer(groups, 2.0, (0.9, 0.999), 1e-8)
    sched = build_scheduler(opt, "cosine", 0, 4, min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert torch.isfinite(next(net.parameters())).all()
