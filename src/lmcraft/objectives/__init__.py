"""Pre-training objectives: pure loss functions plus the seeded batch transforms they need.

    from lmcraft.objectives import build_objective
    obj = build_objective("mlm", masking={"vocab_size": 8192, "mask_token_id": 4, "special_token_ids": [0, 1, 2, 3]})
    model = obj.build_model(cfg)
    batch = obj.transform({"input_ids": ids, "attention_mask": am}, generator)
    out = obj.loss(model, batch)        # LossOutput(loss_sum, num_targets, metrics, num_tokens): the trainer's loss_fn

Names: clm (causal LM), mlm (masked LM), nsp / sop (sentence pairs + MLM), rtd (ELECTRA), plm (XLNet).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lmcraft.errors import ConfigError
from lmcraft.objectives.base import Batch, Objective
from lmcraft.objectives.clm import CausalLM
from lmcraft.objectives.electra import ReplacedTokenDetection
from lmcraft.objectives.mlm import MaskedLM, MaskingConfig
from lmcraft.objectives.plm import PermutationLM
from lmcraft.objectives.sentence_pairs import SentencePairObjective

__all__ = ["OBJECTIVES", "Batch", "Objective", "build_objective"]

OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "clm": CausalLM,
    "mlm": MaskedLM,
    "nsp": functools.partial(SentencePairObjective, "nsp"),
    "sop": functools.partial(SentencePairObjective, "sop"),
    "rtd": ReplacedTokenDetection,
    "plm": PermutationLM,
}


def build_objective(name: str, **options: Any) -> Objective:
    """The objective `name` built with `options` (a `masking` dict becomes a `MaskingConfig`)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown pre-training objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    try:
        if isinstance(options.get("masking"), dict):
            options["masking"] = MaskingConfig(**options["masking"])
        return OBJECTIVES[name](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"objective {name!r}: bad options {sorted(options)}: {err}") from err
