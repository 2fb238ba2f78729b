"""Reports as Markdown and self-contained HTML: sections, paragraphs, tables, images, code blocks, plots.

    report = Report("Evaluation")
    report.section("gsm_symbolic")
    report.text("200 problems, seed 42.")
    report.table(["strategy", "accuracy"], [["zero_shot", 0.12]])
    report.image(plot_panels(out / "gsm.png", labels, [Panel("accuracy", values, low, high)]), "accuracy")
    report.code("lmcraft eval recipes/eval-smollm2-gsm.yaml", "sh")
    report.write(out / "report.md", out / "report.html")

Markdown links images by path relative to the Markdown file; HTML embeds them (base64), so the HTML file
can be mailed or attached on its own. Both files are written atomically. Numbers in tables are formatted
with `fmt` (default 4 significant digits).
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcraft.io import save_figure, write_text

__all__ = ["Panel", "Report", "format_cell", "plot_panels"]


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class _Block:
    kind: str  # section | text | table | image | code
    data: dict[str, Any] = field(default_factory=dict)


class Report:
    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[_Block] = []

    def section(self, title: str, level: int = 2) -> Report:
        self.blocks.append(_Block("section", {"title": title, "level": max(2, min(level, 6))}))
        return self

    def text(self, paragraph: str) -> Report:
        """A paragraph; `inline code` in backticks is kept as code in both formats."""
        self.blocks.append(_Block("text", {"text": paragraph}))
        return self

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Callable[[Any], str] = format_cell
    ) -> Report:
        cells = [[fmt(c) for c in row] for row in rows]
        bad = [i for i, row in enumerate(cells) if len(row) != len(headers)]
        if bad:
            raise ValueError(f"table rows {bad} do not have {len(headers)} cells")
        self.blocks.append(_Block("table", {"headers": list(headers), "rows": cells}))
        return self

    def image(self, path: str | Path, caption: str = "") -> Report:
        self.blocks.append(_Block("image", {"path": Path(path), "caption": caption}))
        return self

    def code(self, text: str, lang: str = "") -> Report:
        self.blocks.append(_Block("code", {"text": text.rstrip("\n"), "lang": lang}))
        return self

    # -------------------------------------------------------------------------------- markdown
    def to_markdown(self, base_dir: Path | None = None) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            d = b.data
            if b.kind == "section":
                out += ["#" * d["level"] + " " + d["title"], ""]
            elif b.kind == "text":
                out += [d["text"], ""]
            elif b.kind == "table":
                esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in [d["headers"], *d["rows"]]]
                out.append("| " + " | ".join(esc[0]) + " |")
                out.append("|" + "|".join("---" for _ in esc[0]) + "|")
                out += ["| " + " | ".join(row) + " |" for row in esc[1:]]
                out.append("")
            elif b.kind == "image":
                path = d["path"]
                link = os.path.relpath(path, base_dir) if base_dir is not None else str(path)
                out += [f"![{d['caption']}]({Path(link).as_posix()})", ""]
                if d["caption"]:
                    out += [f"*{d['caption']}*", ""]
            elif b.kind == "code":
                fence = "````" if "```" in d["text"] else "```"
                out += [fence + d["lang"], d["text"], fence, ""]
        return "\n".join(out).rstrip() + "\n"

    # -------------------------------------------------------------------------------- html
    @staticmethod
    def _inline(text: str) -> str:
        parts = re.split(r"(`[^`]+`)", text)
        return "".join(
            f"<code>{html.escape(p[1:-1])}</code>"
            if p.startswith("`") and p.endswith("`") and len(p) > 1
            else html.escape(p)
            for p in parts
        )

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            d = b.data
            if b.kind == "section":
                body.append(f"<h{d['level']}>{html.escape(d['title'])}</h{d['level']}>")
            elif b.kind == "text":
                body.append(f"<p>{self._inline(d['text'])}</p>")
            elif b.kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in d["headers"])
                rows = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in d["rows"]
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b.kind == "image":
                data = base64.b64encode(Path(d["path"]).read_bytes()).decode("ascii")
                cap = f"<figcaption>{html.escape(d['caption'])}</figcaption>" if d["caption"] else ""
                alt = html.escape(d["caption"])
                body.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>')
            elif b.kind == "code":
                body.append(f"<pre><code>{html.escape(d['text'])}</code></pre>")
        style = (
            "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
            "th{background:#f4f4f4}pre{background:#f6f8fa;padding:1em;overflow:auto}img{max-width:100%}"
            "figcaption{color:#666;font-size:90%}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )

    def write(self, markdown_path: str | Path, html_path: str | Path | None = None) -> None:
        md = Path(markdown_path)
        write_text(md, self.to_markdown(md.parent))
        if html_path is not None:
            write_text(Path(html_path), self.to_html())


@dataclass
class Panel:
    """One bar chart: a value per label, optional interval (low, high) drawn as error bars."""

    title: str
    values: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    ylabel: str = ""


def plot_panels(path: str | Path, labels: Sequence[str], panels: Sequence[Panel], title: str = "") -> Path:
    """Side-by-side bar charts sharing the x labels, saved as PNG (atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.9 * len(labels) + 2) * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    x = list(range(len(labels)))
    for ax, panel in zip(axes, panels, strict=True):
        err = None
        if panel.low is not None and panel.high is not None:
            err = [
                [max(0.0, v - lo) for v, lo in zip(panel.values, panel.low, strict=True)],
                [max(0.0, hi - v) for v, hi in zip(panel.values, panel.high, strict=True)],
            ]
        ax.bar(x, panel.values, yerr=err, capsize=4, color="#4C72B0")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path
