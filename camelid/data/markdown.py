"""Stack Exchange post HTML -> Markdown (markdownify), keeping what a language model should see.

- Code blocks become fenced code with the language the HTML names: `<pre><code class="lang-python">`,
  `<pre class="lang-haskell prettyprint-override">`, newer dumps' `language-python` classes, and the
  old `<!-- language: lang-js -->` / `<!-- language-all: ... -->` hints Stack Exchange put before a
  block (https://meta.stackexchange.com/q/184108).
- No Markdown escaping of `_`, `*` or `$`: Stack Exchange text is full of identifiers (`my_var`)
  and MathJax (`$x_1 * y$`), which must reach the model exactly as written.
- Entities are unescaped (BeautifulSoup does it while parsing) and runs of blank lines collapse to
  one, outside code blocks only, since blank lines inside code can be meaningful.
"""

from __future__ import annotations

import re

from markdownify import MarkdownConverter

_LANG_CLASS = re.compile(r"^(?:lang|language)-([\w+#.-]+)$")
_LANG_HINT = re.compile(r"<!--\s*language:\s*(?:lang-)?([\w+#.-]+)\s*-->(\s*)<pre", re.I)
_LANG_ALL_HINT = re.compile(r"<!--\s*language-all:\s*(?:lang-)?([\w+#.-]+)\s*-->", re.I)
_NO_LANG = {"none", "default", "text", "plaintext"}
_FENCE = re.compile(r"^\s*```")
_BLANKS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+\n")
_TRAILING_WS = re.compile(r"[ \t]+\n")


def _lang_of(el) -> str:
    """The language a `<pre>` names, on itself, its `<code>` child or a hint comment."""
    if el.get("data-lang"):
        lang = el["data-lang"]
        return "" if lang.lower() in _NO_LANG else lang
    nodes = [el] + ([el.code] if el.code is not None else [])
    for node in nodes:
        for cls in node.get("class") or []:
            m = _LANG_CLASS.match(cls)
            if m:
                return "" if m.group(1).lower() in _NO_LANG else m.group(1)
    return ""


class _Converter(MarkdownConverter):
    def convert_pre(self, el, text, parent_tags):  # noqa: D401 - markdownify hook
        out = super().convert_pre(el, text, parent_tags)
        # A fence inside the code would end the block early: use a longer fence, as CommonMark allows.
        if "```" in text:
            out = out.replace("```", "````", 1)[::-1].replace("```", "````", 1)[::-1]
        return out


def _collapse_blank_lines(md: str) -> str:
    """Collapse runs of blank lines to one, but leave fenced code blocks exactly as they are."""
    parts, buf, in_code = [], [], False
    for line in md.split("\n"):
        if _FENCE.match(line):
            chunk = "\n".join(buf)
            parts.append(chunk if in_code else _BLANKS.sub("\n\n", _TRAILING_WS.sub("\n", chunk)))
            buf, in_code = [], not in_code
            parts.append(line)
            continue
        buf.append(line)
    chunk = "\n".join(buf)
    parts.append(chunk if in_code else _BLANKS.sub("\n\n", _TRAILING_WS.sub("\n", chunk)))
    return "\n".join(parts).strip()


def html_to_markdown(html: str) -> str:
    """Convert one post body (HTML as stored in Posts.xml, already XML-unescaped) to Markdown."""
    if not html or not html.strip():
        return ""
    html = html.replace("\r\n", "\n").replace("\r", "\n")
    default_lang = ""
    m = _LANG_ALL_HINT.search(html)
    if m and m.group(1).lower() not in _NO_LANG:
        default_lang = m.group(1)
    html = _LANG_HINT.sub(r'\2<pre data-lang="\1"', html)
    md = _Converter(
        heading_style="ATX",
        bullets="-",
        code_language=default_lang,
        code_language_callback=_lang_of,
        escape_asterisks=False,
        escape_underscores=False,
        escape_misc=False,
    ).convert(html)
    return _collapse_blank_lines(md)
