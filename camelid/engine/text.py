"""Streaming text: incremental detokenisation and stop strings with partial-stop holdback."""

from __future__ import annotations


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Byte-level BPE splits multi-byte characters across tokens; a delta that ends in U+FFFD is
    held until the character completes (the approach of vLLM's detokenizer / HF's
    TextStreamer). Only a short window of recent tokens is decoded each step.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window that gives context to the next decode
        self.read = 0  # ids before this have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character becomes U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


def _borders(s: str) -> list[int]:
    """Knuth-Morris-Pratt's prefix function: entry i is the length of the longest proper prefix
    of s[: i + 1] that is also a suffix of it."""
    out, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = out[k - 1]
        if s[i] == s[k]:
            k += 1
        out[i] = k
    return out


class _StopMatcher:
    """One stop string matched over a stream of characters (Knuth-Morris-Pratt): `state` is the
    length of the longest prefix of the stop string that ends the text seen so far. Each
    character costs amortised O(1), so a whole answer costs O(its length) per stop string."""

    __slots__ = ("stop", "borders", "state")

    def __init__(self, stop: str):
        self.stop, self.borders, self.state = stop, _borders(stop), 0

    def push(self, ch: str) -> bool:
        """Take one character; True when it completes the stop string."""
        s, k = self.stop, self.state
        while k and s[k] != ch:
            k = self.borders[k - 1]
        if s[k] == ch:
            k += 1
        done = k == len(s)
        self.state = self.borders[k - 1] if done else k
        return done


def held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string
    (only the last len(stop) - 1 characters can be one; linear in the stop strings' length)."""
    best = 0
    for s in stops:
        m = _StopMatcher(s)
        for ch in text[max(0, len(text) - len(s) + 1):] if len(s) > 1 else "":
            m.push(ch)
        best = max(best, m.state)
    return best


class StopText:
    """Accumulates answer text; releases only what can no longer be the start of a stop string.

    feed() returns (delta to show, stopped). Once a stop string appears, the text is cut
    before it and nothing after it is ever shown; a stop string is never printed half. Only the
    unreleased tail is kept, and each stop string is matched incrementally, so an answer costs
    time linear in its length whatever the stop strings.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self._matchers = [_StopMatcher(s) for s in self.stops]
        self.held = ""  # text received but not yet released (a possible start of a stop string)
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped or not delta:
            return "", self.stopped
        if not self._matchers:
            return delta, False
        text, base = self.held + delta, len(self.held)
        cut = len(text) + 1  # earliest start of a stop string that completes in this delta
        for j, ch in enumerate(delta):
            for m in self._matchers:
                if m.push(ch):
                    cut = min(cut, base + j + 1 - len(m.stop))
        if cut <= len(text):
            self.stopped, self.held = True, ""
            return text[:cut], True
        keep = max(m.state for m in self._matchers)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def finish(self) -> str:
        """End of generation without a stop string: the held tail is real text after all."""
        out, self.held = self.held, ""
        return out
