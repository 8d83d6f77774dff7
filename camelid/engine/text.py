"""Streaming text: incremental detokenisation and stop strings with partial-stop holdback."""

from __future__ import annotations

from dataclasses import dataclass, field


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


def held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class StopText:
    """Accumulates answer text; releases only what can no longer be the start of a stop string.

    feed() returns (delta to show, stopped). Once a stop string appears, the text is cut
    before it and nothing after it is ever shown; a stop string is never printed half.
    """

    stops: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = False
    _scan_from: int = field(default=0, repr=False)

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped or not delta:
            return "", self.stopped
        self.text += delta
        if self.stops:
            longest = max(len(s) for s in self.stops)
            start = max(0, self._scan_from - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text)), True
            self._scan_from = len(self.text)
        return self._release(len(self.text) - held_suffix(self.text, self.stops)), False

    def finish(self) -> str:
        """End of generation without a stop string: the held tail is real text after all."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out
