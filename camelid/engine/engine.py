"""The one generation engine: batched, streaming, KV-cached, with per-request sampling.

Chat, the server, evaluation and PPO rollouts all call it. It wraps any Hugging Face causal LM
(a peft model too) and drives the decode loop itself, so that each request in a batch has its
own sampling parameters, stop strings, seed and length, and so that requests can join a
running batch (continuous batching: `Batch.add`) and leave it when they finish or are
cancelled.

Layout: left padding with an attention mask and explicit position ids, so a prompt's logits do
not depend on what it is batched with (batched greedy == single greedy).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from camelid.engine.sampling import SamplingParams, per_row_alternatives, sample_next
from camelid.engine.text import IncrementalDecoder, StopText
from camelid.errors import CamelidError

log = logging.getLogger("camelid.engine")
DEFAULT_MAX_CONTEXT = 2048


@dataclass
class Delta:
    """What one request produced in one step."""

    index: int
    """The request's position in the list given to stream() (or its id from Batch.add)."""
    text: str
    """New text safe to show (a possible stop string is held back until resolved)."""
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    """None while running; then "stop" (EOS, stop token or stop string), "length" or "cancelled"."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per token: the `top_logprobs` most likely (token id, log-probability), when asked."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    """Generated ids; when generation ended on EOS or a stop token, that token is the last one."""
    prompt_tokens: int
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    hidden: torch.Tensor | None = None
    """(len(token_ids), hidden size) when `return_hidden` was asked: row t is the LM head's input
    that token t was sampled from (the final, normalised hidden state one position before it)."""


@dataclass
class _Row:
    rid: int
    params: SamplingParams
    prompt_len: int
    decoder: IncrementalDecoder
    stop_text: StopText
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    finish: str | None = None


class Engine:
    """Generation over a loaded model. `Engine.load(...)` resolves and loads one by name."""

    def __init__(self, model, tokenizer, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
        cfg = getattr(model, "config", None)
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", 0) or DEFAULT_MAX_CONTEXT)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.cache_kw = _cache_kwarg(model)
        self.fast = None
        if os.environ.get("CAMELID_FAST_PATH", "1") != "0":
            from camelid.engine import fastllama

            self.fast = fastllama.FastLlama(model) if fastllama.supports(model) else None

    @classmethod
    def load(cls, model=None, device: str = "auto", dtype: str = "auto", load_8bit: bool = False, max_context: int | None = None) -> "Engine":
        from camelid.models.load import load_for_inference

        lm, tok, path = load_for_inference(model, device=device, dtype=dtype, load_8bit=load_8bit)
        engine = cls(lm, tok, max_context=max_context)
        engine.name = str(model or path.name)
        engine.path = path
        return engine

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt. A BOS is added only where the tokenizer adds one and the
        prompt (e.g. a rendered chat template) does not already start with it."""
        bos = self.tokenizer.bos_token
        add = not (bos and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=add)["input_ids"])

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keep the prompt's last tokens so prompt + answer fit the context (with a warning)."""
        room = self.max_context - max_new_tokens
        if room < 1:
            raise CamelidError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the {self.max_context}-token context")
        if len(ids) > room:
            log.warning("prompt of %d tokens truncated to its last %d to fit the %d-token context", len(ids), room, self.max_context)
            return ids[-room:]
        return ids

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

    def stream(
        self,
        prompts: Sequence[str] | Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        cancelled: set[int] | None = None,
    ) -> Iterator[list[Delta]]:
        """Generate for all prompts together; yield each step's deltas. `cancelled` is a set the
        caller may add request indices to; those rows end with finish_reason "cancelled"."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        batch = self.new_batch()
        with torch.inference_mode():
            yield from batch.add(list(range(len(prompts))), prompts, plist)
            while batch.rows:
                if cancelled:
                    batch.cancel(cancelled)
                yield batch.step()

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Whole answers for a batch of prompts (str or token-id lists)."""
        done: dict[int, Completion] = {}
        texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        batch_rows: dict[int, _Row] = {}
        for deltas in self._stream_rows(prompts, params, batch_rows):
            for d in deltas:
                texts[d.index].append(d.text)
                if d.finish_reason:
                    row = batch_rows[d.index]
                    done[d.index] = Completion(
                        "".join(texts[d.index]), list(row.out), row.prompt_len, d.finish_reason,
                        list(row.logprobs) if row.params.logprobs else None,
                        list(row.top) if row.params.top_logprobs else None,
                        torch.stack(row.hidden) if row.params.return_hidden else None,
                    )
        return [done[i] for i in range(len(prompts))]

    def _stream_rows(self, prompts, params, rows_out: dict[int, _Row]) -> Iterator[list[Delta]]:
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        batch = self.new_batch()
        batch.on_row = lambda row: rows_out.__setitem__(row.rid, row)
        with torch.inference_mode():
            yield from batch.add(list(range(len(prompts))), prompts, plist)
            while batch.rows:
                yield batch.step()


