"""The data-preparation report: a markdown table per step and PNG charts, from run statistics.

`stats` is the dict that `lmcraft prepare` writes to `stats.json`: input documents/bytes, input
errors, per-step {docs_in, docs_out, bytes_in, bytes_out, modified, reasons, histogram, tally, examples}, kept
examples, the corpus' licences, what it was decontaminated against, and optionally the packed token counts.
Charts: `report.png` (documents and MB in/out per step, removals by reason), `report-scores.png` (the score
histogram of each scoring step, when there is one) and `report-examples.png` (kept documents beside the first
documents each step removed).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from lmcraft.io import save_figure, write_text

__all__ = ["render_markdown", "write_report"]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def render_markdown(
    stats: dict[str, Any], title: str = "Data preparation report", images: dict[str, str] | None = None,
    max_reasons: int = 10,
) -> str:
    """Markdown: inputs, a per-step table (documents and MB in/out), the `max_reasons` most frequent
    removal reasons of each step (the rest summed), score histograms, kept and removed examples, input errors,
    packed tokens; `images` ({caption: file}) are linked at the end."""
    lines = [f"# {title}", ""]
    lines.append(
        f"Input: {stats['docs_read']:,} documents, {_mb(stats['bytes_read'])} MB from {stats['files']} file(s)"
        + (f", shard {stats['shard']}" if stats.get("shard") else "")
        + "."
    )
    lines.append(f"Output: {stats['docs_written']:,} documents, {_mb(stats['bytes_written'])} MB.")
    lines += [
        "",
        "## Steps",
        "",
        "| step | docs in | docs out | removed | MB in | MB out | modified |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for st in stats["steps"]:
        removed = sum(st["reasons"].values())
        lines.append(
            f"| {st['name']} | {st['docs_in']:,} | {st['docs_out']:,} | {removed:,} | {_mb(st['bytes_in'])} "
            f"| {_mb(st['bytes_out'])} | {st['modified']:,} |"
        )
    reasons = []
    for st in stats["steps"]:
        ranked = sorted(st["reasons"].items(), key=lambda x: (-x[1], x[0]))
        reasons += [(st["name"], r, n) for r, n in ranked[:max_reasons]]
        if len(ranked) > max_reasons:
            rest = ranked[max_reasons:]
            reasons.append((st["name"], f"({len(rest)} other reasons)", sum(n for _, n in rest)))
    if reasons:
        lines += ["", "## Removal reasons", "", "| step | reason | documents |", "|---|---|---:|"]
        lines += [f"| {s} | {r} | {n:,} |" for s, r, n in reasons]
    lines += _score_sections(stats)
    lines += _example_sections(stats)
    errors = stats.get("errors", {})
    lines += ["", "## Input errors", ""]
    if errors.get("counts"):
        lines += ["| kind | records |", "|---|---:|"]
        lines += [f"| {k} | {n:,} |" for k, n in errors["counts"].items()]
        lines += ["", "First examples:", ""]
        lines += [f"- `{path}`, {where}: {what}" for path, where, what in errors.get("examples", [])]
    else:
        lines.append("None.")
    packed = stats.get("packed")
    if packed:
        lines += ["", "## Packed tokens", "", f"dtype {packed['dtype']}, vocabulary {packed['vocab_size']:,}.", ""]
        lines += ["| split | documents | sentences | tokens | shards |", "|---|---:|---:|---:|---:|"]
        for name, sp in packed["splits"].items():
            lines.append(
                f"| {name} | {sp['documents']:,} | {sp['sentences']:,} | {sp['tokens']:,} | {len(sp['shards'])} |"
            )
    for caption, file in (images or {}).items():
        lines += ["", f"![{caption}]({file})"]
    return "\n".join(lines) + "\n"


def _bin(edges: list[float], i: int) -> str:
    if i == 0:
        return f"< {edges[0]:g}"
    if i == len(edges):
        return f">= {edges[-1]:g}"
    return f"[{edges[i - 1]:g}, {edges[i]:g})"


def _score_sections(stats: dict[str, Any], max_items: int = 50) -> list[str]:
    """Score histograms of annotate steps, the corpus' licences, and the contaminated eval items."""
    lines: list[str] = []
    for st in stats["steps"]:
        hist = st.get("histogram")
        if hist and sum(hist["counts"]):
            lines += ["", f"## Scores: {st['name']}", "", "| score | documents |", "|---|---:|"]
            lines += [f"| {_bin(hist['edges'], i)} | {n:,} |" for i, n in enumerate(hist["counts"]) if n]
    if stats.get("licences"):
        lines += ["", "## Licences", "", "| licence | documents | MB |", "|---|---:|---:|"]
        lines += [f"| {name} | {e['documents']:,} | {_mb(e['bytes'])} |" for name, e in stats["licences"].items()]
    for check in stats.get("decontamination", []):
        lines += ["", f"## Decontamination ({check['step']}: {check['n']}-grams, {check['action']})", "",
                  "| eval set | items | unchecked (short) | contaminated items | fingerprint |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| {s['name']} | {s['items']:,} | {s['unchecked_items']:,} | {s['contaminated_items']:,} "
                  f"| `{s['fingerprint'][:16]}` |" for s in check["sets"]]
        found = [(s["name"], item, n) for s in check["sets"] for item, n in s["contaminated"].items()]
        if found:
            lines += ["", "| contaminated item | training documents |", "|---|---:|"]
            lines += [f"| {item} | {n:,} |" for _, item, n in found[:max_items]]
            if len(found) > max_items:
                lines.append(f"| ({len(found) - max_items} more in stats.json) | |")
    return lines


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_id(doc_id: str) -> str:
    """A document id without its folders (`/data/a/speech.txt#3` -> `speech.txt#3`)."""
    return doc_id.rsplit("/", 1)[-1]


