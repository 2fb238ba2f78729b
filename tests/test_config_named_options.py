"""The one "name -> options" mechanism (`config.named_options`, `check_options`): the PEFT block, the objective
section and the prepare steps report a bad name or option in the config-error format, at its full key."""

from __future__ import annotations

import pytest

from lmcraft.config import PeftOptions, StageConfig, validate_config
from lmcraft.data.prepare_config import StepOptions
from lmcraft.errors import ConfigError
from lmcraft.pretrain.config import ObjectiveSection


class Stage(StageConfig):
    peft: PeftOptions | None = None
    objective: ObjectiveSection | None = None
    steps: list[StepOptions] = []


def error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(Stage, data, "c.yaml")
    return str(err.value)


def test_unknown_names_and_keys_at_their_full_key() -> None:
    assert error({"peft": {"method": "loar"}}) == (
        "invalid config c.yaml: key 'peft.method': unknown peft method 'loar'. Did you mean 'lora'? Known: adalora, "
        "adapter, bitfit, dora, ia3, lora, prefix, prompt, ptuning, ptuning_v2, qlora, unipelt.")
    assert error({"peft": {"method": "lora", "lora_alpa": 8}}).startswith(
        "invalid config c.yaml: unknown key 'peft.lora_alpa'. Did you mean 'lora_alpha'? Allowed keys here: "
        "init_lora_weights, lora_alpha, ")
    assert error({"objective": {"name": "mlmm"}}).startswith(
        "invalid config c.yaml: key 'objective.name': unknown pre-training objective 'mlmm'. Did you mean 'mlm'? "
        "Known: clm, mlm, nsp, sop, rtd, plm.")
    assert error({"objective": {"name": "clm", "reset_at_eso": True}}) == (
        "invalid config c.yaml: unknown key 'objective.reset_at_eso'. Did you mean 'reset_at_eos'? Allowed keys "
        "here: eos_token_id, reset_at_eos.")
    assert error({"steps": [{"type": "whitespace"}, {"type": "exact_dedupe"}]}).startswith(
        "invalid config c.yaml: key 'steps.1.type': unknown step 'exact_dedupe'. Did you mean 'exact_dedup'?")


def test_bad_values_and_what_the_builder_refuses() -> None:
    assert error({"objective": {"name": "mlm", "masking": {"probability": 1.5}}}) == (
        "invalid config c.yaml: key 'objective.masking': masking probability must be in (0, 1), got 1.5.")
    assert error({"objective": {"name": "mlm", "masking": {"probabilty": 0.2}}}) == (
        "invalid config c.yaml: unknown key 'objective.masking.probabilty'. Did you mean 'probability'? Allowed "
        "keys here: mask_fraction, mask_token_id, max_span, probability, random_fraction, span_p, special_token_ids, "
        "strategy, vocab_size.")
    assert error({"steps": [{"type": "minhash_dedup", "num_perm": "many"}]}) == (
        "invalid config c.yaml: key 'steps.0.num_perm': Input should be a valid integer, unable to parse string as "
        "an integer (given: 'many').")
    assert "key 'peft': " in error({"peft": {"method": "lora", "r": 0}})  # the method's own check: the block's error


def test_good_blocks_stay_as_written() -> None:
    cfg = validate_config(Stage, {"peft": {"method": "lora", "r": 4}, "objective": {"name": "clm"},
                                  "steps": [{"type": "c4", "min_sentences": 2}]})
    assert cfg.peft == {"method": "lora", "r": 4} and cfg.steps == [{"type": "c4", "min_sentences": 2}]
    assert cfg.objective is not None and cfg.objective.options == {}
