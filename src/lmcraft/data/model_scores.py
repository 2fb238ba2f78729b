"""Model-based quality and safety steps of the prepare pipeline ("annotate" steps): scores from lmcraft models.

`perplexity` (CCNet, Wenzek et al. 2020, who score with a KenLM model trained on a high-quality reference such as
Wikipedia): a causal LM scores a document d = (t_1 .. t_n) (its first `max_tokens` tokens, after the tokenizer's
start token t_0 = BOS, else EOS) by

    ppl(d) = exp( -1/n * sum_{i=1..n} log p(t_i | t_0 .. t_{i-1}) )

(the log-probabilities by `objectives.lm_head.sequence_logprobs`, in the one batched no-grad loop
`scored_batches`). Low perplexity means "like the reference corpus". A document outside [`min`, `max`] is removed
(`perplexity:too_low` / `too_high`); with `head`/`tail` thresholds each document also gets CCNet's bucket:
ppl < head -> "head", ppl >= tail -> "tail", else "middle". Metadata: `perplexity`, `perplexity_bucket`.

`classifier` / `toxicity`: a sequence-classification model (a Hugging Face folder with an `id2label` table, e.g.
`lmcraft finetune` output) gives p(label | d) = softmax(logits)[label] on the first `max_tokens` tokens. One
mechanism, two configurations: `classifier` (quality; default label the last one, removes documents *below*
`threshold`, metadata key `quality`) and `toxicity` (safety; default label `toxic`, removes documents *at or above*
`threshold`, metadata key `toxicity`). Reasons: `<step>:below_threshold` / `<step>:above_threshold`.

Models are loaded on first use in each worker process (not pickled to the workers), so once per worker. Every
score goes into the step's histogram (bins cut at `edges`) in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lmcraft.data.annotation import Annotation, share_edges

__all__ = ["Classifier", "Perplexity", "Toxicity"]

_CONFIG = {"extra": "forbid"}


@dataclass
class _ModelStep:
    """Shared by the model steps: the model options (`model`: a folder or an asset name; the first `max_tokens`
    tokens of a document are scored, `batch_size` documents a batch, on `device`, in `dtype` or the model's own),
    lazy loading (per process) and batching of token rows."""

    model: str
    max_tokens: int = 512
    batch_size: int = 8
    device: str = "cpu"
    dtype: str | None = None
    _head: ClassVar[str]
    uses_torch: ClassVar[bool] = True  # worker processes are spawned, not forked (see data.executors)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lm", "_tok")}

    def _load(self) -> tuple[Any, Any]:
        if getattr(self, "_lm", None) is None:
            from lmcraft.assets import resolve_model
            from lmcraft.hub import load_model
            from lmcraft.tokenizer.load import load_tokenizer

            folder = resolve_model(self.model)
            self._folder = folder
            self._lm = load_model(folder, head=self._head, dtype=self.dtype, device=self.device).eval()
            self._tok = load_tokenizer(folder)
        return self._lm, self._tok

    def _scores(self, rows: list[list[int]], score: Any) -> list[float]:
        """`score(ids, mask)` per batch of rows padded on the right, back in the rows' order."""
        from lmcraft.data.collate import pad_with_mask
        from lmcraft.objectives.lm_head import scored_batches

        lm, tok = self._load()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
        device = next(lm.parameters()).device

        def batch(sl: slice) -> list[float]:
            ids, mask = pad_with_mask([rows[i] for i in order[sl]], pad)
            return score(ids.to(device), mask.to(device)).tolist()

        flat = [s for part in scored_batches(lm, len(rows), self.batch_size, batch) for s in part]
        out = [0.0] * len(rows)
        for i, s in zip(order, flat, strict=True):
            out[i] = float(s)
        return out


def _default_ppl_edges() -> list[float]:
    return [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0]


@dataclass
class Perplexity(_ModelStep):
    """Keep documents whose perplexity under a causal LM is within [`min`, `max`]; bucket by `head`/`tail`."""

    name: ClassVar[str] = "perplexity"
    kind: ClassVar[str] = "annotate"
    _head: ClassVar[str] = "lm"
    min: float | None = None
    max: float | None = None
    head: float | None = None
    tail: float | None = None
    edges: list[float] = field(default_factory=_default_ppl_edges)
    __pydantic_config__ = _CONFIG

    def __post_init__(self) -> None:
        if (self.head is None) != (self.tail is None) or (self.head is not None and self.head > self.tail):
            raise ValueError("give both head and tail thresholds, head <= tail (perplexities)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")

    def perplexities(self, texts: list[str]) -> list[float]:
        """ppl of each text (see the module docstring); an empty text (no token to predict) gets nan."""
        from lmcraft.data.collate import IGNORE_INDEX
        from lmcraft.objectives.lm_head import sequence_logprobs

        lm, tok = self._load()
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        start_ids = [] if start is None else [start]
        rows = [start_ids + tok.encode(t, add_special_tokens=False)[: self.max_tokens] for t in texts]

        def score(ids: Any, mask: Any) -> Any:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            total, count = sequence_logprobs(lm(ids, attention_mask=mask).logits, labels)
            return (-total / count.clamp_min(1)).exp().masked_fill(count == 0, math.nan)

        return self._scores(rows, score)

    def annotate(self, texts: list[str]) -> list[Annotation]:
        out = []
        for ppl in self.perplexities(texts):
            if math.isnan(ppl):
                out.append(Annotation("no_tokens"))
                continue
            meta: dict[str, Any] = {"perplexity": round(ppl, 4)}
            if self.head is not None:
                meta["perplexity_bucket"] = "head" if ppl < self.head else "tail" if ppl >= self.tail else "middle"
            reason = None
            if self.min is not None and ppl < self.min:
                reason = "too_low"
            elif self.max is not None and ppl > self.max:
                reason = "too_high"
            out.append(Annotation(reason, meta, ppl))
        return out


@dataclass
class Classifier(_ModelStep):
    """Score p(`label`) with a sequence classifier; remove documents `below` (or `above`) `threshold`."""

    name: ClassVar[str] = "classifier"
    kind: ClassVar[str] = "annotate"
    _head: ClassVar[str] = "cls"
    label: str | None = None  # a name of the model's id2label, or its index; default: the last label
    threshold: float = 0.5
    remove: Literal["below", "above"] = "below"
    key: str = "quality"
    edges: list[float] = field(default_factory=share_edges)
    __pydantic_config__ = _CONFIG

    def label_index(self) -> int:
        """The index of `label` in the model's config.json id2label (a name or a number)."""
        from lmcraft.errors import ConfigError
        from lmcraft.io import read_json

        self._load()
        table = read_json(self._folder / "config.json", "model config").get("id2label") or {}
        names = [table[k] for k in sorted(table, key=int)]
        if self.label is None:
            return len(names) - 1
        if self.label in names:
            return names.index(self.label)
        if self.label.isdigit() and int(self.label) < len(names):
            return int(self.label)
        raise ConfigError(f"{self.name} step: label {self.label!r} is not a label of {self.model} ({names})")

    def probabilities(self, texts: list[str]) -> list[float]:
        """p(label | text) for each text."""
        lm, tok = self._load()
        index = self.label_index()
        rows = [tok.encode(t)[: self.max_tokens] or [tok.pad_token_id or 0] for t in texts]
        return self._scores(rows, lambda ids, mask: lm(ids, attention_mask=mask).logits.float().softmax(-1)[:, index])

    def annotate(self, texts: list[str]) -> list[Annotation]:
        out = []
        for p in self.probabilities(texts):
            removed = p < self.threshold if self.remove == "below" else p >= self.threshold
            reason = f"{self.remove}_threshold" if removed else None
            out.append(Annotation(reason, {self.key: round(p, 6)}, p))
        return out


@dataclass
class Toxicity(Classifier):
    """The classifier step configured for safety: remove documents with p(`toxic`) >= `threshold`."""

    name: ClassVar[str] = "toxicity"
    label: str | None = "toxic"
    threshold: float = 0.5
    remove: Literal["below", "above"] = "above"
    key: str = "toxicity"
    __pydantic_config__ = _CONFIG
