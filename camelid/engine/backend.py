"""What every generation backend is, and the one implementation of what they share.

A backend (`Backend`: the torch engine `engine.Engine`, the llama.cpp engine
`llamacpp.LlamaCppEngine`) differs only in who computes the logits and where the KV cache lives.
Everything around that is here, once: prompt encoding and fitting, the driver loop behind
`stream` and `generate` (`BackendBase`), a request's row (`Row`, `new_row`) and the per-token
finish logic (`advance_row`, `emit`: stop ids, stop strings, max tokens, grammar, per-row
failures). Chat, generate, serve's scheduler, evaluation and PPO call a backend only through
`Backend` and its `RowBatch` (add / step / rebuild / cancel / close).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from camelid.engine import grammar
from camelid.engine.sampling import SamplingParams, sample_rows
from camelid.engine.text import IncrementalDecoder, StopText
from camelid.errors import CamelidError

log = logging.getLogger("camelid.engine")


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
    """None while running; then "stop" (EOS, stop token or stop string), "length", "cancelled",
    or "error" (this request alone failed: `error` says why)."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per token: the `top_logprobs` most likely (token id, log-probability), when asked."""
    error: Exception | None = None
    """With finish_reason "error": what went wrong for this request."""


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
class Row:
    """One running request (one choice of it): its parameters, tokens and text state."""

    rid: int
    params: SamplingParams
    prompt: list[int]
    """The prompt's ids (`rebuild` recomputes the row from prompt + out)."""
    decoder: IncrementalDecoder
    stop_text: StopText
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    finish: str | None = None
    error: Exception | None = None
    matcher: Any = None
    """The row's grammar state (`engine.grammar`), when its params carry a grammar."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


@runtime_checkable
class RowBatch(Protocol):
    """Running requests sharing one backend: rows join (`add`, a prefill that yields their first
    tokens), advance together (`step`), leave when they finish or are cancelled. `rebuild`
    recomputes every row alone after a shared computation raised (serve/scheduler.py)."""

    rows: list[Row]
    on_row: Callable[[Row], None] | None
    add_steps_running: bool
    """`add` also advances the running rows by one token (in the same computation as the new
    prompts), so a scheduler need not step before admitting more."""

    def add(self, ids: list[int], prompts: Sequence[str | list[int]], params: list[SamplingParams]) -> Iterator[list[Delta]]: ...

    def step(self) -> list[Delta]: ...

    def rebuild(self) -> list[Delta]: ...

    def cancel(self, rids: Iterable[int]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A loaded model that generates: what chat, generate, serve, evaluation and PPO use."""

    tokenizer: Any
    max_context: int
    eos_ids: set[int]
    device: Any
    name: str

    def encode(self, prompt: str) -> list[int]: ...

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> list[int]: ...

    def new_batch(self) -> RowBatch: ...

    def stream(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams] = ...,
               cancelled: set[int] | None = None) -> Iterator[list[Delta]]: ...

    def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams] = ...) -> list[Completion]: ...


class BackendBase:
    """The shared half of every backend: prompts, and `stream` / `generate` driving its batch.
    A subclass sets tokenizer, max_context, eos_ids, device and implements `new_batch`."""

    max_rows: int | None = None
    """Most rows one batch holds (llama.cpp: its sequences); more prompts join as rows finish."""

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

    def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               cancelled: set[int] | None = None) -> Iterator[list[Delta]]:
        """Generate for all prompts together; yield each step's deltas. `cancelled` is a set the
        caller may add request indices to; those rows end with finish_reason "cancelled"."""
        return self._drive(prompts, params, cancelled, None)

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Whole answers for a batch of prompts (str or token-id lists)."""
        rows: dict[int, Row] = {}
        texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        for deltas in self._drive(prompts, params, None, lambda row: rows.__setitem__(row.rid, row)):
            for d in deltas:
                texts[d.index].append(d.text)
        return [completion(rows[i], "".join(texts[i])) for i in range(len(prompts))]

    def _drive(self, prompts, params, cancelled: set[int] | None, on_row) -> Iterator[list[Delta]]:
        """The driver loop: admit prompts while the batch has room, step until every row ends.
        A row's failure is raised: these callers run one job (chat, generate, evaluation, PPO)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        batch = self.new_batch()
        batch.on_row = on_row
        pending = list(range(len(prompts)))
        try:
            with torch.inference_mode():
                while pending or batch.rows:
                    room = len(pending) if self.max_rows is None else self.max_rows - len(batch.rows)
                    take, pending = pending[:room], pending[room:]
                    if take:
                        for deltas in batch.add(take, [prompts[i] for i in take], [plist[i] for i in take]):
                            yield raise_row_errors(deltas)
                    if cancelled:
                        batch.cancel(cancelled)
                    if batch.rows:
                        yield raise_row_errors(batch.step())
        finally:
            batch.close()


def completion(row: Row, text: str) -> Completion:
    """A finished row as a Completion (what `generate` returns)."""
    p = row.params
    return Completion(text, list(row.out), row.prompt_len, row.finish,
                      list(row.logprobs) if p.logprobs else None, list(row.top) if p.top_logprobs else None,
                      torch.stack(row.hidden) if p.return_hidden else None)


def raise_row_errors(deltas: list[Delta]) -> list[Delta]:
    """For callers that run one job (chat, generate, evaluation, PPO): a row's failure is theirs."""
    for d in deltas:
        if d.error is not None:
            raise d.error
    return deltas


