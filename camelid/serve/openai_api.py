"""The OpenAI routes: parse and check a request, submit it to its model's scheduler, answer
with one JSON body or a stream of server-sent events in OpenAI's chunk format."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from camelid.errors import CamelidError
from camelid.serve import protocol as P
from camelid.serve.registry import ServedModel
from camelid.serve.scheduler import Job, QueueFull

router = APIRouter()
RETRY_AFTER_S = 1
"""Seconds a client told 503 (queue full) should wait before retrying."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_KEEPALIVE_S = 15.0
"""Seconds between SSE comments while a stream has nothing to send (its request waits in the
queue), so that proxies and clients with read timeouts keep the connection open."""
SSE_KEEPALIVE = ": keep-alive\n\n"
SSE_DONE = "data: [DONE]\n\n"


INLINE_BYTES = 16 * 1024
"""Request bodies up to this size are parsed, and their prompts tokenised, on the event loop;
larger ones in a worker thread, so that a large request never stalls the streams. For a small
one the thread hops cost more than the work: with 16 streaming clients on 2 cores, 30 ms median
(69 ms p95) passed between a chat request's arrival and its submission to the scheduler when
both steps ran in worker threads."""


async def off_loop(request: Request, fn: Any, *args: Any) -> Any:
    """fn(*args) on the event loop for a request body of at most INLINE_BYTES (`parse_body`
    records its size), else in a worker thread."""
    small = getattr(request.state, "body_bytes", INLINE_BYTES + 1) <= INLINE_BYTES
    return fn(*args) if small else await run_in_threadpool(fn, *args)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """JSON that does not parse -> 400; a body of the wrong shape -> 422 naming the field
    (in a worker thread for a large body: `off_loop`)."""
    raw = await request.body()
    request.state.body_bytes = len(raw)
    return await off_loop(request, parse_json, raw, model)


def _int(literal: str) -> int:
    if len(literal.lstrip("-")) > P.MAX_INT_DIGITS:
        raise P.APIError(400, f"an integer in the body has more than {P.MAX_INT_DIGITS} digits", code="invalid_value")
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise P.APIError(400, f"the number {literal[:40]} is out of range", code="invalid_value")
    return value


def _constant(name: str) -> float:
    raise P.APIError(400, f"the request body is not valid JSON: {name} is not a JSON value", code="invalid_json")


