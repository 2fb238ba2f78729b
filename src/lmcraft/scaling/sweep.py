"""What a finished sweep's runs give the fits: one row per run (N, D, C = 6ND, final loss, evaluation curve,
probe), the laws the rows allow (law selection), the capability probe of each run, and the result summary.

Law selection: L(N) when only the size varies, L(D) when only the token budget does, L(N, D) when both do, and
L(C) over the compute frontier (`pareto_frontier`) of every run's evaluation curve.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.errors import ConfigError
from lmcraft.io import read_json
from lmcraft.scaling.laws import (
    FitError,
    JointFit,
    PowerLawFit,
    compute_optimal,
    fit_joint,
    fit_power_law,
    pareto_frontier,
    training_flops,
)
from lmcraft.scaling.probe import ClozeItem, score_cloze, speaker_cloze
from lmcraft.scaling.sections import FitSection, ProbeSection

__all__ = ["FinishedRun", "fit_laws", "probe_items", "probe_runs", "read_curve", "run_probe", "run_row", "short_tokens",
           "sweep_result"]

Fits = dict[str, PowerLawFit | JointFit | str]  # law key -> fit, or the reason it was not fitted


def short_tokens(tokens: int) -> str:
    """A token count as a short run-name suffix: 2M, 1.5G, 640."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= size and tokens % (size // 10) == 0:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, eval_loss) of every evaluation in the run's metrics.jsonl."""
    import json

    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("split") == "eval" and "eval_loss" in rec:
            out.append((int(rec["step"]), float(rec["eval_loss"])))
    return out


@dataclass
class FinishedRun:
    """A finished pre-training run of the sweep: its name, folder, summary.json, and tokens per optimizer step."""

    name: str
    folder: Path
    summary: dict[str, Any]
    tokens_per_step: int


def run_row(run: FinishedRun, embeddings: bool, probe: dict[str, Any] | None) -> dict[str, Any]:
    """One finished run: N (parameters, with or without embeddings), D = steps x tokens per step, C = 6ND, its
    losses and timings, its evaluation curve in (D, C, loss) points, and its probe score."""
    from lmcraft.hub import load_config

    summary = run.summary
    mcfg = load_config(Path(summary["final"]))
    n = mcfg.num_parameters(include_embeddings=embeddings)
    tokens = summary["steps"] * run.tokens_per_step
    curve = [(step * run.tokens_per_step, loss) for step, loss in read_curve(run.folder) if step > 0]
    return {
        "name": run.name,
        "hidden_size": mcfg.hidden_size,
        "num_layers": mcfg.num_layers,
        "params": n,
        "params_total": mcfg.num_parameters(include_embeddings=True),
        "tokens": tokens,
        "flops": float(training_flops(n, tokens)),
        "steps": summary["steps"],
        "eval_loss": summary["eval"].get("eval_loss"),
        "train_loss": summary["final_train_loss"],
        "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "curve": [{"tokens": d, "flops": float(training_flops(n, d)), "eval_loss": loss} for d, loss in curve],
        "probe": probe,
        "output_dir": str(run.folder),
    }


def fit_laws(rows: list[dict[str, Any]], fit: FitSection) -> Fits:
    """Each law the rows allow (module docstring) as a fit object, or the reason it was not fitted (a string)."""
    opts = {"fit_loss": fit.loss, "huber_delta": fit.huber_delta, "bootstrap": fit.bootstrap, "n_boot": fit.n_boot,
            "level": fit.level, "seed": fit.seed}
    done = [r for r in rows if r["eval_loss"] is not None]
    n = np.array([r["params"] for r in done], dtype=float)
    d = np.array([r["tokens"] for r in done], dtype=float)
    loss = np.array([r["eval_loss"] for r in done], dtype=float)
    fits: Fits = {}
    jobs: dict[str, Any] = {}
    if len(set(d)) == 1:
        jobs["N"] = lambda: fit_power_law(n, loss, variable="N", **opts)
    elif len(set(n)) == 1:
        jobs["D"] = lambda: fit_power_law(d, loss, variable="D", **opts)
    else:
        jobs["NxD"] = lambda: fit_joint(n, d, loss, **opts)
    points = [(p["flops"], p["eval_loss"]) for r in done for p in r["curve"]]
    if points:
        c, y = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        keep = pareto_frontier(c, y)
        jobs["C"] = lambda: fit_power_law(c[keep], y[keep], variable="C", **opts)
    for key, job in jobs.items():
        try:
            fits[key] = job()
        except FitError as err:
            fits[key] = str(err)
    return fits


