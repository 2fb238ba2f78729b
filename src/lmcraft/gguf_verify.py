"""Check an exported GGUF against the model it came from: `lmcraft verify-export` and the end of every export.

Checks (a table; the export fails when a checked row is outside its tolerance):

* **file**: `gguf.GGUFReader` (gguf-py, an implementation lmcraft did not write) opens the file; architecture,
  block count and every tensor's name, type and shape are the ones the export writes for this model.
* **tokenizer**: the tokenizer rebuilt from the file's `tokenizer.ggml.*` metadata (`gguf_import.build_tokenizer`)
  gives the source tokenizer's ids on the probe and held-out texts.
* **logits**: the file is imported (`gguf_import`, dequantised to float32) and run on the probe text;
  `max |logit_gguf - logit_source| / max(1, max |logit_source|)` must stay under `LOGIT_TOLERANCE[type]`
  (F32 1e-4: only summation order differs; F16 1e-2 and BF16 5e-2: weight rounding of 2^-11 / 2^-8).
  For quantised files the logit difference is reported, not checked.
* **perplexity**: `exp(mean NLL)` of the held-out paragraph; `|ppl_gguf / ppl_source - 1|` must stay under
  `PPL_TOLERANCE[type]` (f32 0.1 %, f16/bf16 1 %, q8_0 2 %, q4_* 15 %).
* **llama.cpp** (when `llama_cpp` is importable; otherwise one row says it was skipped): the file run in llama.cpp
  (`generate.llamacpp_backend`). Greedy tokens: 16 tokens after the probe text, decoded by lmcraft's loop on
  llama.cpp's logits, must equal those of lmcraft's torch decoder on the imported file for f32/f16/bf16 (for
  quantised files the number of equal leading tokens is reported). Logits: as above, against the source model,
  reported only (llama.cpp keeps its KV cache in f16 and rounds activations in its f16/bf16/quantised matrix
  products: 2e-3 on an f32 tiny model). Perplexity: as above, from llama.cpp's logits.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.errors import LmcraftError

__all__ = ["LOGIT_TOLERANCE", "PPL_TOLERANCE", "Check", "format_table", "quant_of_file", "report", "verify_export"]

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew to the Moon and back!"
HELD_TEXT = (
    "Rivers carry water from the mountains to the sea. Along the way they shape valleys, feed forests and "
    "farms, and give towns a reason to grow on their banks. When the snow melts in spring, the water rises; "
    "in late summer it runs low and clear over the stones."
)
GREEDY_TOKENS = 16
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2}
PPL_TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 0.15, "q4_1": 0.15, "q4_k_m": 0.15}
_FILE_TYPE_QUANTS = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0", 2: "q4_0", 3: "q4_1", 15: "q4_k_m"}


@dataclass
class Check:
    name: str
    value: str
    limit: str
    status: str  # "ok" | "FAIL" | "info" | "skipped"

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def format_table(checks: list[Check]) -> str:
    rows = [("check", "value", "tolerance", "status"), *((c.name, c.value, c.limit, c.status) for c in checks)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows)


def report(checks: list[Check]) -> int:
    """Print the check table (and the failed checks on stderr); the exit code: 1 when any check failed, else 0."""
    import sys

    print(format_table(checks))
    failed = [c.name for c in checks if c.failed]
    if failed:
        print(f"verification FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def quant_of_file(metadata: dict[str, Any], path: Path) -> str:
    ftype = metadata.get("general.file_type")
    if ftype is None or int(ftype) not in _FILE_TYPE_QUANTS:
        raise LmcraftError(f"{path}: general.file_type {ftype} is not one lmcraft exports "
                           f"({', '.join(_FILE_TYPE_QUANTS.values())}); cannot choose tolerances.")
    return _FILE_TYPE_QUANTS[int(ftype)]


def _check_file(path: Path, source: Any, quant: str) -> Check:
    import gguf

    from lmcraft.gguf_export import expected_tensors

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    cfg = source.model.config
    problems = []
    block_count = reader.fields.get(f"{arch}.block_count")
    if block_count is None or block_count.contents() != cfg.num_layers:
        problems.append(f"{arch}.block_count is {block_count and block_count.contents()}, not {cfg.num_layers}")
    expected = expected_tensors(source.model, quant)
    found = {t.name: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in reader.tensors}
    for name in sorted(set(expected) | set(found)):
        want = (expected[name][0], tuple(expected[name][1])) if name in expected else None
        if want != found.get(name):
            problems.append(f"{name}: {found.get(name) or 'missing'} (expected {want or 'no such tensor'})")
    value = f"{len(found)} tensors, {arch}" if not problems else "; ".join(problems[:3])
    return Check("file (gguf.GGUFReader)", value, "names/types/shapes equal", "FAIL" if problems else "ok")


def _check_tokenizer(metadata: dict[str, Any], path: Path, tokenizer: Any) -> Check:
    from lmcraft.gguf_import import build_tokenizer

    rebuilt = build_tokenizer(metadata, path)
    for text in (PROBE_TEXT, HELD_TEXT):
        ours, theirs = rebuilt.encode(text).ids, tokenizer.encode(text)
        if ours != theirs:
            shorter = min(len(ours), len(theirs))
            at = next((i for i in range(shorter) if ours[i] != theirs[i]), shorter)
            return Check("tokenizer (from metadata)", f"ids differ at position {at}", "identical ids", "FAIL")
    return Check("tokenizer (from metadata)", "identical ids", "identical ids", "ok")


def _logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean over positions t of -log p(ids[t+1] | ids[..t])), from float64 log-softmax."""
    z = logits[:-1].astype(np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def _ppl_check(name: str, ppl: float, ref: float, quant: str) -> Check:
    rel = abs(ppl / ref - 1)
    limit = PPL_TOLERANCE[quant]
    return Check(name, f"{ppl:.4g} vs {ref:.4g} ({rel:+.2%})".replace("+", ""), f"<= {limit:.1%}",
                 "ok" if rel <= limit else "FAIL")


def _greedy(model: Any, ids: list[int]) -> list[int]:
    from lmcraft.generate import GenerationConfig, generate

    return generate(model, [ids], GenerationConfig(max_new_tokens=GREEDY_TOKENS, eos_token_ids=())).tokens[0]


def _llama_cpp_checks(path: Path, source: Any, imported: Any, probe: list[int], held: list[int], ref_logits: np.ndarray,
                      ref_ppl: float, quant: str) -> list[Check]:
    """The llama.cpp rows (see the module docstring)."""
    from lmcraft.generate.llamacpp_backend import LlamaCppModel, llama_cpp_available

    if not llama_cpp_available():
        return [Check("llama.cpp", "llama_cpp is not importable (pip install 'lmcraft[llamacpp]')", "-", "skipped")]
    llama = LlamaCppModel(path, source.model.config)
    try:
        ours, theirs = _greedy(imported, probe), _greedy(llama, probe)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
        exact = quant in LOGIT_TOLERANCE
        checks = [Check("llama.cpp greedy tokens (probe)", f"{same} of {len(ours)} equal to lmcraft's",
                        "all equal" if exact else "- (quantised)", ("ok" if same == len(ours) else "FAIL") if exact
                        else "info")]
        got = _logits(llama, probe)
        diff = float(np.abs(got - ref_logits).max()) / max(1.0, float(np.abs(ref_logits).max()))
        checks.append(Check("llama.cpp logits (probe)", f"{diff:.2e}", "- (info)", "info"))
        checks.append(_ppl_check("llama.cpp perplexity", _perplexity(_logits(llama, held), held), ref_ppl, quant))
    finally:
        llama.close()
    return checks


def verify_export(path: str | Path, source: Any) -> list[Check]:
    """The checks above for the GGUF at `path` against `source` (`gguf_export.Source`)."""
    from lmcraft.gguf_import import read_gguf, write_hf_model
    from lmcraft.hub import load_model

    path = Path(path)
    metadata, _ = read_gguf(path)  # structural checks with byte offsets first
    quant = quant_of_file(metadata, path)
    checks = [_check_file(path, source, quant), _check_tokenizer(metadata, path, source.tokenizer)]
    probe, held = source.tokenizer.encode(PROBE_TEXT), source.tokenizer.encode(HELD_TEXT)
    with tempfile.TemporaryDirectory(prefix="lmcraft-verify-") as tmp:
        write_hf_model(path, tmp, progress=False)
        imported = load_model(tmp, head="lm", dtype="float32")
    ref_logits, got = _logits(source.model, probe), _logits(imported, probe)
    scale = max(1.0, float(np.abs(ref_logits).max()))
    diff = float(np.abs(got - ref_logits).max()) / scale
    if quant in LOGIT_TOLERANCE:
        checks.append(Check("logits (probe), max rel diff", f"{diff:.2e}", f"<= {LOGIT_TOLERANCE[quant]:.0e}",
                            "ok" if diff <= LOGIT_TOLERANCE[quant] else "FAIL"))
    else:
        checks.append(Check("logits (probe), max rel diff", f"{diff:.2e}", "- (quantised)", "info"))
    ref_ppl = _perplexity(_logits(source.model, held), held)
    checks.append(_ppl_check("perplexity (held paragraph)", _perplexity(_logits(imported, held), held), ref_ppl,
                             quant))
    checks.extend(_llama_cpp_checks(path, source, imported, probe, held, ref_logits, ref_ppl, quant))
    return checks
