"""Expert load of a tiny Qwen3-MoE pre-trained with and without the load-balancing loss: the table and the plot.

    for c in 0 0.01 0.1; do lmcraft pretrain recipes/pretrain-moe-tiny.yaml model.overrides.router_aux_loss_coef=$c \\
        trainer.max_steps=300 trainer.eval_every=100 trainer.log_every=20 output_dir=runs/moe/coef-$c; done
    python docs/results/moe-tiny-balance.py runs/moe      # writes docs/results/moe-tiny-balance.{md,png}

Reads each run's `metrics.jsonl`: the last training interval's and the last evaluation's `expert_load/<e>` (the
fraction of the tokens' top-k assignments that went to expert e, mean over the MoE layers; 1/E each when balanced),
`aux_loss` (E sum_e f_e P_e, k when uniform) and loss; plots the training-split load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PUBLISH = Path(__file__).with_suffix(".md")


def last(run: Path, split: str) -> dict:
    """The run's last record of `split` with the keys of the train split (eval_ prefix dropped)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = [r for r in rows if r.get("split") == split][-1]
    return {k.removeprefix("eval_"): v for k, v in record.items()}


def table(evals: dict[float, dict], experts: list[int], split: str) -> str:
    header = f"| {split} | aux coef | step | loss | aux loss | " + " | ".join(f"e{e}" for e in experts) + " | max/min |"
    lines = [header, "|" + "---|" * (len(experts) + 6)]
    for coef, ev in evals.items():
        load = [ev[f"expert_load/{e}"] for e in experts]
        spread = max(load) / min(load) if min(load) > 0 else float("inf")
        lines.append(f"| {split} | {coef:g} | {ev['step']} | {ev['loss']:.3f} | {ev['aux_loss']:.3f} | "
                     + " | ".join(f"{x:.3f}" for x in load) + f" | {spread:.1f} |")
    return "\n".join(lines)


def main(root: Path) -> None:
    from lmcraft.io import save_figure, write_text

    runs = sorted((p for p in root.glob("coef-*") if p.is_dir()), key=lambda p: float(p.name.removeprefix("coef-")))
    evals = {float(r.name.removeprefix("coef-")): last(r, "eval") for r in runs}
    trains = {float(r.name.removeprefix("coef-")): last(r, "train") for r in runs}
    experts = sorted(int(k.rsplit("/", 1)[1]) for k in next(iter(evals.values())) if k.startswith("expert_load/"))
    text_table = table(trains, experts, "train") + "\n\n" + table(evals, experts, "eval")
    print(text_table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(evals)
    for j, (coef, ev) in enumerate(trains.items()):
        ax.bar([e + j * width for e in experts], [ev[f"expert_load/{e}"] for e in experts], width,
               label=f"aux coef {coef:g}")
    ax.axhline(1 / len(experts), color="grey", linestyle="--", linewidth=1, label="balanced (1/E)")
    ax.set(xlabel="expert", ylabel="share of routed tokens (train, last interval)",
           xticks=[e + 0.4 - width / 2 for e in experts], xticklabels=[str(e) for e in experts])
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, PUBLISH.with_suffix(".png"), dpi=100)
    text = PUBLISH.read_text() if PUBLISH.is_file() else ""
    start, end = "<!-- table -->", "<!-- /table -->"
    if start in text:
        text = text.split(start)[0] + f"{start}\n{text_table}\n{end}" + text.split(end)[1]
        write_text(PUBLISH, text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/moe"))
