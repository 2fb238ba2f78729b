"""Distillation vs training on the data alone: a 4-layer student cut from SmolLM2-135M-Instruct, same data and steps.

    python docs/results/distill-smollm2.py [RUNS] [--report-only]   # RUNS default runs/distill-smollm2-compare

1. `kd`: `recipes/distill-smollm2.yaml` as it is (forward KL to the cached top-32 teacher, alpha = 0.5);
2. `ce`: the same with `distill.alpha=1` (cross-entropy on the text only, no teacher);
3. held-out perplexity (the student's CE on the held-out speech) at step 0 and every `eval_every` steps, as a table
   and RUNS/distill-smollm2.png (copied next to this script by hand when published).
A run whose summary.json exists is not run again; `--report-only` draws and tabulates what the runs logged so far.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECIPE = Path(__file__).parents[2] / "recipes" / "distill-smollm2.yaml"
RUNS = {"kd": [], "ce": ["distill.alpha=1"]}


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, held-out perplexity), step 0 = the start model."""
    start = json.loads((run / "start_eval.json").read_text())["eval_ppl"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(0, start)] + [(r["step"], r["eval_ppl"]) for r in rows if r["split"] == "eval" and "eval_ppl" in r]


def run(root: Path) -> int:
    from lmcraft.cli import main as cli

    for name, overrides in RUNS.items():
        out = root / name
        if not (out / "summary.json").is_file():
            args = [f"output_dir={out}", f"distill.teacher_cache={root / 'teacher-topk'}", *overrides]
            if cli(["distill", str(RECIPE), *args, "--no-progress"]) != 0:
                return 1
    return 0


def report(root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmcraft.io import save_figure

    curves = {name: curve(root / name) for name in RUNS}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = {"kd": "distilled (forward KL to top-32 teacher, alpha 0.5)", "ce": "data alone (CE)"}
    for name, points in curves.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=labels[name])
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out perplexity (SOTU 1800)")
    ax.set_title("4-layer student of SmolLM2-135M-Instruct")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, root / "distill-smollm2.png")
    by_step = {name: dict(points) for name, points in curves.items()}
    print("| step | " + " | ".join(RUNS) + " |\n|---|" + "---|" * len(RUNS))
    for step in sorted(set.intersection(*(set(p) for p in by_step.values()))):
        print(f"| {step} | " + " | ".join(f"{by_step[n][step]:.1f}" for n in RUNS) + " |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--report-only"]
    folder = Path(args[0]) if args else Path("runs/distill-smollm2-compare")
    if "--report-only" not in sys.argv and run(folder):
        sys.exit(1)
    report(folder)
