"""Text augmentation for fine-tuning data: EDA operations, sentence reordering, back-translation.

EDA (Wei & Zou 2019, "Easy Data Augmentation"): for a sentence of n words and strength alpha,
- synonym replacement: replace max(1, alpha n) non-stop-words with a WordNet synonym;
- random insertion: insert a synonym of a random word at a random position, max(1, alpha n) times;
- random swap: swap two random words, max(1, alpha n) times;
- random deletion: delete each word with probability p (at least one word is kept).
Sentence reordering shuffles the sentences of a document. Every augmented copy is drawn from a
`random.Random` seeded with BLAKE2b(seed, document id, copy number), so results do not depend on
worker count or order.

Lexicon: Princeton WordNet 3.0 database files as shipped by Debian's `wordnet-base` package
(`apt-get install wordnet-base`, files in /usr/share/wordnet; licence: the WordNet 3.0 licence,
BSD-like). We read `data.{noun,verb,adj,adv}` directly (format: wndb(5WN)): lemmas in one synset
are synonyms. No NLTK corpus download is needed. Any {word: [synonyms]} mapping works too.

Back-translation (Sennrich et al. 2016): `back_translate(texts, generate)` asks any generation
callable `generate(prompts: list[str]) -> list[str]` to translate into a pivot language and back, producing
paraphrases; `data/back_translation.py` is the prepare step that does it with lmcraft models.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

from lmcraft.errors import ConfigError

__all__ = [
    "Augment",
    "back_translate",
    "load_wordnet",
    "random_deletion",
    "random_insertion",
    "random_swap",
    "sentence_reorder",
    "split_sentences",
    "synonym_replacement",
]

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
Op = Literal["synonym", "insert", "swap", "delete", "reorder"]

_STOP = frozenset(
    "a an the and or but if of at by for with about against between into through during before after above below to "
    "from up down in out on off over under again further then once here there when where why how all any both each "
    "few more most other some such no nor not only own same so than too very s t can will just don should now i me "
    "my we our you your he him his she her it its they them their what which who whom this that these those am is "
    "are was were be been being have has had having do does did doing".split()
)
_SENT = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    """Split at whitespace that follows . ! or ? (a light rule; abbreviations split too)."""
    return [s for s in _SENT.split(text.strip()) if s]


@lru_cache(maxsize=4)
def load_wordnet(directory: str = DEFAULT_WORDNET_DIR) -> dict[str, tuple[str, ...]]:
    """{lemma: synonyms} from WordNet `data.*` files (multi-word lemmas use spaces, lower-case)."""
    root = Path(directory).expanduser()
    files = [root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise ConfigError(
            f"WordNet database not found in {root} (expected data.noun, data.verb, data.adj, data.adv). "
            "Install Debian's wordnet-base (apt-get install wordnet-base) or set lexicon: to the folder."
        )
    synonyms: dict[str, set[str]] = {}
    for path in files:
        with open(path, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):  # licence header
                    continue
                parts = line.split(" ", 4 + 2 * 256)
                count = int(parts[3], 16)
                lemmas = {re.sub(r"\([a-z]+\)$", "", parts[4 + 2 * i]).replace("_", " ").lower() for i in range(count)}
                if len(lemmas) > 1:
                    for lemma in lemmas:
                        synonyms.setdefault(lemma, set()).update(lemmas - {lemma})
    return {k: tuple(sorted(v)) for k, v in synonyms.items()}


def _count(alpha: float, n: int) -> int:
    return max(1, int(alpha * n))


Lexicon = Mapping[str, tuple[str, ...]]
_EDGE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


def _core(word: str) -> tuple[str, str, str]:
    """(leading punctuation, word, trailing punctuation), so "day." is looked up as "day"."""
    m = _EDGE.match(word)
    assert m is not None
    return m.group(1), m.group(2), m.group(3)


def _has_synonym(word: str, lexicon: Lexicon) -> bool:
    core = _core(word)[1].lower()
    return bool(core) and core not in _STOP and bool(lexicon.get(core))


def synonym_replacement(words: list[str], lexicon: Lexicon, n: int, rng: random.Random) -> list[str]:
    """Replace up to n distinct non-stop-words that have synonyms (punctuation and capitals kept)."""
    out = list(words)
    candidates = [i for i, w in enumerate(words) if _has_synonym(w, lexicon)]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        pre, core, post = _core(out[i])
        choice = rng.choice(lexicon[core.lower()])
        out[i] = pre + (choice[:1].upper() + choice[1:] if core[:1].isupper() else choice) + post
    return out


def random_insertion(words: list[str], lexicon: Lexicon, n: int, rng: random.Random) -> list[str]:
    """Insert a synonym of a random word at a random position, n times (fewer if no word has one)."""
    out = list(words)
    pool = [_core(w)[1].lower() for w in words if _has_synonym(w, lexicon)]
    for _ in range(n if pool else 0):
        out.insert(rng.randint(0, len(out)), rng.choice(lexicon[rng.choice(pool)]))
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def sentence_reorder(text: str, rng: random.Random) -> str:
    sentences = split_sentences(text)
    rng.shuffle(sentences)
    return " ".join(sentences)


def _rng(seed: int, doc_id: str, copy: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}\0{doc_id}\0{copy}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


@dataclass
class Augment:
    """Add `copies` augmented versions of each document; copy k applies ops[k % len(ops)]."""

    name: ClassVar[str] = "augment"
    kind: ClassVar[str] = "augment"
    ops: list[Op] = field(default_factory=lambda: ["synonym", "insert", "swap", "delete"])
    copies: int = 4
    alpha: float = 0.1
    lexicon: str = DEFAULT_WORDNET_DIR
    seed: int = 0
    keep_original: bool = True
    __pydantic_config__ = {"extra": "forbid"}  # pydantic reads this: unknown keys in a config are errors

    def _lexicon(self) -> Lexicon:
        return load_wordnet(self.lexicon) if {"synonym", "insert"} & set(self.ops) else {}

    def apply(self, text: str, op: Op, rng: random.Random) -> str:
        if op == "reorder":
            return sentence_reorder(text, rng)
        words = text.split()
        n = _count(self.alpha, len(words))
        if op == "synonym":
            words = synonym_replacement(words, self._lexicon(), n, rng)
        elif op == "insert":
            words = random_insertion(words, self._lexicon(), n, rng)
        elif op == "swap":
            words = random_swap(words, n, rng)
        else:
            words = random_deletion(words, self.alpha, rng)
        return " ".join(words)

    def __call__(self, text: str, doc_id: str) -> list[tuple[str, str]]:
        """[(suffix, text)] of the versions to emit: ("", original) first unless `keep_original` is off."""
        out = [("", text)] if self.keep_original else []
        for k in range(self.copies):
            op = self.ops[k % len(self.ops)]
            out.append((f"#aug{k}-{op}", self.apply(text, op, _rng(self.seed, doc_id, k))))
        return out


_DEFAULT_TEMPLATE = "Translate the following text from {source} to {target}. Reply with the translation only.\n\n{text}"


def back_translate(
    texts: list[str],
    generate: Callable[[list[str]], list[str]],
    pivot: str = "French",
    source: str = "English",
    template: str = _DEFAULT_TEMPLATE,
    generate_back: Callable[[list[str]], list[str]] | None = None,
) -> list[str]:
    """Paraphrase by translating source -> pivot with `generate` and pivot -> source with `generate_back` (default:
    `generate`), two batched calls."""
    forward = generate([template.format(source=source, target=pivot, text=t) for t in texts])
    if len(forward) != len(texts):
        raise ValueError(f"generate returned {len(forward)} outputs for {len(texts)} prompts")
    backward = (generate_back or generate)([template.format(source=pivot, target=source, text=t.strip())
                                            for t in forward])
    if len(backward) != len(texts):
        raise ValueError(f"generate returned {len(backward)} outputs for {len(texts)} prompts")
    return [t.strip() for t in backward]
