"""llama.cpp as the logit source of lmcraft's decode loop (`backend: llamacpp`).

`LlamaCppModel` holds a GGUF file in llama.cpp (through llama-cpp-python's bindings of llama.h; `llama_cpp` is
imported here only, when a model is opened) and answers the two questions lmcraft's code asks a model:

* as a decoder (`Generation` in `core.py`): `prefill(prompts)` then `step(tokens, active)` return the logits of
  each row's last position, `(rows, vocab)` float32. Rows are llama.cpp sequences (`seq_id` = row) of one
  context with a unified KV cache, decoded together by one `llama_decode` per step (llama.cpp's low-level batch
  API; the high-level `Llama` class decodes one sequence). Each row counts its own positions from 0, so a row
  computes what it would alone. Rows that have finished are left out of later steps.
* as a scorer (`ModelLM._score`, `gguf_verify`): `model(input_ids, attention_mask, logits_to_keep=k).logits`,
  the logits of the last `k` positions (all when 0) of each left-padded row, as the torch model returns them.

Token choice stays lmcraft's (`TokenChooser` on these logits), so greedy, temperature/top-k/top-p/min-p, the
repetition penalty, seeds, EOS ids and stop strings behave as with the torch backend; prompts are tokenised by
lmcraft's tokenizer and chat template and fed to llama.cpp as ids, so both backends see the same tokens.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcraft.errors import LmcraftError
from lmcraft.models.config import ModelConfig

__all__ = ["LlamaCppError", "LlamaCppModel", "llama_cpp_available"]

_N_BATCH = 512  # tokens per llama_decode call (also the micro-batch: n_ubatch)


class LlamaCppError(LmcraftError):
    """llama.cpp is missing, or refused the file or a batch."""


def llama_cpp_available() -> bool:
    """Whether `llama_cpp` (the `llamacpp` extra, llama-cpp-python) can be imported; nothing is imported here."""
    return importlib.util.find_spec("llama_cpp") is not None


_LIB: Any = None
_LOG_CALLBACK: Any = None  # kept alive: llama.cpp holds the pointer


def _lib() -> Any:
    """`llama_cpp`, imported once, with llama.cpp's log reduced to errors (printed on stderr)."""
    global _LIB, _LOG_CALLBACK
    if _LIB is None:
        try:
            import llama_cpp
        except ImportError as err:
            raise LlamaCppError(f"backend llamacpp needs llama-cpp-python ({err}); install it with "
                                "pip install 'lmcraft[llamacpp]' (see the README for CMAKE_ARGS).") from None

        @llama_cpp.llama_log_callback
        def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                print(text.decode("utf-8", "replace"), end="", file=sys.stderr)

        _LOG_CALLBACK = log
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _LIB = llama_cpp
    return _LIB


@dataclass
class _Output:
    logits: torch.Tensor


@dataclass
class _Span:
    """Tokens of one sequence to decode: `tokens` at positions `start..`, logits wanted from index `first_logit`."""

    seq: int
    tokens: Sequence[int]
    start: int
    first_logit: int


