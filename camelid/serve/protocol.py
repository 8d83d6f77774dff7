"""OpenAI's wire format: request bodies, their checks, the error shape, response and chunk builders.

Field names, defaults and shapes follow the OpenAI API reference for `/v1/chat/completions`,
`/v1/completions` and `/v1/models` (temperature defaults to 1, completions' max_tokens to 16,
errors as `{"error": {"message", "type", "param", "code"}}`). Extensions beside OpenAI's fields
use vLLM's names (`top_k`, `repetition_penalty`, `ignore_eos`), so existing clients keep working.

Status codes: 400 for JSON that does not parse and for values out of range (a request that was
understood but cannot be served), 401 bad/missing API key, 403 a Host header that does not name
a loopback server, 404 unknown model or route, 413 body too large, 415 a POST body that is not
`application/json`, 422 for a body of the wrong shape (a missing field, a string where a number
goes: types are strict, as OpenAI's are), 503 with Retry-After when the queue is full.

Every size is bounded before work starts: the body's bytes, then (on the parsed JSON, before the
fields are validated) the lengths of `messages`, `prompt`, `stop`, `tools` and `logit_bias`,
then the number of sequences (`n` x prompts) against the batch and the queue, before any prompt
is tokenised.

No field that would change the answer is silently dropped: OpenAI fields camelid does not
implement (`UNSUPPORTED_FIELDS`) are 400 naming the field; fields that do not change the output
(`IGNORED_FIELDS`: user, metadata, store, ...) and names OpenAI does not define are ignored.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from camelid.engine.sampling import MAX_LOGIT_BIAS as MAX_BIAS
from camelid.engine.sampling import MAX_PENALTY

# Limits (named here, enforced by `check_request` and the app).
MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body accepted (413 above it): ~4x MAX_PROMPT_TOKENS of plain text."""
MAX_NEW_TOKENS = 4096
"""Largest `max_tokens` one request may ask for."""
MAX_PROMPT_TOKENS = 16384
"""Longest prompt accepted, whatever the model's context (which also bounds prompt + max_tokens)."""
MAX_N = 16
"""Most choices (`n`) per request."""
MAX_LOGPROBS = 5
"""Most alternatives per token for completions' `logprobs`, as OpenAI allows."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per token for chat's `top_logprobs`, as OpenAI allows."""
MAX_STOP = 8
"""Most stop strings per request (OpenAI allows 4; the engine takes 16, the template adds its own)."""
MAX_STOP_CHARS = 256
"""Longest stop string: the answer's last characters are held back while they may begin one."""
MAX_PROMPTS = 32
"""Most prompts in one /v1/completions request (a list of strings or of token-id lists)."""
MAX_SEQUENCES = 64
"""Most sequences (`n` x prompts) one request may ask for; the batch size may allow fewer."""
MAX_MESSAGES = 1024
"""Most messages in one chat request."""
MAX_INT_DIGITS = 20
"""Longest integer literal accepted in a body (an int64 has 19 digits): larger ones are 400 before
Python builds them (a many-thousand-digit integer takes quadratic time to convert)."""
MAX_TOP_K = 2**31 - 1
"""Largest `top_k` (any k at or past the vocabulary's size keeps every token)."""
MIN_TEMPERATURE = 1e-3
"""Smallest temperature other than 0 (greedy): dividing logits by much less overflows float32 to
inf and the log-probabilities to NaN."""
MIN_TOP_P = 1e-6
"""Smallest `top_p`: a smaller nucleus is the most likely token alone (use temperature 0), and
values under ~1e-45 read 0 in float32."""
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2
"""Range of `repetition_penalty` (1 = off): a seen token's logit is divided or multiplied by it,
and far outside this range that overflows float32."""
MAX_LOGIT_BIAS_TOKENS = 300
"""Most entries in `logit_bias` (OpenAI's limit)."""
MAX_TOOLS = 128
"""Most functions in `tools` (OpenAI's limit)."""
MAX_SCHEMA_BYTES = 64 * 1024
"""Largest JSON schema (response_format or one tool's parameters), as compact JSON."""
MAX_MODEL_NAME_CHARS = 256
"""Longest `model` accepted (a name is echoed in the 404 for an unknown one)."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for /v1/completions; chat defaults to the rest of the context."""


