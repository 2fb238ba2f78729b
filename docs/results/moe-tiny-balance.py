"""Expert load of a tiny Qwen3-MoE pre-trained with and without the load-balancing loss: the table and the plot.

    for c in 0 0.01 0.1; do lmcraft pretrain recipes/pretrain-moe-tiny.yaml model.overrides.router_aux_loss_coef=$c \\
        output_dir=runs/moe/coef-$c; done
    python docs/results/moe-tiny-balance.py runs/moe      # writes docs/results/moe-tiny-balance.{md,png}

Reads each run's `metrics.jsonl`: the last evaluation's `eval_expert_load/<e>` (the fraction of the held-out
tokens' top-k assignments that went to expert e, mean over the MoE layers; 1/E each when balanced) and
`eval_aux_loss` (E sum_e f_e P_e, k when uniform), and the final `eval_loss`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PUBLISH = Path(__file__).with_suffix(".md")


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "eval"][-1]


def main(root: Path) -> None:
    from lmcraft.io import save_figure, write_text

    runs = sorted(root.glob("coef-*"), key=lambda p: float(p.name.removeprefix("coef-")))
    evals = {float(r.name.removeprefix("coef-")): last_eval(r) for r in runs}
    experts = sorted(int(k.rsplit("/", 1)[1]) for k in next(iter(evals.values())) if k.startswith("eval_expert_load/"))
    header = "| aux coef | step | eval loss | eval aux loss | " + " | ".join(f"e{e}" for e in experts) + " | max/min |"
    lines = [header, "|" + "---|" * (len(experts) + 5)]
    for coef, ev in evals.items():
        load = [ev[f"eval_expert_load/{e}"] for e in experts]
        spread = max(load) / min(load) if min(load) > 0 else float("inf")
        lines.append(f"| {coef:g} | {ev['step']} | {ev['eval_loss']:.3f} | {ev['eval_aux_loss']:.3f} | "
                     + " | ".join(f"{x:.3f}" for x in load) + f" | {spread:.1f} |")
    table = "\n".join(lines)
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(evals)
    for j, (coef, ev) in enumerate(evals.items()):
        ax.bar([e + j * width for e in experts], [ev[f"eval_expert_load/{e}"] for e in experts], width,
               label=f"aux coef {coef:g}")
    ax.axhline(1 / len(experts), color="grey", linestyle="--", linewidth=1, label="balanced (1/E)")
    ax.set(xlabel="expert", ylabel="share of routed tokens (held-out)", xticks=[e + 0.4 - width / 2 for e in experts],
           xticklabels=[str(e) for e in experts])
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, PUBLISH.with_suffix(".png"), dpi=100)
    text = PUBLISH.read_text() if PUBLISH.is_file() else ""
    start, end = "<!-- table -->", "<!-- /table -->"
    if start in text:
        text = text.split(start)[0] + f"{start}\n{table}\n{end}" + text.split(end)[1]
        write_text(PUBLISH, text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/moe"))
