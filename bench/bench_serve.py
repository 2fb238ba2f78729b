"""`lmcraft serve` throughput and latency through the official `openai` client.

    python -m bench.bench_serve [--model FOLDER_OR_ASSET] [--max-tokens 32] [--requests 32] [--backends torch,llamacpp]

Starts one server per backend (`lmcraft serve --backend B`) in a subprocess on a free local port, then for 1, 4 and
16 concurrent clients sends `--requests` greedy completion requests of `--max-tokens` tokens each (different prompts)
to each server in turn (the backends alternate at every concurrency level) and reports requests/s, generated
tokens/s, p50/p95 latency and the mean rows per decoded batch (from `GET /metrics`). Default model: the `llama-14m`
preset (random weights) with a byte-level BPE trained here on a paragraph, so the run needs no download.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import Table, fmt, machine

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type with an oil-based ink and a wooden screw press. Within a few decades printers worked in "
        "more than two hundred cities, and books became cheap enough for students, merchants and craftsmen.")


def tiny_folder(root: Path) -> Path:
    """The `llama-14m` preset (seed-0 random weights) sized to a byte-level BPE trained on TEXT, saved with it."""
    import torch

    from lmcraft.hub import save_model
    from lmcraft.models import LanguageModel, preset
    from lmcraft.tokenizer.train import DEFAULT_SPECIAL_TOKENS, save_tokenizer, train_tokenizer

    specials = DEFAULT_SPECIAL_TOKENS["bpe"]
    tok = train_tokenizer([TEXT] * 20, "bpe", vocab_size=400, special_tokens=specials, show_progress=False)
    save_tokenizer(tok, root / "tok", specials)
    torch.manual_seed(0)
    model = LanguageModel(preset("llama-14m", vocab_size=tok.get_vocab_size()))
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


def start_server(model: str, backend: str = "torch") -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "lmcraft", "serve", model, "--port", str(port),
                             "--max-batch", "16", "--backend", backend], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/metrics").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 10 minutes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or asset name (default: tiny random llama-14m)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--backends", default="torch", help="comma-separated: torch, llamacpp (default: torch)")
    args = parser.parse_args(argv)
    import httpx
    import openai

    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_folder(Path(tmp)))
        servers = {b: start_server(model, b) for b in backends}
        try:
            words = TEXT.split()

            def asker(url: str) -> Callable[[int], tuple[float, int]]:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

                def ask(i: int) -> tuple[float, int]:
                    start = time.perf_counter()
                    answer = client.completions.create(model="m", prompt=" ".join(words[i % 20: i % 20 + 8]),
                                                       max_tokens=args.max_tokens, temperature=0)
                    return time.perf_counter() - start, answer.usage.completion_tokens
                return ask

            asks = {b: asker(url) for b, (_, url) in servers.items()}
            for ask in asks.values():
                ask(0)  # warm-up
            print(machine(), flush=True)
            table = Table(["backend", "clients", "requests/s", "tokens/s", "p50 ms", "p95 ms", "rows/batch"])
            for clients in (1, 4, 16):
                for backend, (_, url) in servers.items():
                    before = httpx.get(url + "/metrics").json()
                    start = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        results = list(pool.map(asks[backend], range(args.requests)))
                    wall = time.perf_counter() - start
                    after = httpx.get(url + "/metrics").json()
                    latencies = sorted(t for t, _ in results)
                    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
                    rows = (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
                    table.add([backend, clients, fmt(len(results) / wall, 2), fmt(sum(n for _, n in results) / wall),
                               fmt(statistics.median(latencies) * 1000, 0), fmt(p95 * 1000, 0), fmt(rows, 1)])
            table.print()
        finally:
            codes = []
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                codes.append(proc.wait(timeout=60))
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
