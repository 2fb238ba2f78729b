"""`backend: llamacpp`: llama.cpp (llama-cpp-python, an implementation lmcraft did not write) computes the logits
of the one decode loop. On the same f32 tiny model both backends must give the same greedy (and seeded sampled)
tokens, the same eval scores and task results, and the server must answer the openai client with torch's text.
The choice of backend (auto) is tested without llama.cpp too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, save_chat_tokenizer, served
from lmcraft.decoder_backend import load_decoder, to_backend
from lmcraft.errors import ConfigError
from lmcraft.generate import GenerationConfig, generate_text
from lmcraft.generate.llamacpp_backend import llama_cpp_available
from lmcraft.hub import load_model, save_model
from lmcraft.tokenizer.load import load_tokenizer

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama_cpp is not importable (pip install 'lmcraft[llamacpp]')")
TEXTS = ["the cat sat on the mat and the dog sat on the log", "what is two plus three? the answer is five",
         "spam: buy cheap pills now! ham: see you at lunch"] * 10
PROMPTS = ["the cat", "what is two plus three? the answer", "spam", "ham: see you at lunch and the dog sat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llamacpp")
    vocab_size = save_chat_tokenizer(root / "tok", TEXTS, 320)
    model = build_tiny_model(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=128, max_position_embeddings=256, initializer_range=0.3,
                             tie_word_embeddings=False, eos_token_id=0)
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_chooses_torch_without_llama_cpp(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmcraft.generate.llamacpp_backend.llama_cpp_available", lambda: False)
    decoder = load_decoder(model_dir, "auto")
    assert decoder.backend == "torch" and "llama_cpp is not installed" in decoder.note
    assert to_backend(decoder.model, decoder.tokenizer, model_dir, "auto", device="cuda").note.endswith("device cuda")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        load_decoder(model_dir, "llamacpp", device="cuda")
    with pytest.raises(ConfigError, match="not one of"):
        load_decoder(model_dir, "onnx")


class FullForward:
    """An external logit source like `LlamaCppModel` (prefill/step over unpadded rows), made of the torch model
    without a cache: every call recomputes each active row alone. It runs the decode loop's external path without
    llama.cpp."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.config = model, model.config
        self.calls: list[list[bool]] = []

    def _last(self, row: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([row])).logits[0, -1]

    def prefill(self, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
        self.rows = [list(p) for p in prompts]
        self.last = torch.stack([self._last(r) for r in self.rows])
        return self.last.clone()

    def step(self, tokens: list[int], active: list[bool]) -> torch.Tensor:
        self.calls.append(list(active))
        for r, on in enumerate(active):
            if on:
                self.rows[r].append(tokens[r])
                self.last[r] = self._last(self.rows[r])
        return self.last.clone()


def test_external_logit_source_decodes_like_the_torch_model(model_dir: Path) -> None:
    model, tokenizer = load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
    reasons = set()
    for config in (GenerationConfig(max_new_tokens=12),
                   GenerationConfig(max_new_tokens=12, stop_strings=("e", "a", " ")),
                   GenerationConfig(max_new_tokens=12, do_sample=True, top_k=5, repetition_penalty=1.3, seed=1)):
        external = FullForward(model)
        ours = generate_text(model, tokenizer, PROMPTS, config)
        theirs = generate_text(external, tokenizer, PROMPTS, config)
        assert theirs.tokens == ours.tokens and theirs.finish_reasons == ours.finish_reasons
        assert theirs.texts == ours.texts
        # a row is decoded once per token after its first, and never after it has finished
        assert [sum(call[r] for call in external.calls) for r in range(len(PROMPTS))] == [
            len(t) - 1 for t in ours.tokens]
        reasons.update(ours.finish_reasons)
    assert reasons - {"length"}, "no row finished early: the test would not see finished rows left out"


@needs_llama_cpp
def test_greedy_and_seeded_sampling_equal_torch(model_dir: Path, cache: Path) -> None:
    torch_model, tokenizer = load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
    decoder = load_decoder(model_dir, "auto")
    assert decoder.backend == "llamacpp" and decoder.model.path.parent == cache / "llamacpp"
    assert load_decoder(model_dir, "llamacpp").model.path == decoder.model.path  # exported once, keyed by hash
    for config in (GenerationConfig(max_new_tokens=24, eos_token_ids=()),  # ragged batch: one llama.cpp sequence each
                   GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, seed=3),
                   GenerationConfig(max_new_tokens=24, stop_strings=("the",))):
        ours = generate_text(torch_model, tokenizer, PROMPTS, config)
        theirs = generate_text(decoder.model, tokenizer, PROMPTS, config)
        assert theirs.tokens == ours.tokens and theirs.texts == ours.texts
        assert theirs.finish_reasons == ours.finish_reasons
    chat = GenerationConfig(max_new_tokens=16)
    assert (generate_text(decoder.model, tokenizer, PROMPTS[:2], chat, chat=True).texts
            == generate_text(torch_model, tokenizer, PROMPTS[:2], chat, chat=True).texts)


