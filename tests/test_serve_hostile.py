"""A corpus of malformed and hostile requests against a real `camelid serve` on an ephemeral port:
each gets its 4xx in OpenAI's error shape (never a 5xx, never a hang), and afterwards the server
is alive and answers a request exactly as it did before the corpus. Nearly every request is
refused before generation; none generates more than two tokens."""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from serve_helpers import CHAT, MODEL, live_server

from camelid.serve import protocol as P

KEY = "sk-corpus-" + "k" * 20
TIMEOUT = 30


@dataclass
class Case:
    name: str
    body: Any = None
    """A dict or list is sent as JSON (ASCII escapes, so lone surrogates travel as \\ud800); bytes as they are."""
    expect: int | tuple[int, ...] = 400
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    """Sent besides Content-Type: application/json (a value None drops that header). {port} is
    the server's port."""
    keyed: bool = False
    """Send to the server that requires an API key."""
    raw: bytes | None = None
    """A whole HTTP request sent on a socket as it is ({port} filled in)."""


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 2, **kw}


def comp(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def user(content) -> dict:
    return chat(messages=[{"role": "user", "content": content}])


def fn(name, parameters=None) -> dict:
    f = {"name": name} if name is not None else {"description": "no name"}
    return {"type": "function", "function": {**f, **({"parameters": parameters} if parameters is not None else {})}}


def call(**kw) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": kw.pop("arguments", "{}")}, **kw}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


C, X = "/v1/chat/completions", "/v1/completions"
CASES = [
    # ---- JSON that does not parse, or is not an object -----------------------------------------
    Case("empty body", b""),
    Case("open brace", b"{"),
    Case("open bracket", b"["),
    Case("close brace", b"}"),
    Case("null", b"null", 422),
    Case("true", b"true", 422),
    Case("a number", b"42", 422),
    Case("a string", b'"text"', 422),
    Case("an array", b"[]", 422),
    Case("single quotes", b"{'model': 'tiny'}"),
    Case("trailing comma", b'{"model": "tiny",}'),
    Case("missing comma", b'{"model": "tiny" "messages": []}'),
    Case("two documents", b'{"model": "tiny"} {"x": 1}'),
    Case("utf-16 body", b"\xff\xfe" + "{}".encode("utf-16-le"), (400, 422)),
    Case("utf-8 bom", b'\xef\xbb\xbf{"model": "tiny"}', (400, 422)),
    Case("nul bytes", b"\x00" * 16),
    Case("NaN literal", b'{"model": NaN}'),
    Case("Infinity literal", json.dumps(chat())[:-1].encode() + b', "temperature": Infinity}'),
    Case("-Infinity literal", json.dumps(chat())[:-1].encode() + b', "top_p": -Infinity}'),
    Case("arrays 5000 deep", nested(5000)),
    Case("objects 3000 deep", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    Case("arrays 900 deep in stop", json.dumps(chat())[:-1].encode() + b', "stop": ' + nested(900) + b"}", 422),
    Case("arrays 100000 deep", nested(100_000)),
    Case("invalid utf-8", b'{"model": "\xc3\x28", "messages": []}'),
    Case("overlong utf-8", b'{"model": "\xc0\xaf", "messages": []}'),
    Case("high surrogate in model", chat(model="\ud800")),
    Case("low surrogate in content", user("hello \udc00")),
    Case("surrogate in a key", {"\ud800": 1, **chat()}),
    Case("surrogate in prompt", comp(prompt="x\udbff"), path=X),
    Case("surrogate in prompt list", comp(prompt=["ok", "\ud800"]), path=X),
    Case("surrogate in stop", chat(stop=["\ud801"])),
    Case("surrogate in an ignored field", chat(user="\ud800")),
    Case("reversed surrogate pair", user("\udc00\ud800")),
    Case("surrogate in content part", user([{"type": "text", "text": "\ud800"}])),
    Case("5000-digit max_tokens", json.dumps(chat())[:-1].encode() + b', "max_tokens": ' + b"9" * 5000 + b"}"),
    Case("25-digit seed", chat(seed=10**24)),
    Case("top_k 10**30", chat(top_k=10**30)),
    Case("huge negative n", chat(n=-(10**25))),
    Case("5000-digit float", json.dumps(chat())[:-1].encode() + b', "temperature": ' + b"1" * 5000 + b".5}"),
    Case("temperature 1e999", json.dumps(chat())[:-1].encode() + b', "temperature": 1e999}'),
    Case("temperature -1e999", json.dumps(chat())[:-1].encode() + b', "temperature": -1e999}'),
    # ---- wrong types (strict, as OpenAI's) -----------------------------------------------------
    Case("max_tokens as float", chat(max_tokens=1000.0), 422),
    Case("model int", chat(model=123), 422),
    Case("model null", chat(model=None), 422),
    Case("model list", chat(model=[MODEL]), 422),
    Case("model missing", {"messages": CHAT}, 422),
    Case("messages string", chat(messages="hi"), 422),
    Case("messages object", chat(messages={"role": "user", "content": "hi"}), 422),
    Case("messages empty", chat(messages=[]), 422),
    Case("message a string", chat(messages=["hi"]), 422),
    Case("message without role", chat(messages=[{"content": "hi"}]), 422),
    Case("role unknown", chat(messages=[{"role": "god", "content": "hi"}]), 422),
    Case("role int", chat(messages=[{"role": 1, "content": "hi"}]), 422),
    Case("content int", user(42), 422),
    Case("content object", user({"text": "x"}), 422),
    Case("content image part", user([{"type": "image_url", "image_url": {"url": "http://x"}}]), 422),
    Case("content part without text", user([{"type": "text"}]), 422),
    Case("content part text int", user([{"type": "text", "text": 5}]), 422),
    Case("max_tokens string", chat(max_tokens="5"), 422),
    Case("max_tokens fraction", chat(max_tokens=5.5), 422),
    Case("max_tokens bool", chat(max_tokens=True), 422),
    Case("temperature string", chat(temperature="hot"), 422),
    Case("temperature bool", chat(temperature=True), 422),
    Case("n string", chat(n="2"), 422),
    Case("stream string", chat(stream="yes"), 422),
    Case("stream int", chat(stream=1), 422),
    Case("stop int", chat(stop=5), 422),
    Case("stop ints", chat(stop=[1, 2]), 422),
    Case("stop nested", chat(stop=[["a"]]), 422),
    Case("logprobs string", chat(logprobs="yes"), 422),
    Case("top_logprobs float", chat(logprobs=True, top_logprobs=1.5), 422),
    Case("seed string", chat(seed="1"), 422),
    Case("stream_options string", chat(stream=True, stream_options="x"), 422),
    Case("include_usage string", chat(stream=True, stream_options={"include_usage": "yes"}), 422),
    Case("top_k float", chat(top_k=1.5), 422),
    Case("repetition_penalty string", chat(repetition_penalty="x"), 422),
    Case("ignore_eos string", chat(ignore_eos="no"), 422),
    Case("max_completion_tokens string", chat(max_completion_tokens="8"), 422),
    # ---- values out of range -------------------------------------------------------------------
    Case("temperature -1", chat(temperature=-1)),
    Case("temperature 2.01", chat(temperature=2.01)),
    Case("temperature 1e-10", chat(temperature=1e-10)),
    Case("temperature denormal", chat(temperature=5e-324)),
    Case("top_p 0", chat(top_p=0)),
    Case("top_p negative", chat(top_p=-0.1)),
    Case("top_p above 1", chat(top_p=1.0001)),
    Case("top_p 1e-50", chat(top_p=1e-50)),
    Case("top_p denormal", chat(top_p=1e-320)),
    Case("repetition_penalty 0", chat(repetition_penalty=0)),
    Case("repetition_penalty negative", chat(repetition_penalty=-1)),
    Case("repetition_penalty 1e-50", chat(repetition_penalty=1e-50)),
    Case("repetition_penalty 1e10", chat(repetition_penalty=1e10)),
    Case("top_k negative", chat(top_k=-1)),
    Case("top_k 10**19", chat(top_k=10**19)),
    Case("top_k 2**31", chat(top_k=2**31)),
    Case("max_tokens 0", chat(max_tokens=0)),
    Case("max_tokens negative", chat(max_tokens=-1)),
    Case("max_tokens 10**6", chat(max_tokens=10**6)),
    Case("max_completion_tokens 0", chat(max_completion_tokens=0)),
    Case("n 0", chat(n=0)),
    Case("n 17", chat(n=17)),
    Case("n 10**19", chat(n=10**19)),
    Case("seed negative", chat(seed=-1)),
    Case("seed 2**63", chat(seed=2**63)),
    Case("presence_penalty 2.5", chat(presence_penalty=2.5)),
    Case("frequency_penalty -2.01", chat(frequency_penalty=-2.01)),
    Case("presence_penalty string", chat(presence_penalty="1"), 422),
    Case("frequency_penalty bool", chat(frequency_penalty=True), 422),
    Case("completions frequency_penalty 3", comp(frequency_penalty=3), path=X),
    # ---- logit_bias ------------------------------------------------------------------------------
    Case("logit_bias a list", chat(logit_bias=[1, 2]), 422),
    Case("logit_bias value string", chat(logit_bias={"5": "100"}), 422),
    Case("logit_bias value null", chat(logit_bias={"5": None}), 422),
    Case("logit_bias value 101", chat(logit_bias={"5": 101})),
    Case("logit_bias value -1e300", chat(logit_bias={"5": -1e300})),
    Case("logit_bias key word", chat(logit_bias={"hello": 1})),
    Case("logit_bias key negative", chat(logit_bias={"-1": 1})),
    Case("logit_bias key float", chat(logit_bias={"1.5": 1})),
    Case("logit_bias key with spaces", chat(logit_bias={" 5": 1})),
    Case("logit_bias key unicode digits", chat(logit_bias={"\u0665": 1})),
    Case("logit_bias key 25 digits", chat(logit_bias={"9" * 25: 1})),
    Case("logit_bias key past the vocab", chat(logit_bias={"10000000": 1})),
    Case("logit_bias too many", chat(logit_bias={str(i): 1 for i in range(P.MAX_LOGIT_BIAS_TOKENS + 1)})),
    # ---- response_format -------------------------------------------------------------------------
    Case("response_format string", chat(response_format="json"), 422),
    Case("response_format unknown type", chat(response_format={"type": "xml"}), 422),
    Case("response_format no type", chat(response_format={}), 422),
    Case("json_schema missing", chat(response_format={"type": "json_schema"})),
    Case("json_schema without name", chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), 422),
    Case("json_schema schema a list", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}}), 422),
    Case("json_schema invalid schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"type": "nonsense"}}})),
    Case("json_schema minLength string", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"type": "string", "minLength": "3"}}})),
    Case("json_schema unresolvable ref", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"$ref": "#/$defs/nothing"}}})),
    Case("json_schema remote ref", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"$ref": "http://example.com/schema.json"}}})),
    Case("json_schema impossible", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"type": "integer", "minimum": 5, "maximum": 1}}})),
    Case("json_schema too large", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
         "schema": {"type": "object", "properties": {f"p{i:05d}": {"type": "string"} for i in range(P.MAX_SCHEMA_BYTES // 20)}}}})),
    Case("json_schema nested 900 deep", json.dumps(chat(response_format={"type": "json_schema", "json_schema": {
         "name": "x", "schema": "@"}})).replace('"@"', '{"items":' * 900 + "{}" + "}" * 900).encode()),
    Case("json_schema with text type", chat(response_format={"type": "text", "json_schema": {"name": "x", "schema": {}}})),
    Case("json_object with stop", chat(response_format={"type": "json_object"}, stop=["}"])),
    Case("json_object with ignore_eos", chat(response_format={"type": "json_object"}, ignore_eos=True)),
    # ---- tools -----------------------------------------------------------------------------------
    Case("tools an object", chat(tools={"type": "function"}), 422),
    Case("tool type custom", chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), 422),
    Case("tool without function", chat(tools=[{"type": "function"}]), 422),
    Case("function without name", chat(tools=[fn(None)]), 422),
    Case("function name with spaces", chat(tools=[fn("rm -rf")])),
    Case("function name too long", chat(tools=[fn("f" * 65)])),
    Case("function names repeated", chat(tools=[fn("f"), fn("f")])),
    Case("function parameters a string", chat(tools=[fn("f", "object")]), 422),
    Case("function parameters invalid schema", chat(tools=[fn("f", {"type": "thing"})])),
    Case("function parameters unresolvable", chat(tools=[fn("f", {"$ref": "#/nope"})], tool_choice="required")),
    Case("too many tools", chat(tools=[fn(f"f{i}") for i in range(P.MAX_TOOLS + 1)])),
    Case("tool_choice unknown word", chat(tools=[fn("f")], tool_choice="any"), 422),
    Case("tool_choice names no tool", chat(tools=[fn("f")], tool_choice={"type": "function", "function": {"name": "g"}})),
    Case("tool_choice without tools", chat(tool_choice="required")),
    Case("tool_choice allowed_tools", chat(tools=[fn("f")], tool_choice={"type": "allowed_tools", "mode": "auto"}), 422),
    Case("parallel_tool_calls string", chat(tools=[fn("f")], parallel_tool_calls="no"), 422),
    Case("forced call with stop", chat(tools=[fn("f")], tool_choice="required", stop=["}"])),
    Case("tools with json response_format", chat(tools=[fn("f")], response_format={"type": "json_object"})),
    Case("tool turn without call id", chat(messages=[*CHAT, {"role": "tool", "content": "x"}])),
    Case("call id on a user turn", chat(messages=[{"role": "user", "content": "x", "tool_call_id": "call_1"}])),
    Case("tool_calls on a user turn", chat(messages=[{"role": "user", "content": "x", "tool_calls": [call()]}])),
    Case("tool call arguments an object", chat(messages=[*CHAT, {"role": "assistant", "tool_calls": [call(arguments={})]}]), 422),
    Case("tool call type other", chat(messages=[*CHAT, {"role": "assistant", "tool_calls": [call(type="code")]}]), 422),
    Case("tool call without id", chat(messages=[*CHAT, {"role": "assistant", "tool_calls": [
         {k: v for k, v in call().items() if k != "id"}]}]), 422),
    Case("tool content null", chat(messages=[*CHAT, {"role": "tool", "tool_call_id": "c", "content": None}])),
    # ---- OpenAI fields camelid does not implement ------------------------------------------------
    Case("audio", chat(audio={"voice": "alloy", "format": "wav"})),
    Case("modalities audio", chat(modalities=["text", "audio"])),
    Case("modalities unknown", chat(modalities=["video"]), 422),
    Case("prediction", chat(prediction={"type": "content", "content": "x"})),
    Case("web_search_options", chat(web_search_options={})),
    Case("reasoning_effort", chat(reasoning_effort="high")),
    Case("verbosity", chat(verbosity="low")),
    Case("functions", chat(functions=[{"name": "f", "parameters": {}}])),
    Case("function_call", chat(function_call="auto")),
    Case("completions best_of", comp(best_of=3), path=X),
    Case("top_logprobs 21", chat(logprobs=True, top_logprobs=21)),
    Case("top_logprobs negative", chat(logprobs=True, top_logprobs=-1)),
    Case("top_logprobs without logprobs", chat(top_logprobs=2)),
    Case("completions logprobs negative", comp(logprobs=-1), path=X),
    Case("completions logprobs 6", comp(logprobs=6), path=X),
    Case("completions suffix", comp(suffix="x"), path=X),
    Case("completions echo with logprobs", comp(echo=True, logprobs=1), path=X),
    Case("prompt empty string", comp(prompt=""), path=X),
    Case("prompt empty list", comp(prompt=[]), path=X),
    Case("prompt empty id list", comp(prompt=[[]]), path=X),
    Case("prompt list with empty string", comp(prompt=[""]), path=X),
    Case("prompt mixed types", comp(prompt=[1, "a"]), 422, path=X),
    Case("prompt nested three deep", comp(prompt=[[[1]]]), 422, path=X),
    Case("prompt negative id", comp(prompt=[-1]), path=X),
    Case("prompt id past vocab", comp(prompt=[10**9]), path=X),
    Case("prompt int", comp(prompt=5), 422, path=X),
    Case("prompt null", comp(prompt=None), 422, path=X),
    Case("prompt object", comp(prompt={"text": "x"}), 422, path=X),
    Case("prompt past the context", comp(prompt="word " * 1100), path=X),
    Case("max_tokens past the context", comp(max_tokens=1024), path=X),
    # ---- messages ------------------------------------------------------------------------------
    Case("user without content", chat(messages=[{"role": "user"}])),
    Case("user content null", user(None)),
    Case("system content null", chat(messages=[{"role": "system", "content": None}, *CHAT])),
    Case("content empty part list", user([])),
    Case("tool role", chat(messages=[{"role": "tool", "content": "x"}])),
    Case("too many messages", chat(messages=CHAT * (P.MAX_MESSAGES + 1))),
    Case("unknown model", chat(model="gpt-9"), 404),
    Case("model name too long", chat(model="m" * (P.MAX_MODEL_NAME_CHARS + 1))),
    # ---- sizes ---------------------------------------------------------------------------------
    Case("too many prompts", comp(prompt=["hi"] * (P.MAX_PROMPTS + 1)), path=X),
    Case("too many prompt ids", comp(prompt=[1] * (P.MAX_PROMPT_TOKENS + 1)), path=X),
    Case("too many ids in one prompt", comp(prompt=[[1], [1] * (P.MAX_PROMPT_TOKENS + 1)]), path=X),
    Case("n x prompts past the batch", comp(prompt=["a", "b", "c"], n=16), path=X),
    Case("too many stops", chat(stop=[str(i) for i in range(P.MAX_STOP + 1)])),
    Case("stop too long", chat(stop="x" * (P.MAX_STOP_CHARS + 1))),
    Case("empty stop", chat(stop=[""])),
    Case("body past the limit", comp(prompt="x" * (P.MAX_BODY_BYTES + 10)), 413, path=X),
    Case("chunked body past the limit", b"", 413, path=X, headers={"X-Chunked": "1"}),
    Case("content-length past the limit", expect=413, raw=(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000000\r\nConnection: close\r\n\r\n{}")),
    Case("content-length not a number", expect=400, raw=(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        b"Content-Length: abc\r\nConnection: close\r\n\r\n{}")),
    Case("no host header", expect=(400, 403), raw=(
        b"GET /health HTTP/1.0\r\nConnection: close\r\n\r\n")),
    # a header block that does not end is refused once past the parser's bound (h11: 16 KB), not buffered
    Case("unending header block", expect=400, raw=b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Big: " + b"a" * 40_000),
    # ---- headers: content type, Host, methods, routes ------------------------------------------
    Case("text/plain", chat(), 415, headers={"Content-Type": "text/plain"}),
    Case("no content type", chat(), 415, headers={"Content-Type": None}),
    Case("form", b"model=tiny", 415, headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("multipart", chat(), 415, headers={"Content-Type": "multipart/form-data; boundary=x"}),
    Case("application/jsonp", chat(), 415, headers={"Content-Type": "application/jsonp"}),
    Case("text/json", chat(), 415, headers={"Content-Type": "text/json"}),
    Case("two content types", chat(), 415, headers={"Content-Type": "application/json, text/plain"}),
    Case("host elsewhere", chat(), 403, headers={"Host": "evil.example"}),
    Case("host elsewhere with port", chat(), 403, headers={"Host": "evil.example:{port}"}),
    Case("host rebinding name", chat(), 403, headers={"Host": "127.0.0.1.nip.io:{port}"}),
    Case("host other port", chat(), 403, headers={"Host": "127.0.0.1:1"}),
    Case("host empty port", chat(), 403, headers={"Host": "localhost:"}),
    Case("host port not a number", chat(), 403, headers={"Host": "127.0.0.1:abc"}),
    Case("host port too long", chat(), 403, headers={"Host": "127.0.0.1:" + "9" * 5000}),
    Case("host other ipv6", chat(), 403, headers={"Host": "[::2]:{port}"}),
    Case("host on the page too", None, 403, path="/", method="GET", headers={"Host": "evil.example:{port}"}),
    Case("host on health too", None, 403, path="/health", method="GET", headers={"Host": "evil.example:{port}"}),
    Case("GET chat", None, 405, method="GET"),
    Case("PUT chat", chat(), 405, method="PUT"),
    Case("DELETE models", None, 405, path="/v1/models", method="DELETE"),
    Case("POST models", {}, 405, path="/v1/models"),
    Case("POST health", {}, 405, path="/health"),
    Case("POST metrics", {}, 405, path="/metrics"),
    Case("host on metrics too", None, 403, path="/metrics", method="GET", headers={"Host": "evil.example:{port}"}),
    Case("preflight without --allowed-origins", None, 405, method="OPTIONS",
         headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}),
    Case("unknown route", None, 404, path="/v1/nothing", method="GET"),
    Case("embeddings", {"model": MODEL, "input": "x"}, 404, path="/v1/embeddings"),
    Case("unknown model card", None, 404, path="/v1/models/gpt-9", method="GET"),
    Case("static traversal", None, 404, path="/static/%2e%2e/%2e%2e/etc/passwd", method="GET"),
    Case("static missing", None, 404, path="/static/nothing.js", method="GET"),
    Case("long path", None, 404, path="/" + "a" * 8000, method="GET"),
    # ---- streams: refused before the 200 and its events ------------------------------------------
    Case("stream top_k 10**19", chat(stream=True, top_k=10**19)),
    Case("stream tiny temperature", chat(stream=True, temperature=1e-30, logprobs=True)),
    Case("stream tiny top_p", comp(stream=True, top_p=1e-50, logprobs=1), path=X),
    Case("stream n 100", chat(stream=True, n=100)),
    Case("stream prompt past the context", comp(stream=True, prompt="word " * 1100), path=X),
    Case("stream surrogate", chat(stream=True, messages=[{"role": "user", "content": "\ud800"}])),
    Case("stream usage and bad n", chat(stream=True, stream_options={"include_usage": True}, n=0)),
    # ---- API keys --------------------------------------------------------------------------------
    Case("no key", chat(), 401, keyed=True),
    Case("bearer without key", chat(), 401, keyed=True, headers={"Authorization": "Bearer"}),
    Case("wrong key", chat(), 401, keyed=True, headers={"Authorization": "Bearer wrong"}),
    Case("basic scheme", chat(), 401, keyed=True, headers={"Authorization": f"Basic {KEY}"}),
    Case("key without scheme", chat(), 401, keyed=True, headers={"Authorization": KEY}),
    Case("key with a suffix", chat(), 401, keyed=True, headers={"Authorization": f"Bearer {KEY}x"}),
    Case("models without key", None, 401, path="/v1/models", method="GET", keyed=True),
    Case("key but text/plain", chat(), 415, keyed=True, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}),
    Case("key but host elsewhere", chat(), 403, keyed=True, headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example"}),
]


def test_the_corpus_is_large():
    assert len(CASES) > 150 and len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """The open server and one that requires KEY; each with the answer it gave before the corpus."""
    out = {}
    with contextlib.ExitStack() as stack:
        for keyed in (False, True):
            base, _ = stack.enter_context(live_server(tiny_model_dir, api_keys=[KEY] if keyed else (), max_batch_size=32,
                                                      max_queue=64))
            out[keyed] = (base, answer(base, keyed))
        yield out


def answer(base: str, keyed: bool) -> str:
    headers = {"Authorization": f"Bearer {KEY}"} if keyed else {}
    r = httpx.post(base + C, json=chat(temperature=0, max_tokens=8), headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def send(base: str, case: Case) -> tuple[int, bytes, str]:
    port = urlsplit(base).port
    if case.raw is not None:
        return send_raw(port, case.raw.replace(b"{port}", str(port).encode()))
    headers = {"Content-Type": "application/json"}
    headers.update({k: v.replace("{port}", str(port)) if isinstance(v, str) else v for k, v in case.headers.items()})
    chunked = headers.pop("X-Chunked", None)
    headers = {k: v for k, v in headers.items() if v is not None}
    body = case.body
    if chunked:
        content: Any = (b"x" * 65536 for _ in range(P.MAX_BODY_BYTES // 65536 + 2))  # a generator: sent chunked
    elif isinstance(body, bytes):
        content = body
    elif body is None:
        content = None
    else:
        content = json.dumps(body).encode()
    with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        r = http.request(case.method, case.path, content=content, headers=headers)
        return r.status_code, r.content, r.headers.get("content-type", "")


def send_raw(port: int, request: bytes) -> tuple[int, bytes, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    ctype = next((ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("content-type:")), "")
    return int(lines[0].split()[1]), body, ctype


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request_gets_a_4xx(servers, case):
    base, _ = servers[case.keyed]
    status, body, ctype = send(base, case)
    expected = case.expect if isinstance(case.expect, tuple) else (case.expect,)
    assert status in expected, (status, body[:300])
    if ctype.startswith("application/json"):  # refused by the app (the HTTP parser's own 400s are text)
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert len(err["message"]) < 1000, "an error does not echo what it was sent"
    else:
        assert case.raw is not None, f"the app answers JSON: {ctype} {body[:200]!r}"


def test_servers_alive_and_unchanged_after_the_corpus(servers):
    for keyed, (base, before) in servers.items():
        headers = {"Authorization": f"Bearer {KEY}"} if keyed else {}
        health = httpx.get(base + "/health", timeout=TIMEOUT).json()
        assert health["status"] == "ok"
        stats = health["models"][MODEL]
        assert stats["alive"] and stats["running_sequences"] == 0 and stats["queued_sequences"] == 0
        assert answer(base, keyed) == before
        stream = httpx.post(base + C, json=chat(temperature=0, max_tokens=8, stream=True), headers=headers, timeout=TIMEOUT)
        events = [e[len("data: "):] for e in stream.text.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == before
