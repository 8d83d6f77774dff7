"""The torch generation engine: batched, streaming, KV-cached, with per-request sampling.

Chat, the server, evaluation and PPO rollouts call it (or the llama.cpp backend: both implement
`backend.Backend` and share its driver loop and per-token finish logic). It wraps any Hugging Face causal LM
(a peft model too) and drives the decode loop itself, so that each request in a batch has its
own sampling parameters, stop strings, seed and length, and so that requests can join a
running batch (continuous batching: `Batch.add`) and leave it when they finish or are
cancelled.

Layout: left padding with an attention mask and explicit position ids, so a prompt's logits do
not depend on what it is batched with (batched greedy == single greedy).

Failures stay with the row that caused them: a row whose parameters or text handling raise ends
alone with finish_reason "error" (its Delta carries the exception) while the others go on. A
failure of the shared forward pass leaves the shared cache in an unknown state; `Batch.rebuild`
then recomputes each row alone from its own tokens, so only a row that fails by itself ends.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from camelid.engine.backend import (  # noqa: F401 - Completion, Delta, raise_row_errors: the engine's names too
    BackendBase,
    BatchBase,
    Completion,
    Delta,
    Row,
    emit,
    end_delta,
    new_row,
    prompt_ids,
    raise_row_errors,
    sample,
)
from camelid.engine.sampling import SamplingParams

log = logging.getLogger("camelid.engine")
DEFAULT_MAX_CONTEXT = 2048


class Engine(BackendBase):
    """Generation over a loaded model. `Engine.load(...)` resolves and loads one by name."""

    def __init__(self, model, tokenizer, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
        cfg = getattr(model, "config", None)
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", 0) or DEFAULT_MAX_CONTEXT)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.cache_kw = cache_kwarg(model)
        self.fast = None
        if os.environ.get("CAMELID_FAST_PATH", "1") != "0":
            from camelid import cpu

            self.fast = cpu.fast_forward(model)

    @classmethod
    def load(cls, model=None, device: str = "auto", dtype: str = "auto", load_8bit: bool = False, max_context: int | None = None) -> "Engine":
        from camelid.models.load import load_for_inference

        lm, tok, path = load_for_inference(model, device=device, dtype=dtype, load_8bit=load_8bit)
        engine = cls(lm, tok, max_context=max_context)
        engine.name = str(model or path.name)
        engine.path = path
        return engine

    def forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0, hidden: list | None = None) -> torch.Tensor:
        """Logits for the last `logits_to_keep` positions, through the fast path where it applies.

        With a list as `hidden`, the LM head's input (B, T', H) is appended to it (on the model's
        own forward, by a hook on the output embeddings: any architecture)."""
        if self.fast is not None:
            return self.fast(input_ids, attention_mask, position_ids, cache, logits_to_keep, hidden)
        if hidden is not None:
            from camelid.models.lora import unwrap

            handle = unwrap(self.model).get_output_embeddings().register_forward_hook(lambda m, args, out: hidden.append(args[0]))
            try:
                return self.forward(input_ids, attention_mask, position_ids, cache, logits_to_keep)
            finally:
                handle.remove()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=logits_to_keep, **{self.cache_kw: cache})
        return out.logits

    # ---- generation ----------------------------------------------------------------------
    def new_batch(self) -> "Batch":
        return Batch(self)


class Batch(BatchBase):
    """A running batch: rows share one KV cache; rows may join (add) and leave (finish/cancel)."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self.next_pos: torch.Tensor | None = None  # (B,) position of the next token
        self.next_tokens: torch.Tensor | None = None  # (B,) last sampled token, fed next step
        self.seen: torch.Tensor | None = None  # (B, V) for repetition penalty, built lazily

    # Prefill new requests, then merge them into the running batch.
    def add(self, ids: list[int], prompts, params: list[SamplingParams]) -> Iterator[list[Delta]]:
        """Prefill the prompts (one shared forward), merge them into the batch, yield each one's
        first token. A row whose own setup fails (e.g. its seed) ends with an error delta."""
        toks = prompt_ids(self.engine, prompts, params)
        new_rows = [new_row(self.engine, rid, t, sp, self.on_row) for rid, t, sp in zip(ids, toks, params)]
        yield self._prefill(new_rows, toks)

    def _prefill(self, new_rows: list[Row], toks: list[list[int]]) -> list[Delta]:
        """One forward over `toks` (left padded), merge `new_rows` in, sample their next token.

        A prompt that comes several times (n answers to one question) runs once; its rows share
        copies of its cache and logits."""
        eng = self.engine
        params = [r.params for r in new_rows]
        input_ids, mask, inverse = distinct_left_padded(toks, eng.pad_id, eng.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        hidden = [] if any(sp.return_hidden for sp in params) else None
        logits = eng.forward(input_ids, mask, pos, cache, logits_to_keep=1, hidden=hidden)
        if len(input_ids) < len(toks):
            idx = torch.tensor(inverse, device=eng.device)
            input_ids, mask, pos, logits = input_ids[idx], mask[idx], pos[idx], logits[idx]
            select_cache_rows(cache, idx)
            if hidden:
                hidden[0] = hidden[0][idx]
        seen = None
        if any(sp.repetition_penalty != 1.0 for sp in params):
            seen = torch.zeros((len(toks), logits.shape[-1]), dtype=torch.bool, device=eng.device)
            seen.scatter_(1, input_ids, mask.bool())
        self._merge(new_rows, cache, mask, pos[:, -1] + 1, seen)
        return self._emit(logits[:, -1], first=len(self.rows) - len(new_rows), hidden=hidden[0][:, -1] if hidden else None)

    def _merge(self, rows, cache, mask, next_pos, seen) -> None:
        """Append prefilled rows. Every new tensor is built before any is assigned, so a failure
        here (out of memory) leaves the batch as it was."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_pos = rows, cache, mask, next_pos
            self.seen = seen
            return
        width = max(self.mask.shape[1], mask.shape[1])
        kv = [(torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)]),
               torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)]))
              for old, new in zip(self.cache.layers, cache.layers)]
        merged_mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        merged_pos = torch.cat([self.next_pos, next_pos])
        merged_next = torch.cat([self.next_tokens, torch.zeros_like(next_pos)]) if self.next_tokens is not None else None
        merged_seen = self.seen
        if self.seen is not None or seen is not None:
            vocab = (self.seen if self.seen is not None else seen).shape[1]
            old = self.seen if self.seen is not None else torch.zeros((len(self.rows), vocab), dtype=torch.bool, device=mask.device)
            new = seen if seen is not None else torch.zeros((len(rows), vocab), dtype=torch.bool, device=mask.device)
            merged_seen = torch.cat([old, new])
        for layer, (k, v) in zip(self.cache.layers, kv):
            layer.keys, layer.values = k, v
        self.mask, self.next_pos, self.next_tokens, self.seen = merged_mask, merged_pos, merged_next, merged_seen
        self.rows = self.rows + rows

    def step(self) -> list[Delta]:
        """One decode step for every row; returns their deltas (finished rows leave the batch)."""
        eng = self.engine
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        hidden = [] if any(r.params.return_hidden for r in self.rows) else None
        logits = eng.forward(self.next_tokens[:, None], self.mask, self.next_pos[:, None], self.cache, hidden=hidden)
        self.next_pos = self.next_pos + 1
        return self._emit(logits[:, -1], hidden=hidden[0][:, -1] if hidden else None)

    def rebuild(self) -> list[Delta]:
        """One step for every row, each computed alone from its own tokens (prompt + answer so
        far, one prefill per row) into fresh shared tensors.

        For use after `add` or `step` raised: the shared cache may then hold part of a step, so
        the batch cannot go on as it is, while a row's state outside the cache (its answer,
        generator and text) is untouched by a failed forward, so recomputing its cache from its
        tokens continues it exactly. A row that fails on its own ends with an error delta; the
        others go on. Rows of a failed `add` that were never merged are not here: the caller
        still holds them.
        """
        rows = list(self.rows)
        self.close()
        deltas = [end_delta(r) for r in rows if r.finish == "cancelled"]
        for row in [r for r in rows if r.finish is None]:
            try:
                deltas += self._prefill([row], [row.prompt + row.out])
            except Exception as e:  # noqa: BLE001 - it fails alone: it is this row's
                log.warning("row %s failed when recomputed alone: %s", row.rid, e)
                row.finish, row.error = "error", e
                deltas.append(end_delta(row))
                if row in self.rows:  # merged before it failed
                    self._drop_finished()
        return deltas

    def close(self) -> None:
        """Drop every row and the cache (a caller done with this batch)."""
        self.rows, self.cache = [], None
        self.mask = self.next_pos = self.next_tokens = self.seen = None

    def _emit(self, logits: torch.Tensor, first: int = 0, hidden: torch.Tensor | None = None) -> list[Delta]:
        """Sample for rows[first:] (new rows after a prefill) or all rows, update their text.
        `hidden` (len(rows[first:]), H): the head inputs the logits came from."""
        rows = self.rows[first:]
        seen = self.seen[first:] if self.seen is not None else None
        tokens, sampled = sample(self.engine, rows, logits, seen, hidden)
        if first == 0:
            self.next_tokens = tokens
        else:
            self.next_tokens[first:] = tokens
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        deltas = emit(rows, sampled, self.engine.eos_ids)
        self._drop_finished()
        return deltas

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_pos = self.next_tokens = self.seen = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos, self.next_tokens = self.mask[idx], self.next_pos[idx], self.next_tokens[idx]
        if self.seen is not None:
            self.seen = self.seen[idx]
        # Columns that are padding for every remaining row carry nothing: trim them.
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def distinct_left_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The distinct token lists among `seqs`, left padded (every one ends in the last column):
    (ids, attention mask) on `device`, and for each of `seqs` the row holding it. A sequence
    that comes several times (n answers to one prompt) is computed once; `select_cache_rows`
    then gives each of its copies the cache."""
    first_of: dict[tuple[int, ...], int] = {}
    inverse = [first_of.setdefault(tuple(t), len(first_of)) for t in seqs]
    width = max(len(t) for t in first_of)
    ids = torch.full((len(first_of), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(first_of), width), dtype=torch.long)
    for i, t in enumerate(first_of):
        ids[i, width - len(t):] = torch.tensor(t)
        mask[i, width - len(t):] = 1
    return ids.to(device), mask.to(device), inverse


def select_cache_rows(cache, idx: torch.Tensor) -> None:
    """Make a transformers KV cache's rows `cache[idx]`, in place (rows repeat where idx does)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; accept either version."""
    import inspect

    from camelid.models.lora import unwrap

    return "cache" if "cache" in inspect.signature(type(unwrap(model)).forward).parameters else "past_key_values"


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
