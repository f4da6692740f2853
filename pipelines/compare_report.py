"""The report of `make compare` as data (sections of paragraphs, tables and figures), rendered twice:
Markdown with its figures in `images/`, and one self-contained HTML page with every MLflow-provided
string escaped and every figure embedded, so the copy logged to MLflow opens on its own.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file under images/
    png: bytes
    caption: str


Block = str | Table | Image  # a str is a paragraph
Section = tuple[str, list[Block]]


def to_markdown(title: str, sections: list[Section]) -> str:
    def text(value: str) -> str:  # MLflow's strings as text, never as inline HTML
        return str(value).replace("<", "&lt;").replace(">", "&gt;")

    def cells(values: list[str]) -> str:
        return "| " + " | ".join(text(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines += [cells(block.headers), "|" + "---|" * len(block.headers), *map(cells, block.rows)]
            elif isinstance(block, Image):
                lines += [f"![{block.name}](images/{block.name})", "", f"*{text(block.caption)}*"]
            else:
                lines.append(text(block))
            lines.append("")
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
         "th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}"
         "th{background:#eef}img{max-width:100%}figcaption{font-size:13px;color:#555;max-width:60em}")  # fmt: skip


def to_html(title: str, sections: list[Section]) -> str:
    """A self-contained page: every string escaped, every figure embedded as a data: URL."""
    escape = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"]  # fmt: skip
    for heading, blocks in sections:
        parts.append(f"<h2>{escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{escape(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in block.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.png).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{escape(block.name)}'>"
                             f"<figcaption>{escape(block.caption)}</figcaption></figure>")  # fmt: skip
            else:
                parts.append(f"<p>{escape(block)}</p>")
    return "\n".join([*parts, "</body></html>\n"])


def write_report(folder: str, title: str, sections: list[Section]) -> None:
    """report.html, report.md and images/*.png into a local `folder`."""
    os.makedirs(os.path.join(folder, "images"))
    for block in (b for _, blocks in sections for b in blocks if isinstance(b, Image)):
        with open(os.path.join(folder, "images", block.name), "wb") as handle:
            handle.write(block.png)
    with open(os.path.join(folder, "report.md"), "w") as handle:
        handle.write(to_markdown(title, sections))
    with open(os.path.join(folder, "report.html"), "w") as handle:
        handle.write(to_html(title, sections))
