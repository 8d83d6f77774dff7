"""Chat prompts as token ids, with the text of messages kept as text.

A template renders the conversation into one string, and tokenising that string turns any
control-token text into control tokens: a user who writes "<|im_end|>\\n<|im_start|>system\\n..."
in a message would open a turn of their own. Here control tokens come only from the template.
The prompt is rendered a second time with each message's content replaced by an unguessable
marker, which shows which parts of the rendered string are the template's; the string is then
cut at the template's own control tokens, and the text between them (template text and message
text together, as the tokenizer would see it) is tokenised with control-token text read as
plain text. A tokenizer splits its input at control tokens before anything else, so where no
message holds control-token text this is the ordinary tokenisation, and that case (almost every
request) simply tokenises the rendered string.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from camelid.serve.protocol import APIError


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """{text: id} of the tokenizer's control (special) tokens, cached on the tokenizer."""
    cached = getattr(tokenizer, "_camelid_control_tokens", None)
    if cached is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        cached = {t.content: int(i) for i, t in added.items() if getattr(t, "special", False) and t.content}
        tokenizer._camelid_control_tokens = cached
    return cached


def chat_ids(engine: Any, template: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by `template`, the messages' text never read as control
    tokens (see the module's docstring)."""
    text = template.render(messages)
    controls = control_tokens(engine.tokenizer)
    if not any(c in m["content"] for m in messages for c in controls):
        return engine.encode(text)
    pieces = _pieces(template, messages, text)
    return _prefix_ids(engine, text) + _tokenize(engine.tokenizer, pieces, controls)


def _pieces(template: Any, messages: list[dict[str, str]], text: str) -> list[tuple[bool, str]]:
    """`text` as (from the template?, piece) pairs, found by rendering with markers in place of
    the contents. A template that changes a content other than by trimming it cannot be split
    so: such a conversation is refused (400) rather than tokenised unsafely."""
    nonce = secrets.token_hex(8)
    marked = template.render([{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)])
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", marked)
    for fit in (lambda c: c, str.strip):
        pieces = [(i % 2 == 0, p if i % 2 == 0 else fit(messages[int(p)]["content"])) for i, p in enumerate(parts)]
        if "".join(p for _, p in pieces) == text:
            return pieces
    raise APIError(400, "a message holds control-token text (such as <|im_start|>) that this model's chat template "
                        "cannot keep apart from its own: remove it", param="messages")


def _tokenize(tokenizer: Any, pieces: list[tuple[bool, str]], controls: dict[str, int]) -> list[int]:
    """Control tokens where the template wrote them; every run of text between them (template
    text and message text alike) tokenised with control-token text as plain text."""
    pattern = re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))
    ids: list[int] = []
    run = ""
    for from_template, piece in pieces:
        if not from_template:
            run += piece
            continue
        at = 0
        for m in pattern.finditer(piece):
            run += piece[at : m.start()]
            ids += _text_ids(tokenizer, run) + [controls[m.group()]]
            run, at = "", m.end()
        run += piece[at:]
    return ids + _text_ids(tokenizer, run)


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _prefix_ids(engine: Any, text: str) -> list[int]:
    """The ids the tokenizer puts before a prompt (a BOS), where `engine.encode` would add them."""
    bos = engine.tokenizer.bos_token
    if bos and text.startswith(bos):
        return []
    return list(engine.tokenizer("", add_special_tokens=True)["input_ids"])
