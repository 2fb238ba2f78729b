"""`lmcraft serve`: the official `openai` client against the server in a subprocess on a free local port. Answers
must equal greedy `generate_text` on the same prompt; concurrent requests must be decoded in shared batches."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import build_tiny_model, save_chat_tokenizer, served
from lmcraft.cli import main
from lmcraft.generate import GenerationConfig, generate_text, stop_token_ids
from lmcraft.hub import load_model, save_model
from lmcraft.stages.serve import add_arguments, load_served_model
from lmcraft.tokenizer.load import load_tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    vocab_size = save_chat_tokenizer(root / "tok", ["hello there, how are you today? fine thanks"] * 10, 320)
    model = build_tiny_model(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, tie_word_embeddings=False, initializer_range=0.2, eos_token_id=0)
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with served(model_dir, "--api-key", KEY, "--max-batch", "16") as running:
        yield running


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def expected(folder: Path, prompt: str, n: int, chat: bool) -> str:
    return generate_text(load_model(folder), load_tokenizer(folder), prompt, GenerationConfig(max_new_tokens=n),
                         chat=chat).texts[0]


def test_chat_and_completion_match_greedy_generate(server, model_dir: Path) -> None:
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == [str(model_dir)]
    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello there"}],
                                     max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == expected(model_dir, "hello there", 12, chat=True)
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0, stream=True)
        if ch.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    done = c.completions.create(model="m", prompt="how are you", max_tokens=10, temperature=0)
    assert done.choices[0].text == expected(model_dir, "how are you", 10, chat=False)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="m", prompt="how are you", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == done.choices[0].text
    stop = done.choices[0].text[3:5]
    cut = c.completions.create(model="m", prompt="how are you", max_tokens=10, temperature=0, stop=[stop])
    reference = generate_text(load_model(model_dir), load_tokenizer(model_dir), "how are you",
                              GenerationConfig(max_new_tokens=10, stop_strings=(stop,))).texts[0]
    assert cut.choices[0].text == reference and cut.choices[0].finish_reason == "stop" and stop not in reference
    two = c.completions.create(model="m", prompt="how are you", max_tokens=10, temperature=0, n=2)
    assert [ch.text for ch in two.choices] == [done.choices[0].text] * 2


def test_concurrent_requests_share_batches(server, model_dir: Path) -> None:
    url, _ = server
    prompts = ["hello", "how are you", "fine thanks", "hello there, how"] * 4
    want = {p: expected(model_dir, p, 8, chat=False) for p in set(prompts)}

    def ask(prompt: str) -> str:
        return client(url).completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    assert got == [want[p] for p in prompts]
    assert httpx.get(url + "/metrics").json()["largest_batch"] > 1


@pytest.mark.slow
def test_compiled_server_answers_as_eager_generate(model_dir: Path) -> None:
    """`serve --compile true`: greedy answers decoded by the compiled static-cache step equal eager `generate_text`
    on the dynamic cache, and /metrics says which path decoded them."""
    with served(model_dir, "--api-key", KEY, "--backend", "torch", "--compile", "true") as (url, _):
        c = client(url)
        done = c.completions.create(model="m", prompt="how are you", max_tokens=10, temperature=0)
        assert done.choices[0].text == expected(model_dir, "how are you", 10, chat=False)
        chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello there"}],
                                         max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == expected(model_dir, "hello there", 12, chat=True)
        assert httpx.get(url + "/metrics").json()["paths"] == {"static+compiled": 2}


def test_errors_and_sigterm(server) -> None:
    url, proc = server
    headers = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(url + "/v1/chat/completions", headers=headers, json={"messages": [], "max_tokens": 4})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages" and set(bad.json()["error"]) == {"message", "type", "param",
                                                                                       "code"}
    bad = httpx.post(url + "/v1/completions", headers=headers, json={"prompt": "hi", "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    bad = httpx.post(url + "/v1/completions", headers=headers, content=b"{not json")
    assert bad.status_code == 400 and json.loads(bad.text)["error"]["type"] == "invalid_request_error"
    denied = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer wrong"}, json={"prompt": "hi"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def lora_adapter(folder: Path, model_dir: Path, trained: bool) -> Path:
    import torch

    from lmcraft import peft

    adapted = peft.apply(load_model(model_dir), {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    if trained:
        with torch.no_grad():
            for _, param in adapted.named_adapter_parameters():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    peft.save_adapter(adapted, folder, base_model_name_or_path=str(model_dir))
    return folder


def test_untrained_adapter_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zero = lora_adapter(tmp_path / "zero", model_dir, trained=False)
    assert main(["serve", str(model_dir), "--adapter", str(zero), "--port", "1"]) == 2
    assert "Refusing to serve" in capsys.readouterr().err


def test_adapter_served_and_full_queue_answers_429(model_dir: Path, tmp_path: Path) -> None:
    from lmcraft.serve.app import build_app

    adapter = lora_adapter(tmp_path / "lora", model_dir, trained=True)
    model, tokenizer, template = load_served_model(serve_args(str(model_dir), "--adapter", str(adapter)))
    want = generate_text(model, tokenizer, "hello", GenerationConfig(max_new_tokens=8)).texts[0]
    assert want != expected(model_dir, "hello", 8, chat=False)
    app = build_app(model, tokenizer, stop_token_ids(model, tokenizer), model_name="m", template=template,
                    api_key=None, max_queue=1, max_batch=4)
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0}

    async def scenario() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"] == want
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            waiting = asyncio.create_task(http.post("/v1/completions", json=body))  # no worker: it stays queued
            while not (await http.get("/metrics")).json()["queued"]:
                await asyncio.sleep(0.01)
            full = await http.post("/v1/completions", json=body)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            waiting.cancel()

    asyncio.run(scenario())
