"""Data parallelism from a `torchrun` launch: process group, DDP / FSDP2 wrapping, state gathering.

`init_distributed` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and starts a process group
with `nccl` on CUDA and `gloo` on CPU. A single process (no torchrun, or WORLD_SIZE=1) trains the
plain module whatever the strategy.

Strategies:
  ddp:  `DistributedDataParallel`; each rank holds the whole model, gradients are averaged across
        ranks during the backward of the last micro-batch of an accumulation window (`grad_sync`).
  fsdp: FSDP2 `fully_shard` on every element of the outermost `nn.ModuleList`s (transformer
        blocks), then on the root; parameters become DTensors sharded over ranks. Rank 0's
        weights are broadcast first so all ranks shard one model. Reduce-scatter averages grads.
Both average gradients over ranks, so the trainer multiplies by `W / N` (W ranks, N targets in
the global window) to obtain the gradient of the global token-mean loss.

Checkpoint state goes through `torch.distributed.checkpoint.state_dict` in its full (unsharded)
form: rank 0 receives the whole model / optimizer state, and every rank loads from a full dict.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from lmcraft.errors import ConfigError

__all__ = [
    "DistContext",
    "resolve_device",
    "init_distributed",
    "shutdown_distributed",
    "wrap_model",
    "unwrap",
    "grad_sync",
    "all_reduce_sum",
    "barrier",
    "full_model_state",
    "load_full_model_state",
    "full_optimizer_state",
    "load_full_optimizer_state",
]

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` -> `cuda:LOCAL_RANK` when CUDA is available, else `cpu`; anything else as given."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device is {spec!r} but CUDA is not available on this machine; use auto or cpu")
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group (starting it if needed) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Elements of the outermost ModuleLists (the repeated blocks), in module order."""
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    outer = [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n)]
    return [child for name in outer for child in model.get_submodule(name)]


def wrap_model(model: nn.Module, strategy: str, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """Move `model` to the device and wrap it for `strategy`; returns the module to call.

    FSDP2 shards `model` in place (the returned object is `model` itself); DDP returns a wrapper
    whose `.module` is `model`. Use `unwrap` to reach model attributes.
    """
    model.to(ctx.device)
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        for unit in _shard_units(model):
            fully_shard(unit)
        fully_shard(model)
        return model
    raise ConfigError(
        f"this run was launched with {ctx.world_size} processes but trainer.strategy is {strategy!r}; "
        "set trainer.strategy to ddp or fsdp (or launch a single process)"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modules are their own unwrapped form)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within this block, backward passes all-reduce gradients across ranks only if `enabled`.

    Used to skip communication on all but the last micro-batch of an accumulation window.
    """
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync() if isinstance(model, DistributedDataParallel) and not enabled else nullcontext():
            yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op in a single process); returns `t`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on CPU, on rank 0 (an empty dict on other ranks). Collective."""
    return get_model_state_dict(unwrap(model), options=_GATHER)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full (unsharded) state dict on every rank; FSDP shards it back. Collective."""
    missing, unexpected = set_model_state_dict(
        unwrap(model), state, options=StateDictOptions(full_state_dict=True, strict=strict)
    )
    if unexpected:
        raise KeyError(f"checkpoint tensors not in the model: {sorted(unexpected)[:5]}")


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, whole, on rank 0 (empty elsewhere). Collective."""
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_GATHER)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