def prompt_ids(backend: Backend, prompts, params: list[SamplingParams]) -> list[list[int]]:
    """Token ids of each prompt (str or ids), cut to fit the context."""
    toks = [backend.fit_prompt(p if isinstance(p, list) else backend.encode(p), sp.max_new_tokens) for p, sp in zip(prompts, params)]
    if any(len(t) == 0 for t in toks):
        raise CamelidError("empty prompt: give at least one token of text")
    return toks


def new_row(backend: Backend, rid: int, prompt: list[int], params: SamplingParams, on_row: Callable[[Row], None] | None,
            row_type: type[Row] = Row, **extra: Any) -> Row:
    """A row for a request, with its seeded generator and grammar state, shown to `on_row`. A
    failure of its own (a bad seed or grammar) is kept on the row, which then ends alone with an
    error delta."""
    row = row_type(rid, params, list(prompt), IncrementalDecoder(backend.tokenizer), StopText(params.stop), **extra)
    try:
        if params.seed is not None:
            row.generator = torch.Generator(device=backend.device).manual_seed(params.seed)
        if params.grammar is not None:
            row.matcher = grammar.new_matcher(backend, params.grammar)
    except Exception as e:  # noqa: BLE001 - this row's failure, reported with it
        row.error = e
    if on_row is not None:
        on_row(row)
    return row


def advance_row(row: Row, tok: int, lp: float, alt: list[tuple[int, float]] | None, eos_ids: set[int],
                hidden: torch.Tensor | None = None) -> Delta:
    """Append a sampled token to a row, turn it into text, decide whether the row finished (EOS
    or a stop token, a stop string, or max_new_tokens)."""
    if row.matcher is not None:
        grammar.advance(row.matcher, tok)
    if hidden is not None:
        row.hidden.append(hidden.clone())
    row.out.append(tok)
    row.logprobs.append(lp)
    if alt is not None:
        row.top.append(alt)
    finish = None
    if (tok in eos_ids and not row.params.ignore_eos) or tok in row.params.stop_token_ids:
        finish = "stop"
        text = row.stop_text.feed(row.decoder.flush())[0] + row.stop_text.finish()
    else:
        text, hit = row.stop_text.feed(row.decoder.push(tok))
        if hit:
            finish = "stop"
        elif len(row.out) >= row.params.max_new_tokens:
            text += row.stop_text.feed(row.decoder.flush())[0]
            text += "" if row.stop_text.stopped else row.stop_text.finish()
            finish = "stop" if row.stop_text.stopped else "length"
    row.finish = finish
    return Delta(row.rid, text, [tok], [lp] if row.params.logprobs else None, finish, [alt] if alt is not None else None)


@dataclass
class Sampled:
    """One step's sampling results, one entry per row (`sampling.sample_rows`' outputs)."""

    tokens: list[int]
    logprobs: list[float]
    alternatives: list[Any]
    errors: list[Exception | None]
    hidden: torch.Tensor | None = None
    """(rows, H): the LM head inputs the logits came from, where a row asked for them."""


def sample(backend: Backend, rows: list[Row], logits: torch.Tensor, seen: torch.Tensor | None,
           hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, Sampled]:
    """Each row's next token from `logits` (rows, vocab) by camelid's sampler, under the rows'
    own parameters, generators, `seen` tokens (repetition penalty) and grammars; (the tokens as a
    tensor, every result per row)."""
    outputs, allowed = grammar.row_constraints(backend, rows)
    tokens, logps, alternatives, errors = sample_rows(logits, [r.params for r in rows], [r.generator for r in rows], seen,
                                                      outputs, allowed)
    return tokens, Sampled(tokens.tolist(), logps, alternatives, errors, hidden)


class BatchBase:
    """The shared half of every backend's batch: its rows, the `on_row` hook, cancelling."""

    add_steps_running = False

    def __init__(self, engine: Backend):
        self.engine = engine
        self.rows: list[Row] = []
        self.on_row: Callable[[Row], None] | None = None
        """Called with each new row (`BackendBase.generate` collects them)."""

    def cancel(self, rids: Iterable[int]) -> None:
        """Mark the running rows among `rids` cancelled; they end at the batch's next step."""
        rids = set(rids)
        for row in self.rows:
            if row.rid in rids and row.finish is None:
                row.finish = "cancelled"


def end_delta(row: Row) -> Delta:
    """The delta of a row that ends without a token: cancelled, or failed (its error)."""
    return Delta(row.rid, "", [], None, row.finish, error=row.error if row.finish == "error" else None)


def emit(rows: list[Row], sampled: Sampled, eos_ids: set[int]) -> list[Delta]:
    """Each row's delta for one step: a cancelled row ends "cancelled", a row whose setup,
    sampling or text handling failed ends alone with "error", the others advance by their
    sampled token. A row without logits this step must be cancelled or already failed."""
    deltas = []
    for i, row in enumerate(rows):
        if row.finish == "cancelled":
            deltas.append(end_delta(row))
            continue
        row.error = row.error or sampled.errors[i]
        if row.error is None:
            hidden = sampled.hidden[i] if sampled.hidden is not None and row.params.return_hidden else None
            try:
                deltas.append(advance_row(row, sampled.tokens[i], sampled.logprobs[i], sampled.alternatives[i], eos_ids, hidden))
                continue
            except Exception as e:  # noqa: BLE001 - this row's failure, reported with it
                row.error = e
        row.finish = "error"
        deltas.append(end_delta(row))
    return deltas