def sweep_result(rows: list[dict[str, Any]], fits: Fits, reference: dict[str, Any] | None) -> dict[str, Any]:
    """The content of scaling.json: runs, fits, laws not fitted, the probe reference, and with L(N, D) the
    compute-optimal split at the sweep's largest compute."""
    result = {"runs": rows, "fits": {k: v.to_dict() for k, v in fits.items() if not isinstance(v, str)},
              "not_fitted": {k: v for k, v in fits.items() if isinstance(v, str)}, "probe_reference": reference}
    joint = fits.get("NxD")
    if isinstance(joint, JointFit):
        top = max(r["flops"] for r in rows)
        n_opt, d_opt = compute_optimal(joint, top)
        result["compute_optimal_at_max_flops"] = {"flops": top, "params": float(n_opt), "tokens": float(d_opt)}
    return result


def probe_items(probe: ProbeSection, tokenizer_dir: Path, packed: Path, split: str) -> list[ClozeItem]:
    """Next-speaker items from the held-out documents (the `split` of the packed data in `packed`, decoded)."""
    from lmcraft.data.datasets import PackedCorpus
    from lmcraft.tokenizer.load import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    candidates = [packed.parent if packed.is_file() else packed, packed / "packed"]
    folder = next((c for c in candidates if (c / "index.json").is_file()), candidates[-1])
    corpus = PackedCorpus(folder, split)
    texts = [tok.decode(corpus.tokens(d).tolist(), skip_special_tokens=True) for d in range(len(corpus))]
    items = speaker_cloze(texts, probe.items, probe.options, probe.context_chars, probe.seed)
    if len(items) < 10:
        raise ConfigError(f"the probe found {len(items)} next-speaker items in the {len(texts)} held-out documents "
                          f"of {folder} (split {split!r}); it needs play scripts (a speaker line "
                          "such as 'HAMLET.' opening each speech), whole plays as documents (data.text_mode: "
                          "file) and enough held-out text (data.val_fraction). Set probe: null to skip it")
    return items


def run_probe(probe: ProbeSection, items: list[ClozeItem], model: Path | str, progress: bool,
              max_length: int | None = None) -> dict[str, Any]:
    """Accuracy of `model` on the items, with its 95% Wilson interval (contexts cut to `max_length` tokens)."""
    from lmcraft.evaluate import wilson_interval
    from lmcraft.prompting.model_lm import ModelLM

    lm = ModelLM.load(model, dtype="float32", batch_size=probe.batch_size, max_length=max_length,
                      progress=progress)
    picks = score_cloze(lm, items)
    correct = sum(int(p == it.answer) for p, it in zip(picks, items, strict=True))
    low, high = wilson_interval(correct, len(items))
    return {"task": "next_speaker", "items": len(items), "correct": correct, "accuracy": correct / len(items),
            "low": low, "high": high, "chance": 1.0 / probe.options}


def probe_runs(probe: ProbeSection, runs: list[FinishedRun], packed: Path, split: str, seq_len: int,
               out: Path, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Score every run's final model (the first run's tokenizer and `packed` data give the items)
    and `probe.reference`; returns the per-run scores and the reference's. Items go to OUT/probe_items.json,
    scores to RUN/probe.json and OUT/probe_reference.json, and a rerun reads the scores already there."""
    from lmcraft.io import write_json

    items = probe_items(probe, Path(runs[0].summary["final"]), packed, split)  # the final model has the tokenizer
    write_json(out / "probe_items.json", [vars(it) for it in items])
    scores = []
    for run in runs:
        path = run.folder / "probe.json"
        if not path.is_file():
            write_json(path, run_probe(probe, items, Path(run.summary["final"]), progress, max_length=seq_len))
        scores.append(read_json(path))
    if probe.reference is None:
        return scores, None
    ref_path = out / "probe_reference.json"
    reference = read_json(ref_path) if ref_path.is_file() else None
    wanted = min(probe.reference_items, len(items))
    if reference is None or (reference["model"], reference["items"]) != (probe.reference, wanted):
        print(f"scaling: probe reference {probe.reference}", file=sys.stderr)
        reference = {"model": probe.reference, **run_probe(probe, items[:wanted], probe.reference, progress)}
        write_json(ref_path, reference)
    return scores, reference