def parse_json(raw: bytes, model: type[BaseModel]) -> Any:
    """The body as `model`: strict JSON (no NaN or Infinity, integers of at most MAX_INT_DIGITS
    digits, finite numbers, nesting the parser can take, text that is valid Unicode: no lone
    surrogate escapes such as "\\ud800", which nothing downstream can encode), its list sizes
    checked (`protocol.check_sizes`), then validated."""
    try:
        data = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be encoded
    except UnicodeEncodeError:
        raise P.APIError(400, "the request body holds a lone UTF-16 surrogate escape (such as \\ud800): "
                              "that is not Unicode text", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeError) as e:
        raise P.APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise P.APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise P.APIError(422, "the request body must be a JSON object", code="invalid_type")
    P.check_sizes(data, model.model_fields)
    P.check_fields(data, "chat" if model is P.ChatRequest else "completions")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise P.APIError(422, f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value") from None


def sampling_params(req: P._Request, served: ServedModel, prompt_len: int, default_max: int | None,
                    extra_stop: tuple[str, ...] = (), grammar: str | None = None) -> list:
    """One SamplingParams per choice. Prompt and answer must fit the model's context (400).
    `grammar` (engine.grammar) constrains every choice."""
    if prompt_len > P.MAX_PROMPT_TOKENS or prompt_len >= served.context:
        limit = min(P.MAX_PROMPT_TOKENS, served.context - 1)
        raise P.APIError(400, f"the prompt is {prompt_len} tokens; this server takes at most {limit}",
                         param="messages" if isinstance(req, P.ChatRequest) else "prompt", code="context_length_exceeded")
    asked = req.max_completion_tokens if isinstance(req, P.ChatRequest) and req.max_completion_tokens else req.max_tokens
    room = served.context - prompt_len
    max_new = asked if asked is not None else min(default_max or P.MAX_NEW_TOKENS, P.MAX_NEW_TOKENS, room)
    if max_new > room:
        raise P.APIError(400, f"this model's context is {served.context} tokens: the prompt ({prompt_len}) plus "
                         f"max_tokens ({max_new}) do not fit; lower max_tokens or shorten the prompt",
                         param="max_tokens", code="context_length_exceeded")
    n = req.n or 1
    bias = logit_bias(req, served)
    try:
        # Distinct seeds per choice (seed + i), or n seeded choices would all be the same text.
        return [_params(req, max_new, extra_stop, None if req.seed is None else req.seed + i, bias, grammar) for i in range(n)]
    except CamelidError as e:  # a combination the engine refuses (check_request caught the rest)
        raise P.APIError(400, str(e)) from None


def logit_bias(req: P._Request, served: ServedModel) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; an id outside the vocabulary is 400."""
    vocab = len(served.engine.tokenizer)
    pairs = tuple((int(k), v) for k, v in (req.logit_bias or {}).items())
    bad = [t for t, _ in pairs if t >= vocab]
    if bad:
        raise P.APIError(400, f"logit_bias names token {bad[0]}; this model's token ids are 0 to {vocab - 1}", param="logit_bias")
    return pairs


def _params(req: P._Request, max_new: int, extra_stop: tuple[str, ...], seed: int | None,
            bias: tuple[tuple[int, float], ...] = (), grammar: str | None = None):
    from camelid.engine import SamplingParams

    logprobs, top_logprobs = P.logprob_options(req)
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=req.repetition_penalty or 1.0,
        max_new_tokens=max_new,
        seed=seed,
        stop=P.stop_strings(req) + extra_stop,
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        grammar=grammar,
    )


def _overloaded(e: QueueFull) -> P.APIError:
    return P.APIError(503, f"{e}; retry in {RETRY_AFTER_S}s", type="server_error", code="server_overloaded",
                      headers={"Retry-After": str(RETRY_AFTER_S)})


def check_room(served: ServedModel, sequences: int) -> None:
    """Before any prompt is tokenised: the request's sequences must fit one batch (400) and the
    queue must have room for them now (503), so a request that cannot run costs no work."""
    limit = min(P.MAX_SEQUENCES, served.scheduler.max_batch_size)
    if sequences > limit:
        raise P.APIError(400, f"this request asks for {sequences} sequences (n x prompts); this server runs at most "
                              f"{limit} for one request", param="n")
    try:
        served.scheduler.check_room(sequences)
    except QueueFull as e:
        raise _overloaded(e) from None


def submit(served: ServedModel, prompts: list[list[int]], params: list) -> Job:
    job = Job(prompts, params, asyncio.get_running_loop())
    try:
        served.scheduler.submit(job)
    except QueueFull as e:
        raise _overloaded(e) from None
    except ValueError as e:
        raise P.APIError(400, str(e), param="n") from None
    return job


if sys.version_info >= (3, 11):
    async def _get(queue: asyncio.Queue, timeout: float | None) -> Any:
        async with asyncio.timeout(timeout):  # no task per call, as wait_for makes before 3.12
            return await queue.get()
else:  # pragma: no cover - Python 3.10
    def _get(queue: asyncio.Queue, timeout: float | None) -> Any:
        return asyncio.wait_for(queue.get(), timeout)


async def job_events(job: Job, idle_s: float | None = None) -> AsyncIterator[list | None]:
    """The job's deltas until it ends; re-raises a generation failure. With `idle_s`, None each
    time that long passes without an event.

    Steps already waiting when the loop gets to them come out as one list (in order), so a
    stream that fell behind writes them in one send instead of one per step."""
    queue = job.events
    while True:
        try:
            items = [queue.get_nowait() if not queue.empty() else await _get(queue, idle_s)]
        except asyncio.TimeoutError:
            yield None
            continue
        while not queue.empty():
            items.append(queue.get_nowait())
        deltas: list = []
        for item in items:
            if isinstance(item, list):
                deltas += item
                continue
            if deltas:
                yield deltas
            if item is None:
                return
            raise item
        yield deltas


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, d) -> None:
        self.text.append(d.text)
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or []
        self.top += d.top_logprobs or []
        self.finish_reason = d.finish_reason or self.finish_reason


class ClientGone(Exception):
    """The client hung up before its non-streaming answer was ready."""


async def collect(job: Job, served: ServedModel, request: Request) -> list[Choice]:
    """Run a non-streaming job to its end; a client that hangs up cancels it (its slot is freed)."""
    choices = [Choice() for _ in range(job.n)]

    async def drain() -> None:
        async for deltas in job_events(job):
            for d in deltas:
                choices[d.index].add(d)

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the client hung up first (or this handler was cancelled)
            work.cancel()
            served.scheduler.cancel(job)
    if not work.done() or work.cancelled():
        raise ClientGone()
    work.result()  # re-raise a generation failure
    return choices


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Output:
    """Builds one request's response: `whole(choices)` for a JSON body; `start()`, `step(deltas)`
    and `end()` for the chunks of a stream. Chat and completions differ only in the shapes."""

    include_usage = False
    produced = 0

    def start(self) -> list[dict]:
        return []

    def step(self, deltas: list) -> list[dict]:
        raise NotImplementedError

    def end(self) -> list[dict]:
        return []


async def stream_events(job: Job, served: ServedModel, out: Output, keepalive_s: float = SSE_KEEPALIVE_S) -> AsyncIterator[str]:
    """SSE frames, then `data: [DONE]`; a generation failure becomes an in-band error event (the
    200 status is already sent, as OpenAI does); a comment every `keepalive_s` while there is
    nothing to send. Closing this generator (the client went away) cancels the job, which frees
    its slot in the batch."""
    try:
        for chunk in out.start():
            yield sse(chunk)
        try:
            async for deltas in job_events(job, keepalive_s):
                if deltas is None:
                    yield SSE_KEEPALIVE
                    continue
                frames = "".join(map(sse, out.step(deltas)))  # one step's chunks in one write
                if frames:
                    yield frames
            yield "".join(map(sse, out.end())) + SSE_DONE
        except Exception as e:  # noqa: BLE001
            yield sse(P.APIError(500, f"generation failed: {e}", type="server_error").body()) + SSE_DONE
    finally:
        served.scheduler.cancel(job)


async def respond(request: Request, stream: bool | None, job: Job, served: ServedModel, out: Output) -> Any:
    """The answer to a generation request: an SSE stream of `out`'s chunks, or one JSON body."""
    if stream:
        return StreamingResponse(stream_events(job, served, out, request.app.state.sse_keepalive_s),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(out.whole(await collect(job, served, request)))


def token_strings(served: ServedModel, ids: list[int]) -> list[str]:
    return [served.engine.tokenizer.decode([t]) for t in ids]


def alternative_strings(served: ServedModel, top: list[list[tuple[int, float]]] | None) -> list[list[tuple[str, float]]] | None:
    """Each token's (id, logprob) alternatives with the ids as text."""
    if not top:
        return None
    return [list(zip(token_strings(served, [i for i, _ in alts]), [lp for _, lp in alts])) for alts in top]


def registry(request: Request):
    return request.app.state.registry


def wants_usage(req: P._Request) -> bool:
    """stream_options.include_usage: every chunk carries `usage` (null) and a last one the counts."""
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _finish(reason: str | None) -> str:
    # The engine says "cancelled" only for a job whose client is gone; nobody reads it.
    return reason if reason in ("stop", "length") else "stop"


# ---- /v1/models ---------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [m.card() for m in registry(request)]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request) -> dict:
    return registry(request).get(name).card()


# ---- /v1/completions ----------------------------------------------------------------------
def prompt_count(req: P.CompletionRequest) -> int:
    """How many prompts the prompt field holds (a string or one token-id list is one)."""
    p = req.prompt
    return len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1


def completion_prompts(req: P.CompletionRequest, served: ServedModel) -> list[list[int]]:
    """The prompt field (a string, strings, token ids or lists of token ids) as token-id lists."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise P.APIError(400, "prompt is empty", param="prompt")
    if isinstance(p[0], int):
        p = [p]
    vocab = len(served.engine.tokenizer)
    prompts = []
    for item in p:
        ids = served.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise P.APIError(400, "prompt is empty: give at least one token", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise P.APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        prompts.append(ids)
    return prompts


@router.post("/v1/completions")
async def completions(request: Request):
    req = await parse_body(request, P.CompletionRequest)
    P.check_request(req)
    served = registry(request).get(req.model)
    check_room(served, (req.n or 1) * prompt_count(req))
    prompts = await off_loop(request, completion_prompts, req, served)
    want_lp = P.logprob_options(req)[0]
    if want_lp and req.echo:
        raise P.APIError(400, "echo with logprobs is not supported (no prompt log-probabilities)", param="echo")
    rows, params = [], []
    for ids in prompts:
        ps = sampling_params(req, served, len(ids), P.DEFAULT_COMPLETION_MAX_TOKENS)
        rows += [ids] * len(ps)
        params += ps
    job = submit(served, rows, params)
    echo = [served.engine.tokenizer.decode(ids) if req.echo else "" for ids in rows]
    out = CompletionOutput(P.new_id("cmpl"), served, sum(map(len, prompts)), want_lp, echo, wants_usage(req))
    return await respond(request, req.stream, job, served, out)


@dataclass
class CompletionOutput(Output):
    rid: str
    served: ServedModel
    prompt_tokens: int
    logprobs: bool
    echo: list[str]
    include_usage: bool = False
    created: int = field(default_factory=P.now)

    def __post_init__(self) -> None:
        self.offsets = [len(e) for e in self.echo]  # text_offset of the next token, per choice

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return P.completion_chunk(self.rid, self.served.name, self.created, choices, usage, self.include_usage)

    def _lp(self, ids: list[int], lps: list[float] | None, offset: int, top: list | None) -> dict | None:
        if not self.logprobs:
            return None
        return P.completion_logprobs(token_strings(self.served, ids), lps or [], offset, alternative_strings(self.served, top))

    def start(self) -> list[dict]:
        return [self._chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}])
                for i, e in enumerate(self.echo) if e]

    def step(self, deltas: list) -> list[dict]:
        chunks = []
        for d in deltas:
            self.produced += len(d.token_ids)
            if d.text or (self.logprobs and d.token_ids) or d.finish_reason:
                finish = _finish(d.finish_reason) if d.finish_reason else None
                lp = self._lp(d.token_ids, d.logprobs, self.offsets[d.index], d.top_logprobs)
                chunks.append(self._chunk([{"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": finish}]))
            self.offsets[d.index] += len(d.text)
        return chunks

    def end(self) -> list[dict]:
        return [self._chunk([], P.usage(self.prompt_tokens, self.produced))] if self.include_usage else []

    def whole(self, choices: list[Choice]) -> dict:
        return {
            "id": self.rid, "object": "text_completion", "created": self.created, "model": self.served.name,
            "system_fingerprint": None,
            "choices": [{"index": i, "text": self.echo[i] + "".join(c.text),
                         "logprobs": self._lp(c.token_ids, c.logprobs, len(self.echo[i]), c.top),
                         "finish_reason": _finish(c.finish_reason)} for i, c in enumerate(choices)],
            "usage": P.usage(self.prompt_tokens, sum(len(c.token_ids) for c in choices)),
        }