@needs_llama_cpp
def test_scores_and_a_tiny_task_equal_torch(model_dir: Path, tmp_path: Path) -> None:
    from lmcraft.evaluate import evaluate_task
    from lmcraft.prompting.model_lm import ModelLM
    from lmcraft.prompting.tasks import load_task

    lms = {b: ModelLM.load(model_dir, backend=b, batch_size=3, progress=False) for b in ("torch", "llamacpp")}
    assert lms["llamacpp"].backend == "llamacpp"
    pairs = [("the cat sat on", " the mat"), ("what is two plus", " three"), ("", "spam")]
    # llama.cpp keeps its KV cache in f16 (its default): scores agree to about 1e-3, not to f32's last bits
    for b, (lp, n) in zip(lms["torch"].loglikelihood(pairs), lms["llamacpp"].loglikelihood(pairs), strict=True):
        assert b[1] == n and lp == pytest.approx(b[0], rel=2e-3)
    rolling = [lm.loglikelihood_rolling(TEXTS[:3], stride=8) for lm in lms.values()]
    assert [n for _, n in rolling[0]] == [n for _, n in rolling[1]]
    assert [lp for lp, _ in rolling[1]] == pytest.approx([lp for lp, _ in rolling[0]], rel=2e-3)
    task = {"name": "tiny_cls", "data": {"source": "inline", "records": [
        {"t": "buy cheap pills now", "y": "spam"}, {"t": "see you at lunch", "y": "ham"},
        {"t": "the cat sat on the mat", "y": "ham"}]},
        "template": {"input": "{t}", "target": "{y}", "choices": ["ham", "spam"], "label": "y"},
        "answer": {"type": "label", "labels": ["ham", "spam"]}, "generation": {"answer_max_new_tokens": 6},
        "strategies": [{"name": "zero_shot"}, {"name": "multiple_choice"}]}
    results = [evaluate_task(lm, load_task(task), model_name="tiny", chat=True) for lm in lms.values()]
    for a, b in zip(results[0].strategies, results[1].strategies, strict=True):
        assert [(p.answer, p.correct) for p in a.predictions] == [(p.answer, p.correct) for p in b.predictions]
        assert b.metrics == pytest.approx(a.metrics, rel=2e-3)


@needs_llama_cpp
def test_generate_cli_on_the_exported_gguf_file(model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A .gguf MODEL goes to llama.cpp as it is; its answer equals torch's on the same weights."""
    from lmcraft.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(model_dir), str(out), "--quant", "f32", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "llama.cpp greedy tokens (probe)  16 of 16 equal" in table and "llama.cpp perplexity" in table
    captured = {}
    for backend in ("torch", "llamacpp"):
        assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "12",
                     "--backend", backend]) == 0
        captured[backend] = capsys.readouterr()
    assert captured["torch"].out == captured["llamacpp"].out and "llama.cpp on m.gguf" in captured["llamacpp"].err


@needs_llama_cpp
def test_serve_with_backend_llamacpp_answers_the_openai_client(model_dir: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    with served(model_dir, "--backend", "llamacpp") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        torch_model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "the cat"}],
                                              max_tokens=12, temperature=0)
        want = generate_text(torch_model, tokenizer, "the cat", GenerationConfig(max_new_tokens=12), chat=True)
        assert chat.choices[0].message.content == want.texts[0]
        texts = client.completions.create(model="m", prompt=PROMPTS, max_tokens=10, temperature=0)
        want = generate_text(torch_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10))
        assert [c.text for c in texts.choices] == want.texts
        assert json.loads(httpx.get(url + "/metrics").text)["largest_batch"] == len(PROMPTS)
