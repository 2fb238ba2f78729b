"""Request batching: one worker takes every waiting request (up to `max_batch` rows) and decodes them together.

Rows in one batch share the sampling settings (temperature, top_p, seed), so waiting requests are grouped by them
(a seeded sampling request decodes alone, so that its answer is reproducible);
each row keeps its own `max_tokens` and stop strings: the batch decodes with `lmcraft.generate.Generation` (the one
decoding loop) up to the largest `max_tokens`, and a per-row `TextTracker` cuts each row at its own limit and stop
string. Decoding stops as soon as every row is done. Greedy rows are independent of their batch mates, so a row's
text equals `generate_text` on that prompt alone.

`compile` (`--compile auto|true|false`) is `GenerationConfig.compile` for every batch: a torch model decodes on the
static cache, whose step `torch.compile` compiles once per (rows, cache bucket) shape; auto compiles a batch only
when its tokens amortise the expected compile time (the rule of `generate/static.py`), so short requests stay
eager. Models the static path does not cover (adapters, short sliding windows) and llama.cpp decode as before.
`stats["paths"]` counts the batches decoded per path ("dynamic", "static", "static+compiled", "llamacpp").
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from lmcraft.generate import Generation, GenerationConfig, TextTracker


@dataclasses.dataclass
class Job:
    """One request: `rows` prompts (n choices per prompt already expanded) and where its events go.

    Events on `events`: ("delta", row, text), ("done", row, finish_reason, completion_tokens), ("end",) or
    ("error", message).
    """

    rows: list[list[int]]
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    @property
    def sampling_key(self) -> tuple[float, float, int | None, int | None]:
        """Jobs with equal keys may share a batch. A seeded sampling job decodes alone: its random draws (one
        generator per batch) must not depend on which other requests happened to arrive with it."""
        alone = id(self) if self.seed is not None and self.temperature > 0 else None
        return (self.temperature, self.top_p, self.seed, alone)

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    """The request queue holds `max_queue` requests already."""


class Batcher:
    """Bounded request queue plus the worker task that decodes batches in a thread (the event loop stays free)."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: Sequence[int], max_queue: int, max_batch: int,
                 compile: bool | str = "auto") -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, list(eos_ids)
        self.max_batch, self.compile = max_batch, compile
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.stats: dict[str, Any] = {"batches": 0, "rows": 0, "largest_batch": 0, "paths": {}}
        self._held: Job | None = None

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None

    async def work(self) -> None:
        """Forever: wait for a request, take every other waiting one (up to `max_batch` rows), decode by group."""
        while True:
            jobs = [self._held or await self.queue.get()]
            self._held = None
            rows = len(jobs[0].rows)
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if rows + len(job.rows) > self.max_batch:
                    self._held = job  # first in the next batch
                    break
                jobs.append(job)
                rows += len(job.rows)
            groups: dict[tuple[float, float, int | None, int | None], list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.sampling_key, []).append(job)
            for group in groups.values():
                try:
                    await asyncio.to_thread(self._decode, group)
                except Exception as err:  # a failed batch answers its requests, the server lives on
                    for job in group:
                        job.emit("error", f"{type(err).__name__}: {err}")

    def _decode(self, jobs: list[Job]) -> None:
        """Decode `jobs` as one batch; emit text deltas and each row's end as they happen."""
        first = jobs[0]
        owners = [(job, r) for job in jobs for r in range(len(job.rows))]
        prompts = [job.rows[r] for job, r in owners]
        greedy = first.temperature == 0
        config = GenerationConfig(
            max_new_tokens=max(job.max_tokens for job in jobs), do_sample=not greedy,
            temperature=1.0 if greedy else first.temperature, top_p=first.top_p, seed=first.seed,
            eos_token_ids=self.eos_ids, pad_token_id=getattr(self.tokenizer, "pad_token_id", None),
            compile=self.compile, weights_fixed=True,
        )
        self.stats["batches"] += 1
        self.stats["rows"] += len(prompts)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(prompts))
        trackers = [TextTracker(self.tokenizer, job.stop, row) for row, (job, _) in zip(prompts, owners, strict=True)]
        counts = [0] * len(owners)
        done = [False] * len(owners)
        run = Generation(self.model, prompts, config, tokenizer=self.tokenizer)

        def finish(i: int, reason: str) -> None:
            job, r = owners[i]
            rest = trackers[i].finish()
            if rest:
                job.emit("delta", r, rest)
            job.emit("done", r, reason, counts[i])
            done[i] = True

        steps = iter(run)
        try:
            self._follow(steps, owners, trackers, counts, done, finish)
        finally:
            steps.close()  # leaves fast decoding and restores the model's mode when we stop early
            paths = self.stats["paths"]
            paths[run.path] = paths.get(run.path, 0) + 1
        for i in range(len(owners)):
            if not done[i]:
                finish(i, "length")
        for job in jobs:
            job.emit("end")

    def _follow(self, steps: Any, owners: list[tuple[Job, int]], trackers: list[TextTracker], counts: list[int],
                done: list[bool], finish: Any) -> None:
        """Feed each step's tokens to the rows' trackers until every row has ended (EOS, stop string, max_tokens)."""
        for entries in steps:
            for i, token in enumerate(entries):
                if done[i]:
                    continue
                job, r = owners[i]
                if token is None or token in self.eos_ids:
                    counts[i] += token is not None
                    finish(i, "stop")
                    continue
                counts[i] += 1
                text = trackers[i].push(token)
                if text:
                    job.emit("delta", r, text)
                if trackers[i].stopped:
                    finish(i, "stop")
                elif counts[i] >= job.max_tokens:
                    finish(i, "length")
            if all(done):
                return
