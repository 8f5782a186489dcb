"""The HTML of ``kd report``: one self-contained page (inline style, PNGs as ``data:`` URIs, no script,
no external URL), tables, figures, and enough Markdown for ``comparison.md``."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kdcore import __version__
from kdcore.errors import KdError
from kdcore.formats import significant

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.2rem;margin:32px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:1rem;margin:18px 0 8px}
.sub{color:#5b6372;margin:0 0 18px;font-size:.9rem}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;font-size:.86rem}
th,td{border:1px solid #d8dce3;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:6px 12px 12px 0;background:#fff;border:1px solid #d8dce3;padding:8px}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.8rem;color:#5b6372;margin-top:4px}
pre{background:#fff;border:1px solid #d8dce3;padding:10px;overflow:auto;font-size:.8rem}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.badge{display:inline-block;border-radius:3px;padding:1px 7px;font-size:.78rem;background:#e3f1e5;color:#1c6b2a}
.badge.warn{background:#fbeed5;color:#8a5300}
nav a{margin-right:12px;font-size:.86rem;color:#2451a6}
details{margin:6px 0}.tw{overflow-x:auto;max-width:100%}
"""


# -- HTML ----------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(
                f'<td class="num">{esc(significant(value))}</td>'
                if numeric
                else f"<td>{esc(significant(value))}</td>"
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<div class="tw"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(data: bytes, caption: str) -> str:
    return (
        f'<figure><img src="{png_data_uri(data)}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole HTML document; ``sections`` are (anchor, heading, inner HTML)."""
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{inner}</section>' for a, h, inner in sections)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{esc(title)}</h1><p class="sub">{subtitle} · kdcore {esc(__version__)} · generated {esc(stamp)}</p>'
        f"<nav>{nav}</nav>{body}</main></body></html>\n"
    )


def render_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def read_json(path: Path) -> Any:
    """The file's JSON, None when it does not exist; a damaged file is an error, not a missing one."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdError(
            f"'{path}' is damaged, it is not valid JSON ({exc}); restore it, or remove it to report what "
            "is left"
        ) from None


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def inline(text: str) -> str:
    """Inline Markdown (``code``, **bold**, links) as HTML; links become their text: no external URLs."""
    text = esc(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1", text)


def markdown_cells_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, table_id: str | None = None
) -> str:
    """A table whose cells are inline Markdown, e.g. one :mod:`kdcore.compare.render` draws for comparison.md."""
    head = "".join(f"<th>{inline(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<div class="tw"><table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def markdown_to_html(text: str) -> str:
    """Enough Markdown for ``comparison.md``: headings, paragraphs, lists, pipe tables, code."""

    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre>{esc(chr(10).join(block))}</pre>")
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = min(len(m.group(1)) + 2, 6)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif line.strip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                    rows.append(cells)
                i += 1
            i -= 1
            if rows:
                head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
                body = "".join(
                    "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*]\s+", lines[i]):
                item = re.sub(r"^\s*[-*]\s+", "", lines[i])
                items.append(f"<li>{inline(item)}</li>")
                i += 1
            i -= 1
            out.append(f"<ul>{''.join(items)}</ul>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "".join(out)
