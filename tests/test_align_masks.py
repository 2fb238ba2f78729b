"""Label masks (assistant tokens) for single/multi-turn chats in several templates, compared with transformers'
`return_assistant_tokens_mask`; truncation; packing without cross-contamination; the --preview highlighting."""

from __future__ import annotations

import pytest
import torch

from lmcraft.align.instruct import ChatFormatter, collate_packed, collate_padded, highlight, pack, truncate
from lmcraft.tokenizer.load import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["what is the answer to the question", "the answer is forty two", "hello there how are you today",
          "system prompt: be brief and kind", "user assistant"] * 10

# Training variants of chatml / llama3 with {% generation %} blocks around exactly the text the prefix method trains
CHATML_GEN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_GEN = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# generation block around the content only (end-of-turn token not trained), with whitespace control
ZEPHYR_GEN = (
    "{% for message in messages %}\n{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}\n  {%- generation -%}\n{{ message['content'] }}\n"
    "  {%- endgeneration -%}\n{% else %}{{ message['content'] }}{% endif %}{{ eos_token + '\n' }}{% endfor %}"
)
SINGLE = [{"role": "user", "content": "what is the answer?"}, {"role": "assistant", "content": "forty two"}]
MULTI = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
         {"role": "assistant", "content": "hello, how are you?"}, {"role": "user", "content": "the answer?"},
         {"role": "assistant", "content": " forty two "}]


@pytest.fixture(scope="module")
def backend():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def tok(backend) -> Tokenizer:
    return Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template="chatml")


def trained_text(ex) -> list[str]:
    """The trained character runs of an example."""
    runs, current = [], None
    for (s, e), t in zip(ex.offsets, ex.trained, strict=True):
        if t:
            current = (current[0], e) if current else (s, e)
        elif current:
            runs.append(ex.text[current[0]:current[1]])
            current = None
    if current:
        runs.append(ex.text[current[0]:current[1]])
    return runs


@pytest.mark.parametrize("template, expected", [
    ("chatml", ["forty two<|im_end|>\n"]),
    ("llama3", ["forty two<|eot_id|>"]),
    ("zephyr", ["forty two<|im_end|>\n"]),
    (ZEPHYR_GEN, ["forty two"]),
])
def test_single_turn_mask(tok: Tokenizer, template: str, expected: list[str]) -> None:
    ex = ChatFormatter(tok, template).tokenize(SINGLE)
    assert trained_text(ex) == expected
    assert ex.labels[ex.prompt_length():][:1] != [-100] and all(x == -100 for x in ex.labels[:ex.prompt_length()])


@pytest.mark.parametrize("template", ["chatml", "llama3", CHATML_GEN, LLAMA3_GEN])
def test_multi_turn_all_or_last(tok: Tokenizer, template: str) -> None:
    end = "<|eot_id|>" if "eot_id" in template or template == "llama3" else "<|im_end|>\n"
    last = "forty two" if "trim" in template or template == "llama3" else " forty two "
    all_turns = ChatFormatter(tok, template).tokenize(MULTI)
    assert trained_text(all_turns) == ["hello, how are you?" + end, last + end]
    assert trained_text(ChatFormatter(tok, template, train_on="last").tokenize(MULTI)) == [last + end]
    # preference pairs: only the answer after the prompt
    pair = ChatFormatter(tok, template).tokenize_pair(MULTI[:4], MULTI[4:])
    assert trained_text(pair) == [last + end]


def test_template_that_rewrites_history_is_reported(tok: Tokenizer) -> None:
    # shows only the last assistant message in full: the prefix of earlier turns changes once more turns follow
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
                 "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(Exception, match="generation"):
        ChatFormatter(tok, rewriting).tokenize(MULTI)


@pytest.mark.parity
@pytest.mark.parametrize("template", [CHATML_GEN, LLAMA3_GEN, ZEPHYR_GEN])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_masks_match_transformers(backend, tok: Tokenizer, template: str, messages: list[dict]) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    out = hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ours = ChatFormatter(tok, template).tokenize(messages)
    assert ours.input_ids == list(out["input_ids"])
    assert [int(t) for t in ours.trained] == list(out["assistant_masks"])
    if template != ZEPHYR_GEN:  # these blocks hold everything the prefix method trains: same mask without them
        plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        assert ChatFormatter(tok, plain).tokenize(messages).trained == ours.trained


def test_truncation_policies(tok: Tokenizer) -> None:
    ex = ChatFormatter(tok, "chatml").tokenize(MULTI)
    n = len(ex.input_ids)
    right, left = truncate(ex, n - 5, "right"), truncate(ex, n - 5, "left")
    assert right.input_ids == ex.input_ids[:n - 5] and left.input_ids == ex.input_ids[5:]
    assert truncate(ex, n - 5, "drop") is None and truncate(ex, n, "drop") is ex
    assert truncate(ex, 4, "right") is None  # nothing trained survives
    pair = ChatFormatter(tok, "chatml").tokenize_pair(MULTI[:4], MULTI[4:])
    kept = truncate(pair, pair.num_trained + 3, "right", keep_answer=True)
    assert kept.input_ids == pair.input_ids[-(pair.num_trained + 3):] and kept.num_trained == pair.num_trained


def test_packing_equals_separate_examples(tok: Tokenizer, tiny_model) -> None:
    fmt = ChatFormatter(tok, "chatml")
    examples = [fmt.tokenize(MULTI), fmt.tokenize(SINGLE), fmt.tokenize(MULTI[:3]), fmt.tokenize(SINGLE)]
    width = len(examples[0].input_ids) + len(examples[1].input_ids)
    rows = pack(examples, width)
    assert [len(r) for r in rows] == [2, 2]  # first fit, longest first: [MULTI, SINGLE], [MULTI[:3], SINGLE]
    assert all(sum(len(e.input_ids) for e in r) <= width for r in rows)
    model = tiny_model(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64).eval()
    batch = collate_packed(rows, tok.pad_token_id)
    packed = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            alone = model(torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed.logits[r, at:at + n], alone, atol=1e-5, rtol=1e-5)
            assert batch["labels"][r, at].item() == -100
            assert batch["labels"][r, at + 1:at + n].tolist() == e.labels[1:]
            at += n
        assert (batch["labels"][r, at:] == -100).all()
    padded = collate_padded(examples, tok.pad_token_id)
    assert padded["labels"].shape == padded["input_ids"].shape and (padded["labels"] != -100).sum() == sum(
        e.num_trained for e in examples)


def test_highlight_marks_trained_text(tok: Tokenizer) -> None:
    ex = ChatFormatter(tok, "chatml").tokenize(SINGLE)
    plain = highlight(ex, color=False)
    assert plain == ex.text.replace("forty two<|im_end|>\n", "«forty two<|im_end|>\n»")
    assert "\x1b[42;30mforty two" in highlight(ex, color=True)
    assert highlight(truncate(ex, len(ex.input_ids) - 2, "left"), color=False).endswith("«forty two<|im_end|>\n»")