def _scores(meta: dict[str, Any]) -> str:
    """The numeric metadata of a document (model scores), `key=value` joined."""
    return ", ".join(f"{k}={v:g}" for k, v in meta.items() if isinstance(v, int | float) and not isinstance(v, bool))


def _example_sections(stats: dict[str, Any], width: int = 160) -> list[str]:
    """Kept documents (spread over the run) and the first documents each step removed, one line each."""
    kept = stats.get("kept_examples", [])
    removed = [(st["name"], ex) for st in stats["steps"] for ex in st.get("examples", [])]
    if not kept and not removed:
        return []
    lines = ["", "## Kept and removed examples", "", "| | step: reason | id | scores | start of the text |",
             "|---|---|---|---|---|"]
    esc = str.maketrans({"|": "\\|", "<": "&lt;", ">": "&gt;"})

    def row(kind: str, where: str, ex: dict[str, Any], score: str) -> str:
        text = _one_line(ex["text"], width).translate(esc)
        return f"| {kind} | {where} | `{_short_id(ex['id'])}` | {score} | {text} |"

    lines += [row("kept", "", ex, _scores(ex.get("meta", {}))) for ex in kept]
    lines += [row("removed", f"{name}: {ex['reason']}", ex, "" if ex.get("score") is None else f"{ex['score']:.4g}")
              for name, ex in removed]
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_scores(stats: dict[str, Any], path: Path) -> bool:
    """One bar chart per scoring step: documents per score bin. False (nothing written) without scores."""
    steps = [st for st in stats["steps"] if st.get("histogram") and sum(st["histogram"]["counts"])]
    if not steps:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4), squeeze=False)
    for ax, st in zip(axes[0], steps, strict=True):
        edges, counts = st["histogram"]["edges"], st["histogram"]["counts"]
        labels = [_bin(edges, i) for i in range(len(counts))]
        ax.bar(range(len(counts)), counts, color="tab:blue")
        ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("score")
        ax.set_ylabel("documents")
        removed = sum(st["reasons"].values())
        ax.set_title(f"{st['name']}: {sum(counts):,} scored, {removed:,} removed")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


