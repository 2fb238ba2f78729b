"""Text around generation: UTF-8-safe streaming, stop strings, chat prompts, EOS from the tokenizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmcraft.generate import GenerationConfig, TextStreamer, TextTracker, encode_prompts, generate, generate_text
from lmcraft.models import KVCache, ModelConfig, ModelOutput
from lmcraft.tokenizer.load import Tokenizer

SPECIALS = ["<eos>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level BPE trained on ASCII text: non-ASCII characters stay split into several byte tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the answer is forty two", "question: what next? answer: nothing"] * 20, trainer)
    return Tokenizer(backend, eos_token="<eos>", extra_eos_token_ids=[backend.token_to_id("<|im_end|>")],
                     chat_template="chatml")


class ScriptedModel(nn.Module):
    """A stand-in decoder that emits a fixed token sequence per row, and records the prompts it was given."""

    def __init__(self, scripts: list[list[int]], vocab_size: int) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.scripts = scripts
        self.prompts: torch.Tensor | None = None

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        self.step = 0
        return KVCache(self.config, batch_size, capacity, torch.float32)

    def forward(self, input_ids: torch.Tensor, past_key_values: KVCache, **_: object) -> ModelOutput:
        if self.step == 0:
            self.prompts = input_ids.clone()
        b, t = input_ids.shape
        logits = torch.full((b, 1, self.config.vocab_size), -1e4)
        for row, script in enumerate(self.scripts):
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 0.0
        self.step += 1
        past_key_values.advance(t)
        return ModelOutput(logits, logits)


def test_streamer_never_splits_a_character(tokenizer: Tokenizer) -> None:
    text = "the answer: héllo 日本 wörld 🙂!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the non-ASCII characters take several tokens
    pieces: list[str] = []
    streamer = TextStreamer(tokenizer, write=pieces.append)
    for token in ids:
        streamer.put([token])
    streamer.end()
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer: Tokenizer) -> None:
    script = tokenizer.encode("the answer is 42\nquestion: what next?")
    model = ScriptedModel([script], tokenizer.vocab_size)
    pieces: list[str] = []
    config = GenerationConfig(max_new_tokens=len(script), stop_strings=["\nquestion"], eos_token_ids=())
    result = generate(model, [[1]], config, tokenizer=tokenizer,
                      streamer=TextStreamer(tokenizer, write=pieces.append, stop_strings=config.stop_strings))
    assert result.texts == ["the answer is 42"]
    assert "".join(pieces) == "the answer is 42"
    assert result.finish_reasons == ["stop_string"]
    assert len(result.tokens[0]) < len(script)
    assert tokenizer.decode(result.tokens[0]).endswith("question")


def test_partial_stop_string_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    tracker = TextTracker(tokenizer, stop_strings=["answer!"])
    shown = "".join(tracker.push(t) for t in tokenizer.encode("forty two answer"))
    assert not shown.endswith("answer")  # held back: it could still become the stop string
    assert shown + tracker.finish() == "forty two answer" and not tracker.stopped


def test_batch_rows_stop_on_their_own_rules(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("<eos>")
    scripts = [tokenizer.encode("forty two") + [eos] + tokenizer.encode(" more"),
               tokenizer.encode("what next? answer: nothing at all")]
    model = ScriptedModel(scripts, tokenizer.vocab_size)
    config = GenerationConfig(max_new_tokens=40, stop_strings=["answer:"], eos_token_ids=[eos])
    result = generate(model, [[1, 2], [3]], config, tokenizer=tokenizer)
    assert result.texts == ["forty two", "what next? "]
    assert result.finish_reasons == ["eos", "stop_string"]


def test_generate_text_renders_the_chat_template_and_stops_at_turn_end(tokenizer: Tokenizer) -> None:
    im_end = tokenizer.token_to_id("<|im_end|>")
    model = ScriptedModel([tokenizer.encode("forty two") + [im_end] + tokenizer.encode("junk")], tokenizer.vocab_size)
    result = generate_text(model, tokenizer, "what next?", GenerationConfig(max_new_tokens=20), chat=True,
                           system="be brief")
    expected = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat next?<|im_end|>\n<|im_start|>assistant\n"
    assert model.prompts[0].tolist() == tokenizer.encode(expected, add_special_tokens=False)
    assert result.texts == ["forty two"] and result.finish_reasons == ["eos"]
    assert result.tokens_per_second > 0


def test_encode_prompts_plain_and_conversation(tokenizer: Tokenizer) -> None:
    assert encode_prompts(tokenizer, ["the answer"]) == [tokenizer.encode("the answer")]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "next"}]
    [ids] = encode_prompts(tokenizer, [conversation], chat=True, template="chatml")
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n")
