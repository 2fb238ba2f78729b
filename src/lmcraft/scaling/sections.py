"""The sweep's own config sections (torch-free): sizes (a list, or a width x depth grid), fits, probe, report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmcraft.config import Section

__all__ = ["FitSection", "GridSection", "ProbeSection", "ReportSection", "SizeSpec"]


class SizeSpec(Section):
    """One model size: ModelConfig `overrides` on top of `model.overrides`, and TrainerConfig fields for its runs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    overrides: dict[str, Any] = {}
    trainer: dict[str, Any] = {}


class GridSection(Section):
    """Sizes width x depth: hidden_size = width, num_layers = depth, num_heads = num_kv_heads = width / head_dim,
    intermediate_size = mlp_ratio * width rounded up to a multiple of 8."""

    width: list[int] = Field(min_length=1)
    depth: list[int] = Field(min_length=1)
    head_dim: int = Field(32, ge=1)
    mlp_ratio: float = Field(8 / 3, gt=0)

    @model_validator(mode="after")
    def _divisible(self) -> GridSection:
        bad = [w for w in self.width if w % self.head_dim]
        if bad:
            raise ValueError(f"grid.width {bad} not divisible by grid.head_dim {self.head_dim}")
        return self

    def sizes(self) -> list[SizeSpec]:
        out = []
        for depth in self.depth:
            for width in self.width:
                heads = width // self.head_dim
                inter = 8 * math.ceil(self.mlp_ratio * width / 8)
                overrides = {"hidden_size": width, "num_layers": depth, "num_heads": heads, "num_kv_heads": heads,
                             "head_dim": self.head_dim, "intermediate_size": inter}
                out.append(SizeSpec(name=f"w{width}-d{depth}", overrides=overrides))
        return out


class FitSection(Section):
    """How the laws are fitted (see `lmcraft.scaling`)."""

    loss: Literal["linear", "huber"] = "linear"
    huber_delta: float = Field(1e-3, gt=0)
    bootstrap: Literal["residual", "pairs"] = "residual"
    n_boot: int = Field(1000, ge=50)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    embeddings: bool = Field(False, description="count embedding parameters in N")


class ProbeSection(Section):
    """Next-speaker cloze on the held-out documents (play scripts), scored by log-likelihood."""

    items: int = Field(400, ge=10)
    options: int = Field(4, ge=2)
    context_chars: int = Field(400, ge=50)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    reference: str | None = Field(None, description="a pretrained model (folder or asset) scored as a yardstick")
    reference_items: int = Field(100, ge=10, description="the reference scores this many of the items")


class ReportSection(Section):
    title: str = "Scaling sweep"
    publish_dir: Path | None = Field(None, description="also write NAME.md and NAME.png here (e.g. docs/results)")
    name: str = Field("scaling", pattern=r"^[A-Za-z0-9_.-]+$")