class LlamaCppModel:
    """A GGUF file opened in llama.cpp, with lmcraft's `config` of the same model (EOS ids, context length).

    `threads` defaults to torch's thread count, so both backends use the same cores.
    """

    device = torch.device("cpu")
    training = False

    def __init__(self, path: str | Path, config: ModelConfig, threads: int | None = None) -> None:
        lib = _lib()
        self.path = Path(path)
        self.config = config
        self.threads = threads or torch.get_num_threads()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise LlamaCppError(f"{self.path}: llama.cpp could not load this GGUF file (see its error above).")
        self.vocab_size = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self._ctx: Any = None
        self._ctx_size = (0, 0)  # (cells, sequences) of the current context
        self._batch = lib.llama_batch_init(_N_BATCH, 0, 1)
        self._lengths: list[int] = []  # tokens held per sequence (row) after the last decode

    # ----------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Free the context, the batch and the model (also done when the object is collected)."""
        lib = _LIB
        if lib is None or getattr(self, "_model", None) is None:
            return
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        lib.llama_batch_free(self._batch)
        lib.llama_model_free(self._model)
        self._model = None

    def __del__(self) -> None:
        if not sys.is_finalizing():  # at interpreter exit the bindings may already be gone; the OS frees all
            self.close()

    def eval(self) -> LlamaCppModel:
        return self

    def train(self, mode: bool = True) -> LlamaCppModel:
        if mode:
            raise LlamaCppError("a llama.cpp model cannot be trained; train the torch model and export it.")
        return self

    def __repr__(self) -> str:
        return f"LlamaCppModel({str(self.path)!r}, vocab={self.vocab_size}, threads={self.threads})"

    # ----------------------------------------------------------------------------------------- context
    def _context(self, cells: int, sequences: int) -> Any:
        """A context with room for `cells` KV entries over `sequences` sequences (grown, never shrunk), emptied."""
        lib = _lib()
        have_cells, have_seqs = self._ctx_size
        if self._ctx is None or cells > have_cells or sequences > have_seqs:
            if self._ctx is not None:
                lib.llama_free(self._ctx)
                self._ctx = None
            cells = max(cells, have_cells, 256)
            cells = 1 << (cells - 1).bit_length()
            sequences = max(sequences, have_seqs)
            params = lib.llama_context_default_params()
            params.n_ctx = cells
            params.n_batch = params.n_ubatch = _N_BATCH
            params.n_seq_max = sequences
            params.kv_unified = True  # one cache shared by all rows: a row may use whatever the others leave
            params.n_threads = params.n_threads_batch = self.threads
            params.no_perf = True
            self._ctx = lib.llama_init_from_model(self._model, params)
            if not self._ctx:
                raise LlamaCppError(f"llama.cpp could not create a context of {cells} cells for {sequences} rows.")
            self._ctx_size = (cells, sequences)
        else:
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        return self._ctx

    def _decode(self, spans: Sequence[_Span]) -> list[np.ndarray]:
        """Decode the spans (in chunks of `_N_BATCH` tokens); per span, its logits from `first_logit` on,
        `(len(tokens) - first_logit, vocab)` float32."""
        lib = _lib()
        batch = self._batch
        flat = [(k, j) for k, span in enumerate(spans) for j in range(len(span.tokens))]
        out = [np.empty((len(s.tokens) - s.first_logit, self.vocab_size), np.float32) for s in spans]
        for begin in range(0, len(flat), _N_BATCH):
            chunk = flat[begin:begin + _N_BATCH]
            batch.n_tokens = len(chunk)
            for i, (k, j) in enumerate(chunk):
                span = spans[k]
                batch.token[i] = span.tokens[j]
                batch.pos[i] = span.start + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = span.seq
                batch.logits[i] = j >= span.first_logit
            code = lib.llama_decode(self._ctx, batch)
            if code != 0:
                raise LlamaCppError(f"llama_decode returned {code} (1: no room in the KV cache of "
                                    f"{self._ctx_size[0]} cells; negative: an error llama.cpp printed above).")
            for i, (k, j) in enumerate(chunk):
                if j >= spans[k].first_logit:
                    row = lib.llama_get_logits_ith(self._ctx, i)
                    out[k][j - spans[k].first_logit] = np.ctypeslib.as_array(row, shape=(self.vocab_size,))
        return out

    # ----------------------------------------------------------------------------------------- decoder
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        """Start a decode of `prompts` (one sequence each, room for `max_new_tokens` more tokens per row);
        the logits of each prompt's last token, `(rows, vocab)`."""
        self._context(sum(len(p) for p in prompts) + len(prompts) * max_new_tokens, len(prompts))
        spans = [_Span(r, p, 0, len(p) - 1) for r, p in enumerate(prompts)]
        self._lengths = [len(p) for p in prompts]
        self._last = torch.from_numpy(np.concatenate(self._decode(spans)))
        return self._last.clone()

    def step(self, tokens: Sequence[int], active: Sequence[bool]) -> torch.Tensor:
        """Append `tokens[r]` to every active row; the next logits, `(rows, vocab)` (an inactive row repeats its
        last logits, which the caller ignores)."""
        rows = [r for r, a in enumerate(active) if a]
        spans = [_Span(r, [tokens[r]], self._lengths[r], 0) for r in rows]
        for r, logits in zip(rows, self._decode(spans), strict=True):
            self._last[r] = torch.from_numpy(logits[0])
            self._lengths[r] += 1
        return self._last.clone()

    # ----------------------------------------------------------------------------------------- scorer
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, **_: Any) -> _Output:
        """The torch model's forward for scoring: `(B, W)` left-padded ids -> `.logits` `(B, K, vocab)` of the last
        `K = logits_to_keep` positions (all `W` when 0); padded positions get zeros. `position_ids` are implied
        (each row counts its real tokens from 0), as in the torch model."""
        ids = input_ids.tolist()
        mask = attention_mask.tolist() if attention_mask is not None else [[1] * len(row) for row in ids]
        width = len(ids[0])
        keep = logits_to_keep or width
        rows = [[t for t, m in zip(row, ms, strict=True) if m] for row, ms in zip(ids, mask, strict=True)]
        self._context(sum(len(r) for r in rows), len(rows))
        spans = [_Span(r, row, 0, max(0, len(row) - keep)) for r, row in enumerate(rows)]
        logits = torch.zeros(len(rows), keep, self.vocab_size)
        for r, got in enumerate(self._decode(spans)):
            logits[r, keep - len(got):] = torch.from_numpy(got)
        return _Output(logits)
