"""Where the per-document work of the prepare run happens: in the main process, in a process pool, or on Ray.

An executor takes chunks (`submit(docs)` -> a handle whose `get()` is the chunk's `ChunkResult`) and runs
`pipeline.process_chunk` on them; the main process consumes the handles in submission order and alone decides
dedup and writes parts. `process_chunk` is a pure function of the chunk and the steps, so a task that runs twice
(a retried Ray task, a resumed run) gives the same result, and the output is byte-identical for every executor
and worker count.

- `local`, 1 worker: in the calling process.
- `local`, N workers: a `multiprocessing` pool (fork where the platform has it); each process builds its
  steps' state once (models load on first use, once per process).
- `ray`: N actors (`--ray-address` joins a running cluster, else a local one with N CPUs is started and shut down
  at the end); each actor holds the steps, so models load once per actor. Actors restart when their process
  dies and their tasks are retried (`max_restarts`, `max_task_retries`).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Literal

from lmcraft.data.pipeline import ChunkResult, process_chunk
from lmcraft.data.readers import Document
from lmcraft.errors import ConfigError

__all__ = ["ExecutorKind", "make_executor"]

ExecutorKind = Literal["local", "ray"]

_WORKER: dict[str, Any] = {}


def _init_worker(steps: list[Any], tokenizer: Any, in_pool: bool = True) -> None:
    if in_pool:  # one tokenizer thread per worker process: the workers are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Ctrl-C reaches the whole process group: the main process alone handles it (and ends the pool), so
        # the workers do not each print a KeyboardInterrupt traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["steps"], _WORKER["tokenizer"] = steps, tokenizer


def _work(docs: list[Document]) -> ChunkResult:
    return process_chunk(_WORKER["steps"], docs, _WORKER["tokenizer"])


def _context(steps: list[Any]) -> Any:
    """fork where the platform has it: workers start in milliseconds and do not re-import the caller's
    main module (spawn would, and a script that imports torch would pay for it in every worker). Steps that run
    torch models (`uses_torch`) get spawned workers: a child forked from a process whose torch thread pools
    already ran deadlocks in its first parallel operation."""
    import multiprocessing as mp

    fork = "fork" in mp.get_all_start_methods() and not any(getattr(s, "uses_torch", False) for s in steps)
    return mp.get_context("fork" if fork else "spawn")


class _Done:
    def __init__(self, result: ChunkResult) -> None:
        self.result = result

    def get(self) -> ChunkResult:
        return self.result


class _InProcess:
    capacity = 0

    def __init__(self, steps: list[Any], tokenizer: Any) -> None:
        _init_worker(steps, tokenizer, in_pool=False)

    def submit(self, docs: list[Document]) -> _Done:
        return _Done(_work(docs))

    def close(self) -> None:
        pass


class _Pool:
    def __init__(self, steps: list[Any], tokenizer: Any, workers: int) -> None:
        self.capacity = 2 * workers
        self.pool = _context(steps).Pool(workers, initializer=_init_worker, initargs=(steps, tokenizer))

    def submit(self, docs: list[Document]) -> Any:
        return self.pool.apply_async(_work, (docs,))

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class _RayRef:
    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray, self.ref = ray, ref

    def get(self) -> ChunkResult:
        return self.ray.get(self.ref)


class _Ray:
    """`workers` actors, chunks handed out round-robin; results are read back in submission order."""

    def __init__(self, steps: list[Any], tokenizer: Any, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'lmcraft[ray]'") from None
        self.ray, self.capacity, self.started = ray, 2 * workers, False
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            self.started = True

        @ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=3)
        class ChunkWorker:
            def __init__(self, payload: tuple[list[Any], Any]) -> None:
                _init_worker(*payload, in_pool=False)
                os.environ["TOKENIZERS_PARALLELISM"] = "false"

            def work(self, docs: list[Document]) -> ChunkResult:
                return _work(docs)

        # held for the executor's life: a restarted actor re-reads its constructor argument from the object
        # store, which frees it once the driver holds no reference (ray-project/ray#53727)
        self.shared = ray.put((steps, tokenizer))
        self.actors = [ChunkWorker.remote(self.shared) for _ in range(workers)]
        self.turn = 0

    def submit(self, docs: list[Document]) -> _RayRef:
        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        return _RayRef(self.ray, actor.work.remote(docs))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def make_executor(kind: ExecutorKind, workers: int, steps: list[Any], tokenizer: Any,
                  address: str | None = None) -> Any:
    """An executor with `submit(docs) -> handle` (`handle.get() -> ChunkResult`), `capacity` (how many handles
    may wait before the caller must consume the oldest; 0: results are ready at once) and `close()`."""
    if kind == "ray":
        return _Ray(steps, tokenizer, workers, address)
    if address is not None:
        raise ConfigError("--ray-address goes with --executor ray")
    return _Pool(steps, tokenizer, workers) if workers > 1 else _InProcess(steps, tokenizer)
