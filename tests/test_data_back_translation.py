"""The prepare stage's back_translate step on a tiny lmcraft model with a LoRA adapter: each paraphrase is exactly
what lmcraft's decoder answers to the two translation prompts, one document at a time; the data library gets its
decoder only through the stage's wiring; the output is the same with worker processes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
import zstandard

from conftest import build_tiny_model, save_chat_tokenizer
from lmcraft.cli import main
from lmcraft.config import load_config
from lmcraft.data.back_translation import BackTranslate, DecoderSpec, TextGenerator
from lmcraft.data.pipeline import build_steps
from lmcraft.errors import ConfigError
from lmcraft.stages.prepare import PrepareConfig

WORDS = "the cat sat on a mat with one red hat and two dogs ran far away from home today".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."


@pytest.fixture(scope="module")
def translator(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny causal LM with the chatml template, and a LoRA adapter moved away from its init."""
    import torch

    from lmcraft import peft
    from lmcraft.hub import save_model

    root = tmp_path_factory.mktemp("bt")
    rng = random.Random(0)
    vocab = save_chat_tokenizer(root / "tok", [_sentence(rng) for _ in range(200)], 200)
    save_model(build_tiny_model(vocab_size=vocab, max_position_embeddings=256), root / "lm", tokenizer_dir=root / "tok")
    model = peft.apply(build_tiny_model(vocab_size=vocab, max_position_embeddings=256),
                       {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    peft.save_adapter(model, root / "adapter")
    return {"lm": root / "lm", "adapter": root / "adapter"}


def _reference(folder: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> str:
    """One greedy chat reply, one prompt at a time (no batch, no padding)."""
    from lmcraft.generate import GenerationConfig
    from lmcraft.generate.text import generate_text
    from lmcraft.hub import load_model
    from lmcraft.peft import load_adapter
    from lmcraft.tokenizer.load import load_tokenizer

    model = load_model(folder)
    model = (load_adapter(model, adapter) if adapter is not None else model).eval()
    result = generate_text(model, load_tokenizer(folder), [prompt], GenerationConfig(max_new_tokens=max_new_tokens),
                           chat=True)
    return result.texts[0]


def _parts(folder: Path) -> list[dict]:
    lines: list[str] = []
    for part in sorted((folder / "parts").glob("*.jsonl.zst")):
        lines += zstandard.ZstdDecompressor().decompress(part.read_bytes()).decode().splitlines()
    return [json.loads(line) for line in lines if line]


@pytest.mark.slow
def test_back_translate_step_is_the_decoders_round_trip(translator: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(5)
    docs = [_sentence(rng) for _ in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    step = {"type": "back_translate", "model": str(translator["lm"]), "adapter": str(translator["adapter"]),
            "back_adapter": str(translator["adapter"]), "pivot": "German", "max_new_tokens": 12, "batch_size": 2}
    config = tmp_path / "bt.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(tmp_path / "in.jsonl")], "output": str(tmp_path / "w1"),
                                      "chunk_docs": 3, "steps": [step]}))
    assert main(["prepare", str(config), "--no-progress"]) == 0
    rows = _parts(tmp_path / "w1")

    expected = []
    for doc in docs:
        pivot = _reference(translator["lm"], translator["adapter"], f"Translate from English to German.\n{doc}", 12)
        back = _reference(translator["lm"], translator["adapter"],
                          f"Translate from German to English.\n{pivot.strip()}", 12).strip()
        expected += [("", doc)] + ([("#bt-german", back)] if back and back != doc else [])
    originals = {r["id"]: r["text"] for r in rows if "#" not in r["id"]}
    assert [("#bt-german" if "#" in r["id"] else "", r["text"]) for r in rows] == expected
    assert all(r["id"].removesuffix("#bt-german") in originals for r in rows)
    assert any(r["id"].endswith("#bt-german") for r in rows)

    # spawned worker processes unpickle the stage's loader and open the models themselves: the same output
    assert main(["prepare", str(config), "output=" + str(tmp_path / "w2"), "--workers", "2", "--no-progress"]) == 0
    assert _parts(tmp_path / "w2") == rows


def test_back_translate_options_and_decoder(translator: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"inputs": ["x.txt"], "output": "o", "steps": [
        {"type": "back_translate", "model": "m", "pivto": "German"}, {"type": "back_translate", "model": "m",
                                                                       "template": "{text}"}]}))
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, path)
    assert "unknown key 'steps.0.pivto'. Did you mean 'pivot'?" in str(err.value)
    assert "key 'steps.1': template must contain {source}" in str(err.value)
    (step,) = build_steps([{"type": "back_translate", "model": str(translator["lm"])}])
    assert isinstance(step, BackTranslate) and step.kind == "augment"
    with pytest.raises(ConfigError, match="no decoder: run it through `lmcraft prepare`"):
        step.batch(["a text"], ["id"])
    recipe = load_config(PrepareConfig, Path(__file__).parents[1] / "recipes" / "prepare-back-translation.yaml")
    step = build_steps(recipe.steps)[-1]
    assert (step.name, step.pivot, step.adapter, step.back_adapter) == (
        "back_translate", "French", "runs/smollm2/translation/final", None)


OPENED: list[DecoderSpec] = []


def _case_loader(spec: DecoderSpec) -> TextGenerator:
    """A stand-in decoder that records what it opened: with an adapter it upper-cases the text after the prompt's
    instruction line, without one it capitalises it."""
    OPENED.append(spec)
    if spec.adapter is not None:
        return lambda prompts: [p.split("\n", 1)[1].upper() for p in prompts]
    return lambda prompts: [p.split("\n", 1)[1].capitalize() for p in prompts]


def test_back_translate_versions_and_the_way_back() -> None:
    OPENED.clear()
    (step,) = build_steps([{"type": "back_translate", "model": "m", "adapter": "a", "keep_original": False}])
    step.use_generator(_case_loader)
    assert step.batch(["Good day.", "hello"], ["1", "2"]) == [
        [("", "Good day.")],  # the round trip gave the text back: no paraphrase, the original stays
        [("#bt-french", "Hello")],  # keep_original off: the paraphrase alone
    ]
    assert [(s.model, s.adapter) for s in OPENED] == [("m", "a"), ("m", None)]  # the way back: no adapter
    step.batch(["y"], ["3"])
    assert len(OPENED) == 2  # the models open once per process
