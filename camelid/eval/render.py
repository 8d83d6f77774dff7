"""Render the report's document model (a list of blocks) to self-contained HTML and to Markdown.

Blocks: ("h2"|"h3"|"p", text) · ("table", headers, rows) · ("img", name, png bytes or None) ·
("pre", title, text). Every text is escaped; images are embedded as base64 PNG in the HTML (one
file that opens offline) and linked as plots/<name>.png from the Markdown.
"""

from __future__ import annotations

import base64
import html

Block = tuple
"""("h2", text) | ("h3", text) | ("p", text) | ("table", headers, rows) | ("img", name, png|None) | ("pre", title, text)"""

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f3f3f3}td{white-space:pre-wrap}img{max-width:100%}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em}.PASS{color:#0a0;font-weight:bold}
.FAIL{color:#c00;font-weight:bold}"""


def to_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
             f"</head><body><h1>{e(title)}</h1>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h2", "h3", "p"):
            parts.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td class='{e(c)}'>{e(c)}</td>" if c in ("PASS", "FAIL")
                                            else f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            if b[2] is None:
                parts.append(f"<p>(no data for the {e(b[1])} plot)</p>")
            else:
                data = base64.b64encode(b[2]).decode()
                parts.append(f"<img alt='{e(b[1])}' id='plot-{e(b[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "pre":
            parts.append(f"<details><summary>{e(b[1])}</summary><pre>{e(b[2])}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(c: str) -> str:
    return str(c).replace("|", "\\|").replace("\n", "<br>")


def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        kind = b[0]
        if kind in ("h2", "h3"):
            lines += [f"{'#' * int(kind[1])} {b[1]}", ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
            lines.append("")
        elif kind == "img" and b[2] is not None:
            lines += [f"![{b[1]}](plots/{b[1]}.png)", ""]
        elif kind == "pre":
            lines += [f"<details><summary>{b[1]}</summary>", "", "```yaml", b[2].rstrip(), "```", "</details>", ""]
    return "\n".join(lines)
