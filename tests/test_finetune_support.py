"""Helpers for the fine-tuning tests (no tests here): a word-level tokenizer, tiny model folders, toy data.

Toy tasks that a 2-layer model learns in a few steps:
- sentiment: a sentence is `pos` when it holds more good words than bad ones;
- NER: `alice`/`bob` (+ `smith`) are persons, `paris`/`rome` locations, in BIO tags;
- regression: the number of good words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

GOOD = ["great", "fine", "nice", "superb"]
BAD = ["awful", "poor", "sad", "grim"]
FILLER = ["the", "a", "movie", "was", "and", "plot", "very", "in", "to", "went", "met"]
NAMES = ["alice", "bob"]
PLACES = ["paris", "rome"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = SPECIALS + GOOD + BAD + FILLER + NAMES + PLACES + ["smith"]


def write_tokenizer(folder: Path, encoder: bool) -> Path:
    """A whitespace word-level tokenizer; encoders wrap inputs as [CLS] a [SEP] (b [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"pad_token": "[PAD]", "unk_token": "[UNK]"}
    config.update({"cls_token": "[CLS]", "sep_token": "[SEP]"} if encoder else {"eos_token": "[SEP]"})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_model_folder(root: Path, arch: str = "bert", head: str | None = None, seed: int = 0) -> Path:
    """A 2-layer model with random weights saved in Hugging Face layout, with the toy tokenizer."""
    from lmcraft.hub import save_model
    from lmcraft.models import LanguageModel, preset

    folder = root / f"tiny-{arch}"
    if (folder / "config.json").is_file():
        return folder
    tok_dir = write_tokenizer(root / f"tok-{arch}", encoder=arch == "bert")
    small = dict(vocab_size=len(VOCAB), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=64, pad_token_id=0)
    if arch == "bert":
        cfg = preset("bert-tiny", **small)
    else:
        cfg = preset("llama-14m", **small, num_kv_heads=1, eos_token_id=3)
    torch.manual_seed(seed)
    save_model(LanguageModel(cfg, head or ("mlm" if arch == "bert" else "lm")), folder, tokenizer_dir=tok_dir)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        if good == bad:
            good += 1
        words = rng.sample(GOOD * 2, good) + rng.sample(BAD * 2, bad) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if good > bad else "neg", "score": float(good)})
    return rows


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 6)):
            r = rng.random()
            if r < 0.25:
                tokens.append(rng.choice(NAMES))
                tags.append("B-PER")
                if rng.random() < 0.5:
                    tokens.append("smith")
                    tags.append("I-PER")
            elif r < 0.4:
                tokens.append(rng.choice(PLACES))
                tags.append("B-LOC")
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quick_trainer(**overrides: object) -> dict:
    """Trainer settings for tests: CPU, no progress bar, no TensorBoard or plots."""
    return {"lr": 3e-3, "max_steps": 6, "micro_batch_size": 8, "device": "cpu", "progress": False,
            "tensorboard": False, "plot": False, "log_every": 2, **overrides}
