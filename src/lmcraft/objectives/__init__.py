"""Pre-training objectives: pure loss functions plus the seeded batch transforms they need.

    from lmcraft.objectives import build_objective
    obj = build_objective("mlm", masking={"vocab_size": 8192, "mask_token_id": 4, "special_token_ids": [0, 1, 2, 3]})
    obj = build_objective("mlm", tokenizer=tok)   # the same, with the ids taken from a Tokenizer
    model = obj.build_model(cfg)
    batch = obj.transform({"input_ids": ids, "attention_mask": am}, generator)
    out = obj.loss(model, batch)        # LossOutput(loss_sum, num_targets, metrics, num_tokens): the trainer's loss_fn
    keep = obj.kept_model(model)        # the LanguageModel to save after pre-training

Names: clm (causal LM), mlm (masked LM), nsp / sop (sentence pairs + MLM), rtd (ELECTRA), plm (XLNet).
"""

from __future__ import annotations

from typing import Any

from lmcraft.config import build_options, unknown_name
from lmcraft.objectives.base import Batch, LossOutput, Objective, TokenizerIds
from lmcraft.objectives.clm import CausalLM
from lmcraft.objectives.electra import ReplacedTokenDetection
from lmcraft.objectives.mlm import MaskedLM
from lmcraft.objectives.plm import PermutationLM
from lmcraft.objectives.sentence_pairs import SentencePairObjective

__all__ = ["OBJECTIVES", "PAIR_OBJECTIVES", "Batch", "LossOutput", "Objective", "build_objective"]

# name -> (objective class, fixed options)
OBJECTIVES: dict[str, tuple[type[Objective], dict[str, Any]]] = {
    "clm": (CausalLM, {}),
    "mlm": (MaskedLM, {}),
    "nsp": (SentencePairObjective, {"kind": "nsp"}),
    "sop": (SentencePairObjective, {"kind": "sop"}),
    "rtd": (ReplacedTokenDetection, {}),
    "plm": (PermutationLM, {}),
}
PAIR_OBJECTIVES = ("nsp", "sop")  # their examples are sentence pairs, not windows of the token stream


def build_objective(name: str, tokenizer: TokenizerIds | None = None, max_length: int | None = None,
                    **options: Any) -> Objective:
    """The objective `name` built with `options` (a `masking` dict becomes a `MaskingConfig`). With a
    `tokenizer`, the token ids the objective needs (and, for nsp/sop, `max_length`) are filled in wherever
    `options` leave them out."""
    if name not in OBJECTIVES:
        raise unknown_name("pre-training objective", "name", name, OBJECTIVES)
    cls, fixed = OBJECTIVES[name]
    options = {**fixed, **options}
    if tokenizer is not None:
        options = cls.with_token_ids(options, tokenizer, max_length)
    return build_options(cls, options, f"objective {name!r}: bad options {sorted(options)}")
