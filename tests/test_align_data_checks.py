"""Chat training data checks before step 0: each silent label-mask bug is caught, with the example shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcraft.align.data_checks import DataCheckError, check_chat_examples, check_prompts, check_saved_template
from lmcraft.align.instruct import IGNORE_INDEX, ChatFormatter, collate_padded
from lmcraft.tokenizer.load import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "<think>greet back</think>hello, how are you?"}]
BLOCK_EOS_OUTSIDE = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                     "{% endgeneration %}{{ eos_token }}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}"
                     "{% endfor %}")
EMPTY_BLOCK = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{% endgeneration %}{{ m.content }}"
               "{{ eos_token }}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
ALL_TRAINED = ("{% generation %}{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}"
               "{{ eos_token }}{% endif %}\n{% endfor %}{% endgeneration %}")
DROPS_THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello there, how are you? Be brief. greet back"] * 5, trainer)
    return Tokenizer(backend, eos_token="<|im_end|>", chat_template="chatml")


def _check(tokenizer: Tokenizer, template: str | None = None, collate=None):  # noqa: ANN001, ANN202
    formatter = ChatFormatter(tokenizer, template)
    example = formatter.tokenize(CHAT, source="chat.json, record 1")
    pad = tokenizer.pad_token_id
    return check_chat_examples([CHAT], [example], tokenizer.eos_token_ids,
                               collate or (lambda exs: collate_padded(exs, pad)))


def test_a_good_template_passes_and_summarises(tokenizer: Tokenizer) -> None:
    summary = _check(tokenizer)
    assert summary.examples == 1 and summary.reasoning_blocks == 1 and summary.end_tokens == [0]
    assert 0 < summary.trained_tokens < summary.tokens
    assert "data checks passed on 1 examples" in summary.line()


@pytest.mark.parametrize(("template", "needle"), [
    (EMPTY_BLOCK, "the loss mask is empty"),
    (BLOCK_EOS_OUTSIDE, "trained without its end-of-turn token"),
    (ALL_TRAINED, "every token is trained, the prompt too"),
    (DROPS_THINKING, "drops the reasoning block"),
])
def test_template_mask_bugs_are_caught(tokenizer: Tokenizer, template: str, needle: str) -> None:
    with pytest.raises(DataCheckError, match=needle) as err:
        _check(tokenizer, template)
    message = str(err.value)
    assert "example 0 (chat.json, record 1)" in message and "hello there" in message  # the example is shown


def test_pad_equal_to_eos_must_not_mask_the_real_eos(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_id

    def masks_by_pad_id(examples):  # noqa: ANN001, ANN202 - the classic bug: labels[input_ids == pad] = -100
        out = collate_padded(examples, eos)
        out["labels"][out["input_ids"] == eos] = IGNORE_INDEX
        return out

    with pytest.raises(DataCheckError, match=r"drops the labels of 1 trained token\(s\) \(ids \[0\]\)"):
        _check(tokenizer, collate=masks_by_pad_id)


def test_no_examples_left_is_an_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(DataCheckError, match="no training example is left"):
        check_chat_examples([], [], tokenizer.eos_token_ids, lambda exs: {})


def test_saved_template_must_equal_the_training_one(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path / "out")
    check_saved_template(tmp_path / "out", tokenizer.chat_template)
    with pytest.raises(DataCheckError, match="saved chat template differs"):
        check_saved_template(tmp_path / "out", "{{ messages }}")


NO_GENERATION_PROMPT = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


def _prompts(tokenizer: Tokenizer, template: str | None = None, eos: list[int] | None = None, new: int = 8,
             context: int = 64) -> str:
    formatter = ChatFormatter(tokenizer, template)
    prompts = [CHAT[:2], [CHAT[1]]]
    return check_prompts(prompts, formatter.render, [formatter.prompt_ids(p) for p in prompts],
                         tokenizer.eos_token_ids if eos is None else eos, new, context)


def test_prompt_checks_pass_and_catch_each_problem(tokenizer: Tokenizer) -> None:
    assert _prompts(tokenizer).startswith("prompt checks passed on 2 prompts: assistant turn opened")
    with pytest.raises(DataCheckError, match="ignores add_generation_prompt"):
        _prompts(tokenizer, NO_GENERATION_PROMPT)
    with pytest.raises(DataCheckError, match="no end-of-turn"):
        _prompts(tokenizer, eos=[])
    with pytest.raises(DataCheckError, match=r"prompt 0 has \d+ tokens; with max_new_tokens=60 it exceeds"):
        _prompts(tokenizer, new=60)
