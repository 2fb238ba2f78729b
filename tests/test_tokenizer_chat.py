"""Tokenizer loading (encode, pad, stream-decode, save) and sandboxed chat templates (+ transformers parity)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcraft.tokenizer.chat import BUILTIN_TEMPLATES, ChatTemplateError, apply_chat_template
from lmcraft.tokenizer.load import StreamDecoder, Tokenizer, TokenizerLoadError, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello world, the tokenizer test", "naïve café 東京 😀 🎉", "numbers 12345 and more words here"] * 20
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

# Inline templates exercising what real ones use: loop vars, namespace, tojson, trim, raise_exception,
# whitespace control, {% generation %}, strftime_now, and dict().
INLINE_TEMPLATES = {
    "chatml": BUILTIN_TEMPLATES["chatml"],
    "llama3": BUILTIN_TEMPLATES["llama3"],
    "zephyr": BUILTIN_TEMPLATES["zephyr"],
    "namespace_and_json": (
        "{%- set ns = namespace(n=0) -%}\n"
        "{%- for m in messages %}\n"
        "  {%- set ns.n = ns.n + 1 %}\n"
        "{{ ns.n }}:{{ m['role'] }}={{ m | tojson }}\n"
        "{%- endfor %}\n"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}\n"
        "{%- if add_generation_prompt %}>>{% endif %}"
    ),
    "system_first": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set sys = 'default' %}{% set rest = messages %}{% endif %}"
        "{{ bos_token }}[SYS]{{ sys | trim }}[/SYS]\n"
        "{% for m in rest %}\n"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
        "{% else %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}\n"
        "{% endfor %}"
    ),
    "dict_and_loop": (
        "{% set d = dict(a=1) %}{% for m in messages %}{% if loop.index0 > 2 %}{% break %}{% endif %}"
        "{{ loop.index }}/{{ loop.length }} {{ m.role|upper }} {{ d.a }}\n{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def backend():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture()
def folder(tmp_path: Path, backend) -> Path:
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "chat_template": BUILTIN_TEMPLATES["chatml"],
        "model_max_length": 64,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return tmp_path


# -- tokenizer -------------------------------------------------------------------------------------


def test_load_special_tokens_and_eos_ids(folder: Path) -> None:
    tok = load_tokenizer(folder)
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [2, 0]  # tokenizer_config first, then generation_config
    assert tok.pad_token_id == 2  # no pad token: padding uses EOS
    assert tok.model_max_length == 64 and tok.vocab_size == 300 == len(tok)
    assert tok.all_special_ids == [0, 1, 2]
    assert load_tokenizer(folder / "tokenizer.json").eos_token_id == 2  # a file path works too


def test_encode_decode_round_trip(folder: Path) -> None:
    tok = load_tokenizer(folder)
    for text in CORPUS[:3]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_batch_padding_sides_and_truncation(folder: Path) -> None:
    tok = load_tokenizer(folder)
    short, long_ = tok.encode("hello"), tok.encode("hello world, the tokenizer")
    right = tok.encode_batch(["hello", "hello world, the tokenizer"])
    assert right.input_ids[0] == short + [2] * (len(long_) - len(short))
    assert right.attention_mask[0] == [1] * len(short) + [0] * (len(long_) - len(short))
    left = tok.encode_batch(["hello", "hello world, the tokenizer"], padding_side="left")
    assert left.input_ids[0] == [2] * (len(long_) - len(short)) + short and left.input_ids[1] == long_
    fixed = tok.encode_batch(["hello"], padding="max_length", max_length=6)
    assert len(fixed.input_ids[0]) == 6 and sum(fixed.attention_mask[0]) == len(short)
    cut = tok.encode_batch(["hello world, the tokenizer"], truncation=True, max_length=2, padding=False)
    assert cut.input_ids == [long_[:2]]
    assert tok.encode_batch(["a", "b c"]).tensors()["input_ids"].shape == (2, len(tok.encode("b c")))
    with pytest.raises(TokenizerLoadError, match="max_length"):
        tok.encode_batch(["a"], truncation=True)


def test_stream_decoder_never_splits_a_character(folder: Path) -> None:
    tok = load_tokenizer(folder)
    text = "naïve café 東京 😀 🎉 done"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold partial UTF-8 characters
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    raw = StreamDecoder(tok.backend)  # a bare tokenizers.Tokenizer works too
    assert "".join([raw.push(ids[:3]), *(raw.push(i) for i in ids[3:]), raw.flush()]) == text


def test_incomplete_character_comes_out_on_flush(folder: Path) -> None:
    tok = load_tokenizer(folder)
    partial = [i for i in tok.encode("😀") if "\ufffd" in tok.decode([i])][:1]
    stream = tok.stream_decoder()
    assert stream.push(partial) == ""
    assert stream.flush() == "\ufffd"


def test_save_round_trip(folder: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(folder, padding_side="left")
    out = tok.save(tmp_path / "saved")
    again = load_tokenizer(out)
    assert again.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    assert (again.bos_token, again.eos_token, again.chat_template) == (tok.bos_token, tok.eos_token, tok.chat_template)
    assert again.padding_side == "left"


def test_vocab_and_merges_folder_loads_as_gpt2(tmp_path: Path, backend) -> None:
    model = json.loads(backend.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<|endoftext|>"
    for text in CORPUS[:3]:
        assert tok.encode(text) == backend.encode(text).ids


def test_missing_and_broken_files_are_clear(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json.*config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(TokenizerLoadError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path)


def test_tokenizer_chat_template_uses_special_tokens(folder: Path) -> None:
    tok = load_tokenizer(folder)
    text = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    zephyr = tok.apply_chat_template(MESSAGES[1:2], template="zephyr")
    assert zephyr == "<|user|>\nHi there<|im_end|>\n"
    no_template = Tokenizer(tok.backend)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        no_template.apply_chat_template(MESSAGES)


# -- chat templates --------------------------------------------------------------------------------


def test_sandbox_blocks_python_internals() -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        apply_chat_template(MESSAGES, escape)
    with pytest.raises(ChatTemplateError):
        apply_chat_template(MESSAGES, "{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(ChatTemplateError):  # immutable: templates cannot mutate their inputs
        apply_chat_template(MESSAGES, "{{ messages.append(1) }}")


def test_template_errors_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        apply_chat_template([{"role": "tool", "content": "x"}], INLINE_TEMPLATES["system_first"])
    with pytest.raises(ChatTemplateError, match="does not compile: line 1"):
        apply_chat_template(MESSAGES, "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="message 1"):
        apply_chat_template([{"role": "user", "content": "a"}, {"content": "no role"}], "chatml")


def test_continue_final_message_and_tojson() -> None:
    prefill = [*MESSAGES[:2], {"role": "assistant", "content": "The answer is"}]
    text = apply_chat_template(prefill, "chatml", continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(ChatTemplateError, match="cannot both"):
        apply_chat_template(prefill, "chatml", continue_final_message=True, add_generation_prompt=True)
    rendered = apply_chat_template([{"role": "user", "content": "東京 <b>"}], "{{ messages[0] | tojson }}")
    assert rendered == '{"role": "user", "content": "東京 <b>"}'  # no ASCII or HTML escaping


def test_builtin_alpaca_template() -> None:
    text = apply_chat_template(MESSAGES[:3], "alpaca", eos_token="</s>", add_generation_prompt=False)
    assert text == "You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello.</s>\n\n"


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(INLINE_TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_inline_templates_match_transformers(backend, name: str, add_generation_prompt: bool) -> None:
    from transformers import PreTrainedTokenizerFast

    template = INLINE_TEMPLATES[name]
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
    kwargs = {"tools": tools} if name == "namespace_and_json" else {}
    expected = hf.apply_chat_template(
        MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    ours = Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, **kwargs) == expected