class Batch:
    """A running batch: rows share one KV cache; rows may join (add) and leave (finish/cancel)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self.next_pos: torch.Tensor | None = None  # (B,) position of the next token
        self.next_tokens: torch.Tensor | None = None  # (B,) last sampled token, fed next step
        self.seen: torch.Tensor | None = None  # (B, V) for repetition penalty, built lazily
        self.on_row = None

    # Prefill new requests, then merge them into the running batch.
    def add(self, ids: list[int], prompts, params: list[SamplingParams]) -> Iterator[list[Delta]]:
        eng = self.engine
        toks = prompt_ids(eng, prompts, params)
        width = max(len(t) for t in toks)
        input_ids = torch.full((len(toks), width), eng.pad_id, dtype=torch.long)
        mask = torch.zeros((len(toks), width), dtype=torch.long)
        for i, t in enumerate(toks):
            input_ids[i, width - len(t):] = torch.tensor(t)
            mask[i, width - len(t):] = 1
        input_ids, mask = input_ids.to(eng.device), mask.to(eng.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        hidden = [] if any(sp.return_hidden for sp in params) else None
        logits = eng.forward(input_ids, mask, pos, cache, logits_to_keep=1, hidden=hidden)
        new_rows = []
        for rid, t, sp in zip(ids, toks, params):
            gen = None
            if sp.seed is not None:
                gen = torch.Generator(device=eng.device).manual_seed(sp.seed)
            row = _Row(rid, sp, len(t), IncrementalDecoder(eng.tokenizer), StopText(sp.stop), gen)
            new_rows.append(row)
            if self.on_row:
                self.on_row(row)
        seen = None
        if any(sp.repetition_penalty != 1.0 for sp in params):
            seen = torch.zeros((len(toks), logits.shape[-1]), dtype=torch.bool, device=eng.device)
            seen.scatter_(1, input_ids, mask.bool())
        self._merge(new_rows, cache, mask, pos[:, -1] + 1, seen)
        yield self._emit(logits[:, -1], first=len(self.rows) - len(new_rows), hidden=hidden[0][:, -1] if hidden else None)

    def _merge(self, rows, cache, mask, next_pos, seen) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_pos = rows, cache, mask, next_pos
            self.seen = seen
            return
        old_t, new_t = self.mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)
        for layer_old, layer_new in zip(self.cache.layers, cache.layers):
            layer_old.keys = torch.cat([_left_pad(layer_old.keys, width, 2), _left_pad(layer_new.keys, width, 2)])
            layer_old.values = torch.cat([_left_pad(layer_old.values, width, 2), _left_pad(layer_new.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.next_tokens = torch.cat([self.next_tokens, torch.zeros_like(next_pos)]) if self.next_tokens is not None else None
        if self.seen is not None or seen is not None:
            vocab = (self.seen if self.seen is not None else seen).shape[1]
            old = self.seen if self.seen is not None else torch.zeros((len(self.rows), vocab), dtype=torch.bool, device=mask.device)
            new = seen if seen is not None else torch.zeros((len(rows), vocab), dtype=torch.bool, device=mask.device)
            self.seen = torch.cat([old, new])
        self.rows = self.rows + rows

    def step(self) -> list[Delta]:
        """One decode step for every row; returns their deltas (finished rows leave the batch)."""
        eng = self.engine
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        hidden = [] if any(r.params.return_hidden for r in self.rows) else None
        logits = eng.forward(self.next_tokens[:, None], self.mask, self.next_pos[:, None], self.cache, hidden=hidden)
        self.next_pos = self.next_pos + 1
        return self._emit(logits[:, -1], hidden=hidden[0][:, -1] if hidden else None)

    def cancel(self, rids: Iterable[int]) -> None:
        rids = set(rids)
        for row in self.rows:
            if row.rid in rids and row.finish is None:
                row.finish = "cancelled"

    def _emit(self, logits: torch.Tensor, first: int = 0, hidden: torch.Tensor | None = None) -> list[Delta]:
        """Sample for rows[first:] (new rows after a prefill) or all rows, update their text.
        `hidden` (len(rows[first:]), H): the head inputs the logits came from."""
        eng = self.engine
        rows = self.rows[first:]
        seen = self.seen[first:] if self.seen is not None else None
        tokens, logps, top = sample_next(logits, [r.params for r in rows], [r.generator for r in rows], seen)
        alternatives = per_row_alternatives(top, [r.params for r in rows])
        if first == 0:
            self.next_tokens = tokens
        else:
            self.next_tokens[first:] = tokens
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        deltas = []
        for i, (row, tok, lp, alt) in enumerate(zip(rows, tokens.tolist(), logps.tolist(), alternatives)):
            if row.finish == "cancelled":
                deltas.append(Delta(row.rid, "", [], None, "cancelled"))
                continue
            row.out.append(tok)
            if row.params.return_hidden:
                row.hidden.append(hidden[i].clone())
            row.logprobs.append(lp)
            if alt is not None:
                row.top.append(alt)
            text, finish = "", None
            stop_tok = (tok in eng.eos_ids and not row.params.ignore_eos) or tok in row.params.stop_token_ids
            if stop_tok:
                finish = "stop"
                text = row.stop_text.feed(row.decoder.flush())[0] + row.stop_text.finish()
            else:
                text, hit = row.stop_text.feed(row.decoder.push(tok))
                if hit:
                    finish = "stop"
                elif len(row.out) >= row.params.max_new_tokens:
                    finish = "length"
                    text += row.stop_text.feed(row.decoder.flush())[0]
                    text += "" if row.stop_text.stopped else row.stop_text.finish()
                    finish = "stop" if row.stop_text.stopped else "length"
            row.finish = finish
            deltas.append(Delta(row.rid, text, [tok], [lp] if row.params.logprobs else None, finish,
                                [alt] if alt is not None else None))
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


def prompt_ids(engine, prompts, params: list[SamplingParams]) -> list[list[int]]:
    """Token ids of each prompt (str or ids), cut to fit the context; shared by every backend."""
    toks = [engine.fit_prompt(p if isinstance(p, list) else engine.encode(p), sp.max_new_tokens) for p, sp in zip(prompts, params)]
    if any(len(t) == 0 for t in toks):
        raise CamelidError("empty prompt: give at least one token of text")
    return toks


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _cache_kwarg(model) -> str:
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
