"""GGUF SentencePiece (`tokenizer.ggml.model = llama`) vocabularies: the BPE `build_tokenizer` makes from pieces and
scores must tokenize as llama.cpp's `llm_tokenizer_spm` does (llama-vocab.cpp), transcribed below as the reference:
the text is cut at control/user-defined tokens (longest first), each remaining stretch gets `▁` for spaces (and a
leading `▁` with add_space_prefix), then the adjacent pair whose concatenation is the highest-scoring piece is joined
(leftmost among equals) until none is a piece; what is left and not a piece falls back to `<0xNN>` byte pieces."""

from __future__ import annotations

import random

import pytest

from lmcraft.gguf_import import build_tokenizer, sentencepiece_merges

NORMAL, CONTROL, USER, BYTE = 1, 3, 4, 6
SPECIAL = [("<unk>", CONTROL), ("<s>", CONTROL), ("</s>", CONTROL), ("<tag>", USER), ("  ", USER)]
PIECES = ["▁", "t", "h", "e", "a", "n", "d", "i", "g", "r", "s", "o", "▁t", "he", "▁th", "▁the", "in", "an", "nd",
          "and", "▁a", "▁an", "▁and", "er", "ing", "▁in", "at", "▁at", "re", "he▁", "e▁", "ther", "▁o", "or", "ha",
          "hat", "▁that", "ee", "eee", "rs", "ers", "▁s"]


def vocabulary(shuffle_scores: bool) -> tuple[list[str], list[float], list[int]]:
    tokens = [t for t, _ in SPECIAL] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [k for _, k in SPECIAL] + [BYTE] * 256 + [NORMAL] * len(PIECES)
    scores = [0.0] * (len(SPECIAL) + 256) + [-float(i) for i in range(len(PIECES))]
    if shuffle_scores:  # scores need not follow the id order
        ranks = list(range(len(PIECES)))
        random.Random(1).shuffle(ranks)
        scores[len(SPECIAL) + 256:] = [-float(r) for r in ranks]
    return tokens, scores, types


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], types: list[int], prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenization (no BOS), as llama-vocab.cpp does it."""
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, k in zip(tokens, types, strict=True) if k in (CONTROL, USER)), key=len, reverse=True)
    fragments: list[str | int] = [text]
    for special in specials:  # tokenizer_st_partition: longest special first, cut every raw fragment at it
        out: list[str | int] = []
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            parts = frag.split(special)
            for k, part in enumerate(parts):
                if part:
                    out.append(part)
                if k < len(parts) - 1:
                    out.append(ids[special])
            fragments = out
        fragments = out
    result, prev_special = [], True
    for frag in fragments:
        if isinstance(frag, int):
            result.append(frag)
            prev_special = True
            continue
        symbols = list(((" " if prefix and prev_special else "") + frag).replace(" ", "▁"))
        prev_special = False
        while True:
            best = None
            for i in range(len(symbols) - 1):
                joined = symbols[i] + symbols[i + 1]
                if joined in ids and (best is None or scores[ids[joined]] > best[0]):
                    best = (scores[ids[joined]], i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for s in symbols:
            result.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])
    return result


def metadata(prefix: bool, shuffle_scores: bool) -> dict:
    tokens, scores, types = vocabulary(shuffle_scores)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": prefix}


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("shuffle_scores", [False, True])
def test_sentencepiece_vocabulary_tokenizes_as_llama_cpp(tmp_path, prefix: bool, shuffle_scores: bool) -> None:
    meta = metadata(prefix, shuffle_scores)
    tok = build_tokenizer(meta, tmp_path / "x.gguf")
    tokens, scores, types = vocabulary(shuffle_scores)
    rng = random.Random(0)
    words = ["the", "and", "that", "in", "at", "a", "ther", "eeee", "rs", "hers", " ", "  ", "   ", "<tag>", "</s>",
             "ñ", "東京", "\n", "x", "theand", "ingers"]
    samples = ["the and that", " leading space", "hello  there<tag>and </s>the", "ñandú 東京 😀"]
    samples += ["".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
                for _ in range(300)]
    for text in samples:
        expected = llama_cpp_spm(text, tokens, scores, types, prefix)
        assert tok.encode(text, add_special_tokens=False).ids == expected, text
        assert tok.encode(text).ids == [1, *expected]  # add_bos_token defaults to true for a llama vocabulary
        if not prefix or not any(s in text for s in ("<tag>", "</s>", "  ")):  # llama.cpp adds a ▁ after each
            assert tok.decode(expected, skip_special_tokens=False) == text


def test_merges_are_every_split_ranked_by_the_joined_piece() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc", "cab"]
    scores = [0.0, 0.0, 0.0, -3.0, -1.0, -2.0, -0.5]
    assert sentencepiece_merges(tokens, scores) == [("c", "ab"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def test_unknown_tokenizer_model_is_refused(tmp_path) -> None:
    from lmcraft.gguf_import import GGUFImportError

    with pytest.raises(GGUFImportError, match=r"tokenizer model 't5' is not supported.*'gpt2'.*'llama'"):
        build_tokenizer({**metadata(False, False), "tokenizer.ggml.model": "t5"}, tmp_path / "x.gguf")


def test_tied_scores_are_reported(tmp_path) -> None:
    """llama.cpp joins the leftmost of two equally scored pairs, a BPE the better-ranked one: a vocabulary whose
    normal pieces share scores may tokenize differently, and the import says so."""
    meta = metadata(False, False)
    scores = list(meta["tokenizer.ggml.scores"])
    scores[-1] = scores[-2]
    with pytest.warns(UserWarning, match="1 normal pieces share their score"):
        build_tokenizer({**meta, "tokenizer.ggml.scores": scores}, tmp_path / "x.gguf")