class APIError(Exception):
    """An error answered in OpenAI's shape; raised anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI request fields camelid does not implement, each with what to do instead: 400 when given
# (a null counts as absent). Per route, since the two APIs define different fields.
UNSUPPORTED_FIELDS = {
    "chat": {
        "audio": "audio output is not supported (text only)",
        "prediction": "predicted outputs are not supported",
        "web_search_options": "web search is not supported",
        "reasoning_effort": "this model does not reason in a separate phase",
        "verbosity": "use max_tokens and the prompt to shape the answer's length",
        "functions": "use tools (functions is OpenAI's deprecated form)",
        "function_call": "use tool_choice (function_call is OpenAI's deprecated form)",
    },
    "completions": {
        "best_of": "best_of is not supported; use n and pick",
    },
}
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                  "safety_identifier")
"""OpenAI fields that do not change the generated output: accepted and ignored."""


class _Body(BaseModel):
    # Unknown fields are ignored (as vLLM does) so clients that send e.g. `user` keep working.
    # Types are strict: "5" is not an integer, true is not a number, 1 is not a boolean.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str
    """The arguments as a JSON text (OpenAI's shape)."""


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    """Required except for an assistant turn that calls tools (OpenAI's rule)."""
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls."""
    tool_call_id: str | None = None
    """A tool turn's answer is to this call."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    """Accepted either way: camelid always enforces the schema while decoding."""


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    """Accepted either way: a forced call's arguments always follow `parameters`."""


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class _Request(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM-named extensions
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None


def _bad(message: str, param: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


SIZE_LIMITS = {"messages": MAX_MESSAGES, "prompt": max(MAX_PROMPTS, MAX_PROMPT_TOKENS), "stop": MAX_STOP,
               "tools": MAX_TOOLS, "logit_bias": MAX_LOGIT_BIAS_TOKENS}
"""Most items of a body's list fields, checked on the parsed JSON before validation builds them."""


def check_sizes(data: dict[str, Any], fields: Any = SIZE_LIMITS) -> None:
    """Lengths checked before the fields are validated (400): the lists that could make
    validation or what follows it (tokenising, one SamplingParams per sequence) expensive.
    Only `fields` (the request type's own) are looked at; others are ignored anyway."""
    for name, limit in SIZE_LIMITS.items():
        value = data.get(name) if name in fields else None
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise _bad(f"{name} has {len(value)} items; at most {limit} are accepted", name)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) > MAX_PROMPTS:
            raise _bad(f"prompt has {len(prompt)} prompts; at most {MAX_PROMPTS} are accepted", "prompt")
        if any(isinstance(p, list) and len(p) > MAX_PROMPT_TOKENS for p in prompt):
            raise _bad(f"a prompt has more than {MAX_PROMPT_TOKENS} token ids", "prompt")
    model = data.get("model")
    if isinstance(model, str) and len(model) > MAX_MODEL_NAME_CHARS:
        raise _bad(f"model must be at most {MAX_MODEL_NAME_CHARS} characters", "model")


def check_fields(data: dict[str, Any], route: str) -> None:
    """400 for a field OpenAI defines that camelid does not implement (UNSUPPORTED_FIELDS)."""
    for name, why in UNSUPPORTED_FIELDS[route].items():
        if data.get(name) is not None:
            raise _bad(f"{name} is not supported by this server: {why}", name, "unsupported_parameter")


def check_request(req: _Request) -> None:
    """Reject values no sampler can use, with the parameter named (400)."""
    t = req.temperature
    if t is not None and not (math.isfinite(t) and 0 <= t <= 2):
        raise _bad(f"temperature must be between 0 and 2, got {t}", "temperature")
    if t is not None and 0 < t < MIN_TEMPERATURE:
        raise _bad(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {t}", "temperature")
    if req.top_p is not None and not (MIN_TOP_P <= req.top_p <= 1):
        raise _bad(f"top_p must be between {MIN_TOP_P} and 1, got {req.top_p}", "top_p")
    mt = req.max_completion_tokens if isinstance(req, ChatRequest) and req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if isinstance(req, ChatRequest) and req.max_completion_tokens is not None else "max_tokens"
    if mt is not None and mt <= 0:
        raise _bad(f"{param} must be at least 1, got {mt}", param)
    if mt is not None and mt > MAX_NEW_TOKENS:
        raise _bad(f"{param} must be at most {MAX_NEW_TOKENS}, got {mt}", param)
    if req.n is not None and not (1 <= req.n <= MAX_N):
        raise _bad(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"stop takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters", "stop")
    if req.seed is not None and not (0 <= req.seed < 2**63 - MAX_N):
        raise _bad(f"seed must be between 0 and 2**63 - {MAX_N + 1}, got {req.seed}", "seed")
    if req.top_k is not None and not (0 <= req.top_k <= MAX_TOP_K):
        raise _bad(f"top_k must be between 0 (off) and {MAX_TOP_K}, got {req.top_k}", "top_k")
    rp = req.repetition_penalty
    if rp is not None and not (MIN_REPETITION_PENALTY <= rp <= MAX_REPETITION_PENALTY):
        raise _bad(f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and {MAX_REPETITION_PENALTY} "
                   f"(1 = off), got {rp}", "repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise _bad(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value}", name)
    for key, bias in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= MAX_INT_DIGITS):
            raise _bad(f"logit_bias keys are token ids written as decimal strings, got {key[:40]!r}", "logit_bias")
        if not -MAX_BIAS <= bias <= MAX_BIAS:
            raise _bad(f"logit_bias values must be between -{MAX_BIAS:g} and {MAX_BIAS:g}, got {bias}", "logit_bias")
    if isinstance(req, ChatRequest):
        for i, m in enumerate(req.messages):
            if m.content is None and m.role != "assistant":
                raise _bad(f"messages[{i}] ({m.role}) has no content", f"messages.{i}.content")
            if isinstance(m.content, list) and not m.content:
                raise _bad(f"messages[{i}].content is an empty list of parts", f"messages.{i}.content")
    if isinstance(req, ChatRequest) and req.modalities is not None and req.modalities != ["text"]:
        raise _bad("modalities: only [\"text\"] is supported (no audio output)", "modalities", "unsupported_parameter")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise _bad(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}", "top_logprobs")
        if req.top_logprobs and not req.logprobs:
            raise _bad("top_logprobs needs logprobs=true", "top_logprobs")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not (0 <= req.logprobs <= MAX_LOGPROBS):
            raise _bad(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
        if req.suffix:
            raise _bad("suffix (insertion) is not supported", "suffix")


def stop_strings(req: _Request) -> tuple[str, ...]:
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())


def logprob_options(req: _Request) -> tuple[bool, int]:
    """(report each token's log-probability, alternatives per token) as the request asks: chat
    has `logprobs` + `top_logprobs`, completions one `logprobs` count (0 = the token alone)."""
    if isinstance(req, ChatRequest):
        return bool(req.logprobs), req.top_logprobs or 0
    return req.logprobs is not None, req.logprobs or 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chunk(obj: str, rid: str, model: str, created: int, choices: list[dict], usage_: dict | None,
           with_usage: bool) -> dict:
    out = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if with_usage:  # with stream_options.include_usage every chunk has the key, null until the last
        out["usage"] = usage_
    return out


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None,
               with_usage: bool = False) -> dict:
    return _chunk("chat.completion.chunk", rid, model, created, choices, usage_, with_usage)


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None,
                     with_usage: bool = False) -> dict:
    return _chunk("text_completion", rid, model, created, choices, usage_, with_usage)


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None = None) -> dict:
    """Chat's `logprobs.content`: one entry per sampled token, with its `top_logprobs`
    alternatives (most likely first) when asked."""
    def entry(t: str, lp: float) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    top = top or [[] for _ in tokens]
    return {"content": [
        {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
        for t, lp, alts in zip(tokens, logprobs, top)
    ]}


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int,
                        top: list[list[tuple[str, float]]] | None) -> dict:
    """Legacy completions' logprobs: tokens, token_logprobs, top_logprobs (per token a
    {token: logprob} dict of the alternatives, or null for logprobs=0), text_offset."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    tops = None
    if top is not None:
        # Two ids can decode to the same text (byte pieces): the likelier one keeps the key.
        tops = []
        for alts in top:
            d: dict[str, float] = {}
            for a, alp in alts:
                d.setdefault(a, alp)
            tops.append(d)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
