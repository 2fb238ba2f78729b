"""PEFT methods by name: the `MethodConfig` base class, `register`, and `config_from_dict`.

A method is a config dataclass (a `MethodConfig` subclass registered under its `method` name) whose `inject` adds
wrapper layers and/or a prefix/prompt provider to a `PeftModel` under an adapter name:

    @register
    @dataclass(kw_only=True)
    class LoraConfig(MethodConfig):
        method = "lora"
        r: int = 8
        def inject(self, model, adapter): ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lmcraft.config import OptionProblem, OptionsError, unknown_name
from lmcraft.errors import ConfigError

if TYPE_CHECKING:
    from lmcraft.peft.model import PeftModel

REGISTRY: dict[str, type[MethodConfig]] = {}


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """A method option's check: ValueError ("NAME must be one of A, B, got 'x'") unless `value` is in `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_positive(name: str, value: int) -> None:
    """A method option's check: ValueError ("NAME must be >= 1, got 0") unless `value` >= 1."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method config available by its `method` name."""
    REGISTRY[cls.method] = cls
    return cls


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method config. `modules_to_save` names base modules (e.g. "head") trained as full copies."""

    method: ClassVar[str] = ""
    modules_to_save: list[str] = field(default_factory=list)

    def inject(self, model: PeftModel, adapter: str) -> None:
        """Add this method's layers/provider to `model` under the name `adapter`."""
        raise NotImplementedError

    def regularization(self, model: PeftModel, adapter: str) -> torch.Tensor | None:
        """An extra loss term the method asks for (AdaLoRA's orthogonality penalty), or None."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The plain dict of lmcraft's layout and YAML configs: `method` plus every field."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"method"})
        if unknown:
            raise OptionsError(f"peft method {cls.method!r}", [
                OptionProblem((key,), "unknown_key", allowed=tuple(sorted(names))) for key in unknown])
        try:
            return cls(**{k: v for k, v in data.items() if k != "method"})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"peft method {cls.method!r}: {err}") from None


@dataclass(kw_only=True)
class PromptLearningConfig(MethodConfig):
    """Methods with a prefix/prompt provider of `num_virtual_tokens` virtual tokens."""

    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        check_positive("num_virtual_tokens", self.num_virtual_tokens)


def config_from_dict(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """`{"method": "lora", "r": 8}` -> `LoraConfig(r=8)`; a config object passes through."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a peft config needs a 'method' key; known methods: {', '.join(sorted(REGISTRY))}")
    method = data["method"]
    if method not in REGISTRY:
        raise unknown_name("peft method", "method", method, sorted(REGISTRY))
    return REGISTRY[method].from_dict(data)


def check_stage_options(data: dict[str, Any]) -> MethodConfig:
    """A stage config's `peft:` block, checked as the run will complete it (AdaLoRA's `total_step` is filled in
    from the run's length by `lmcraft.peft.training.method_config`, so it may be missing here)."""
    if isinstance(data, dict) and data.get("method") == "adalora" and not data.get("total_step"):
        data = {**data, "total_step": 10**9}  # any length that leaves room for the schedule: checked at run time
    return config_from_dict(data)
