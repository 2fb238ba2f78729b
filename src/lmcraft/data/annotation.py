"""What an "annotate" step of the prepare pipeline says about one document (see `lmcraft.data.pipeline`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Annotation", "share_edges"]


@dataclass
class Annotation:
    """Remove the document (`reason`), or keep it with `meta` added to its metadata; `score` goes into the step's
    histogram, the `tally` names are counted in the report (e.g. the eval items a document overlaps)."""

    reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    tally: tuple[str, ...] = ()


def share_edges() -> list[float]:
    """Histogram edges 0.1, 0.2, ..., 0.9: the default bins of an annotate step whose score is a share or a
    probability."""
    return [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