def _plot_examples(stats: dict[str, Any], path: Path, chars: int = 300, width: int = 60) -> bool:
    """Kept documents (left) beside the first documents each step removed (right), as wrapped text."""
    kept = stats.get("kept_examples", [])
    removed = [(st["name"], ex) for st in stats["steps"] for ex in st.get("examples", [])]
    if not kept and not removed:
        return False

    def box(header: str, text: str) -> str:
        body = textwrap.fill(_one_line(text, chars), width)
        return f"{header}\n{body}"

    left = [box(f"{_short_id(ex['id'])}  {_scores(ex.get('meta', {}))}", ex["text"]) for ex in kept]
    right = [box(f"{name}: {ex['reason']}" + ("" if ex.get("score") is None else f" ({ex['score']:.4g})")
                 + f"  {_short_id(ex['id'])}", ex["text"]) for name, ex in removed]
    rows = max(len(left), len(right))
    plt = _pyplot()
    fig, axes = plt.subplots(rows, 2, figsize=(16, 1.9 * rows + 0.6), squeeze=False)
    for col, (items, colour, title) in enumerate(((left, "#e6f4e6", "kept"), (right, "#fbe4e4", "removed"))):
        axes[0][col].set_title(title, fontsize=14)
        for row in range(rows):
            ax = axes[row][col]
            ax.set_axis_off()
            if row < len(items):
                ax.text(0.0, 1.0, items[row], va="top", ha="left", fontsize=8, family="monospace", wrap=False,
                        transform=ax.transAxes, bbox={"facecolor": colour, "edgecolor": "none", "pad": 4})
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return True


def _plot(stats: dict[str, Any], path: Path) -> None:
    plt = _pyplot()

    steps = stats["steps"]
    names = [s["name"] for s in steps]
    reasons = sorted(((f"{s['name']}:{r}", n) for s in steps for r, n in s["reasons"].items()), key=lambda x: x[1])
    reasons = reasons[-20:]  # the 20 largest
    fig, axes = plt.subplots(1, 3, figsize=(16, max(4.0, 0.35 * max(len(names), len(reasons)) + 1.5)))
    y = range(len(names))
    for ax, key, unit, scale in ((axes[0], "docs", "documents", 1.0), (axes[1], "bytes", "MB", 1e6)):
        ax.barh([i + 0.2 for i in y], [s[f"{key}_in"] / scale for s in steps], height=0.4, label="in")
        ax.barh([i - 0.2 for i in y], [s[f"{key}_out"] / scale for s in steps], height=0.4, label="out")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(f"{unit} in / out per step")
        ax.legend()
    if reasons:
        axes[2].barh([r for r, _ in reasons], [n for _, n in reasons], color="tab:red")
        axes[2].set_title("removed, by reason (top 20)")
        axes[2].set_xlabel("documents")
        if reasons[-1][1] > 100 * reasons[0][1]:
            axes[2].set_xscale("log")  # one dominant reason would hide the others
        for y, (_, n) in enumerate(reasons):
            axes[2].annotate(f"{n:,}", (n, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "nothing removed", ha="center", va="center")
        axes[2].set_axis_off()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_report(stats: dict[str, Any], out_dir: str | Path, title: str = "Data preparation report") -> Path:
    """Write `report.md` and its charts (`report.png`, and `report-scores.png`, `report-examples.png` when
    there are scores or examples) into `out_dir`; returns the markdown path."""
    out = Path(out_dir)
    _plot(stats, out / "report.png")
    images = {"per-step counts": "report.png"}
    if _plot_scores(stats, out / "report-scores.png"):
        images["score histograms"] = "report-scores.png"
    if _plot_examples(stats, out / "report-examples.png"):
        images["kept and removed examples"] = "report-examples.png"
    md = out / "report.md"
    write_text(md, render_markdown(stats, title, images=images))
    return md
