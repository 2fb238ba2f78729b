"""The static decode path (`generate/static.py`): the same tokens as the dynamic-cache path, eager and compiled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmcraft.errors import ConfigError
from lmcraft.generate import GenerationConfig, generate
from lmcraft.generate.static import BUCKET, StaticKVCache, static_capacity

BATCH_1 = [[5, 6, 7, 8, 9, 10, 11]]
PADDED_3 = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13]]  # left-padded to width 5


def greedy(model: torch.nn.Module, prompts: list[list[int]], **settings: object):  # noqa: ANN201 - a result
    return generate(model, prompts, GenerationConfig(max_new_tokens=24, eos_token_ids=(), **settings))


@pytest.mark.parametrize("prompts", [BATCH_1, PADDED_3], ids=["batch1", "padded3"])
@pytest.mark.parametrize("fields", [{}, {"num_kv_heads": 2}, {"position": "learned", "mlp": "plain",
                                                             "norm": "layernorm", "activation": "gelu"}],
                         ids=["mha", "gqa", "gpt2-like"])
def test_static_eager_equals_dynamic_eager(tiny_model: Callable[..., torch.nn.Module], prompts: list[list[int]],
                                           fields: dict) -> None:
    model = tiny_model(vocab_size=97, **fields).eval()
    dynamic, static = greedy(model, prompts), greedy(model, prompts, cache="static")
    assert (dynamic.path, static.path) == ("dynamic", "static")
    assert static.tokens == dynamic.tokens


def test_static_step_logits_match_the_full_forward(tiny_model: Callable[..., torch.nn.Module]) -> None:
    """One static step's logits for each row equal the uncached forward over the row's whole (unpadded) sequence."""
    from lmcraft.generate.static import decode_step

    model = tiny_model(vocab_size=97, num_kv_heads=2).eval()
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    nxt = torch.tensor([9, 10])
    cache = StaticKVCache(model.config, 2, 64, torch.float32)
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        visible = torch.zeros(2, 64, dtype=torch.bool)
        visible[:, :4] = mask.bool()
        cache.start_decoding()
        logits = decode_step(model, nxt[:, None], positions[:, -1:] + 1, cache, visible)
        assert int(cache.index) == 5 and bool(visible[:, 4].all())
        for row, real in enumerate(([3, 4], [5, 6, 7, 8])):
            full = model(torch.tensor([[*real, int(nxt[row])]])).logits[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-5, rtol=1e-5)


def test_capacity_is_bucketed() -> None:
    assert static_capacity(5, 24) == BUCKET and static_capacity(BUCKET, 1) == 2 * BUCKET


def test_unsupported_models_decode_on_the_dynamic_cache(tiny_model: Callable[..., torch.nn.Module]) -> None:
    model = tiny_model(vocab_size=97, sliding_window=4).eval()
    assert greedy(model, BATCH_1, cache="static").path == "dynamic"


def test_compile_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="compile"):
        GenerationConfig(compile="yes")
    with pytest.raises(ConfigError, match="cache"):
        GenerationConfig(cache="paged")


def test_auto_stays_eager_when_compiling_does_not_pay(tiny_model: Callable[..., torch.nn.Module], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path))  # no recorded compile time: the typical 60 s applies
    model = tiny_model(vocab_size=97).eval()
    result = greedy(model, BATCH_1, compile="auto")
    assert result.path == "static"
    assert result.tokens == greedy(model, BATCH_1).tokens


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [BATCH_1, PADDED_3], ids=["batch1", "padded3"])
def test_compiled_greedy_equals_eager(tiny_model: Callable[..., torch.nn.Module], prompts: list[list[int]],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny_model(vocab_size=97, num_kv_heads=2).eval()
    compiled = greedy(model, prompts, compile=True)
    assert compiled.path == "static+compiled"
    assert compiled.tokens == greedy(model, prompts).tokens
    again = greedy(model, prompts, compile="auto")  # this shape is compiled now: auto uses it
    assert again.path == "static+compiled" and again.tokens == compiled.tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prompts", [BATCH_1, PADDED_3], ids=["batch1", "padded3"])
def test_cuda_graph_replay_gives_the_eager_tokens(tiny_model: Callable[..., torch.nn.Module],
                                                  prompts: list[list[int]], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the compiled step is captured as a CUDA graph per run and replayed: the eager tokens (fp32), again
    in a second run (a new cache, so a new capture, over the graph already compiled)."""
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny_model(vocab_size=97, num_kv_heads=2).to("cuda").eval()
    eager = greedy(model, prompts)
    for _ in range(2):
        replayed = greedy(model, prompts, compile=True)
        assert replayed.path == "static+compiled+cudagraph"
        assert replayed.tokens == eager.tokens


@pytest.mark.slow
def test_weights_fixed_compile_folds_weights_and_refuses_moved_ones(
        tiny_model: Callable[..., torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_fixed (generate, chat, serve): the CPU step compiled with the weights folded in (freezing,
    max_autotune) gives the eager tokens; once the weights move (an optimizer step) that model is refused, because
    its folded graph would keep the old weights."""
    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from lmcraft.generate import GenerationError

    model = tiny_model(vocab_size=97, num_kv_heads=2).eval()
    folded = greedy(model, PADDED_3, compile=True, weights_fixed=True)
    assert folded.path == "static+compiled" and folded.tokens == greedy(model, PADDED_3).tokens
    assert greedy(model, PADDED_3, compile=True, weights_fixed=True).tokens == folded.tokens  # compiled once
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    with pytest.raises(GenerationError, match="weights changed"):
        greedy(model, PADDED_3, compile=True, weights_fixed=True)
    assert greedy(model, PADDED_3).path == "dynamic"  # eager generation of the moved model still works


def test_stage_settings_pass_compile_through() -> None:
    from lmcraft.generation_settings import GenerationSettings, SamplingSettings

    assert GenerationConfig.from_settings(GenerationSettings()).compile == "auto"
    assert GenerationConfig.from_settings(SamplingSettings(compile=False), seed=1).compile is False
