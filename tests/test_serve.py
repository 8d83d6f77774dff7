"""`camelid serve` against a real uvicorn server on an ephemeral port: the official `openai`
client for the API users call, raw HTTP (httpx) for SSE framing, errors, auth and disconnects.
Most tests use the tiny random model (greedy output is deterministic gibberish, which is all
these need); one slow test checks a real answer from the bundled model."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import CHAT, MODEL, health, live_server, openai_client, tiny_server

openai = pytest.importorskip("openai")


running = tiny_server(max_batch_size=32, max_queue=64)


@pytest.fixture(scope="module")
def url(running):
    return running.url


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url, timeout=60)


def wait_idle(url, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["active_requests"] == 0 or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def sse_events(response) -> list[str]:
    """The `data:` payloads of an SSE response, checking the framing of every event."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


# ---- the openai client ---------------------------------------------------------------------
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client, running):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # a random model does not say EOS within 12 tokens
    assert r.usage.completion_tokens == 12
    # the prompt is the conversation rendered by the model's template (ChatML here), not raw text
    served = running.model
    ids, _ = served.chat_prompt(CHAT)
    assert r.usage.prompt_tokens == len(ids)
    assert "<|im_start|>user\nHello there" in served.engine.tokenizer.decode(ids)
    assert r.usage.total_tokens == len(ids) + 12


def test_streamed_chat_equals_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=20, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1


def test_completion_with_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=24)
    text = base.choices[0].text
    assert base.object == "text_completion" and base.choices[0].finish_reason == "length"
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=24, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # a list of stops: the earliest one wins; the same holds when streamed
    stops = [stop, text[2:5]] if text[2:5].strip() else [stop]
    first = min(text.index(s) for s in stops)
    streamed = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=24,
                                         stop=stops, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:first]


def test_n_choices_and_seed(client):
    kw = dict(model=MODEL, messages=CHAT, temperature=1.0, max_tokens=10, n=3, seed=7)
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1, "n seeded choices must differ"
    assert r.usage.completion_tokens == 30
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == texts, "the same seed gives the same answers"
    comp = client.completions.create(model=MODEL, prompt=["a b c", "x y"], temperature=0, max_tokens=5, n=2)
    assert [c.index for c in comp.choices] == [0, 1, 2, 3]
    assert comp.choices[0].text == comp.choices[1].text  # greedy: both choices of a prompt agree
    assert comp.usage.completion_tokens == 20


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="one two three", temperature=0, max_tokens=6, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_completion_top_logprobs(client):
    """logprobs=3: per token a {text: logprob} of the 3 likeliest; greedy picks the first of them."""
    r = client.completions.create(model=MODEL, prompt="one two three", temperature=0, max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 5
    for tok, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3  # fewer only when two ids decode to the same text
        values = list(top.values())
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert top[tok] == pytest.approx(tok_lp) and tok_lp == pytest.approx(values[0])


def test_chat_top_logprobs_stream_equals_whole(client):
    """Chat's top_logprobs: alternatives in order, the sampled token's log-probability among them
    or below them, and the same figures streamed and whole."""
    kw = dict(model=MODEL, messages=CHAT, temperature=0.9, seed=3, max_tokens=6, logprobs=True, top_logprobs=4)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(**kw, stream=True)
                for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert len(whole) == 6
    assert [(e.token, e.logprob, [(a.token, a.logprob) for a in e.top_logprobs]) for e in streamed] == \
           [(e.token, e.logprob, [(a.token, a.logprob) for a in e.top_logprobs]) for e in whole]
    for e in whole:
        alts = [a.logprob for a in e.top_logprobs]
        assert len(alts) == 4 and alts == sorted(alts, reverse=True)
        assert e.logprob <= alts[0] + 1e-6
        assert e.token in [a.token for a in e.top_logprobs] or e.logprob <= alts[-1] + 1e-6


# ---- raw HTTP: SSE framing -----------------------------------------------------------------
def test_sse_framing_and_usage(url):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


# ---- errors: OpenAI's shape, the right status, the server stays up ---------------------------
BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("body not an object", "/v1/chat/completions", [1, 2], 422, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 422, "messages"),
    ("wrong type", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": "many"}, 422, "max_tokens"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404, "model"),
    ("temperature > 2", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": 2.5}, 400, "temperature"),
    ("temperature < 0", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("top_p > 1", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("max_tokens 0", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens < 0", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens past context", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1024}, 400, "max_tokens"),
    ("prompt longer than context", "/v1/completions", {"model": MODEL, "prompt": "word " * 1100}, 400, "prompt"),
    ("n too large", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "n": 100}, 400, "n"),
    ("logprobs > 5", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("top_logprobs > 20", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("negative seed", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "seed": -1}, 400, "seed"),
    ("too many stops", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": list("abcdefghij")}, 400, "stop"),
    ("tool turn without its call id", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     400, "messages.0.tool_call_id"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_invalid_requests(url, name, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_body_too_large_and_unknown_route(url):
    from camelid.serve.protocol import MAX_BODY_BYTES

    big = {"model": MODEL, "prompt": "x" * (MAX_BODY_BYTES + 10)}
    r = httpx.post(url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert health(url)["status"] == "ok"


# ---- concurrency, disconnects, a full queue --------------------------------------------------
def test_16_concurrent_streams(client, url):
    prompts = [f"Question {i}: tell me about the number {i * 7}." for i in range(16)]
    expected = {p: client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=16 + i).choices[0].text
                for i, p in enumerate(prompts)}

    def stream(i: int):
        chunks = list(client.completions.create(model=MODEL, prompt=prompts[i], temperature=0, max_tokens=16 + i, stream=True))
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    for p, (text, finish) in zip(prompts, results):
        assert finish == "length"
        assert text == expected[p], "batched greedy must equal the same request served alone"
    h = wait_idle(url)
    assert h["active_requests"] == 0
    assert h["models"][MODEL]["peak_running_sequences"] > 1, "requests that arrived together were batched"


def test_disconnect_frees_slot(url):
    before = health(url)["models"][MODEL]["generated_tokens"]
    body = {"model": MODEL, "prompt": "keep talking", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events arrived: it is generating
        assert any(line.startswith("data: ") for line in got)
        assert health(url)["active_requests"] == 1
    h = wait_idle(url)  # leaving the block closed the connection mid-stream
    assert h["active_requests"] == 0 and h["models"][MODEL]["running_sequences"] == 0
    assert h["models"][MODEL]["generated_tokens"] - before < 1000, "the cancelled request kept generating"
    # a non-streaming request whose client times out is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=0.5))
    assert wait_idle(url)["active_requests"] == 0


def test_full_queue_answers_503(tiny_model_dir):
    body = {"model": "q", "prompt": "go", "max_tokens": 1000, "stream": True}
    with live_server(tiny_model_dir, name="q", max_batch_size=1, max_queue=1) as (base, _), \
            httpx.Client(base_url=base, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)
            with http.stream("POST", "/v1/completions", json=body):  # headers come at once; it waits
                assert health(base)["models"]["q"]["queued_requests"] == 1
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 503 and r.headers["retry-after"].isdigit()
                assert r.json()["error"]["code"] == "server_overloaded"
        assert wait_idle(base)["active_requests"] == 0


# ---- API keys ---------------------------------------------------------------------------------
def test_api_key_required(tiny_model_dir):
    key = "sk-test-" + "k" * 24
    with live_server(tiny_model_dir, api_keys=[key, "second-key"]) as (base, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"}):
            r = httpx.get(base + "/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert key not in r.text
        assert httpx.get(base + "/health", timeout=10).status_code == 200  # liveness stays open
        good = openai_client(base, api_key=key)
        assert [m.id for m in good.models.list().data] == [MODEL]
        r = good.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
        assert r.usage.completion_tokens == 3
        bad = openai_client(base, api_key="nope")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# ---- the command line -------------------------------------------------------------------------
def test_cli_serves_on_a_free_port(tiny_model_dir, tmp_path):
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("# accepted keys\nfile-key-1\n")
    cmd = [sys.executable, "-m", "camelid", "serve", "--backend", "torch", "--model", str(tiny_model_dir), "--served-model-name",
           "cli-tiny", "--port", "0", "--device", "cpu", "--dtype", "float32", "--api-key-file", str(keyfile), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CAMELID_API_KEY": ""})
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "camelid serve:" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "server exited early"
        assert "API key required" in line and "file-key-1" not in line
        base = line.split(" on ")[1].split()[0]
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer file-key-1"}, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["cli-tiny"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_rejects_bad_flags():
    r = subprocess.run([sys.executable, "-m", "camelid", "serve", "--port", "70000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "port" in r.stderr and "Traceback" not in r.stderr


# ---- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_answers(bundled_dir):
    with live_server(bundled_dir, name="smollm2-135m") as (base, _):
        client = openai_client(base)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=24)
        assert "Paris" in whole.choices[0].message.content
        assert whole.choices[0].finish_reason == "stop"  # it ends its turn with <|im_end|>
        streamed = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0,
                                                  max_tokens=24, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content


def test_a_small_request_is_parsed_on_the_event_loop_and_a_large_one_in_a_worker_thread():
    """`parse_body` and the prompt work after it (`off_loop`) run on the event loop for a body of at
    most INLINE_BYTES (a thread hop costs more than the work) and in a worker thread above it (a
    large body must not stall the streams the loop serves); the body parses the same either way."""
    import asyncio
    import threading

    from starlette.requests import Request

    from camelid.serve import protocol as P
    from camelid.serve.openai_api import INLINE_BYTES, off_loop, parse_body

    def request_of(body: bytes) -> Request:
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}
        return Request({"type": "http", "method": "POST", "headers": [], "state": {}}, receive)

    async def where(prompt_chars: int) -> tuple[bool, bool, str]:
        """(body small, prompt work on the loop's thread, the parsed prompt)."""
        body = json.dumps({"model": "m", "prompt": "x" * prompt_chars}).encode()
        request = request_of(body)
        req = await parse_body(request, P.CompletionRequest)
        on_loop = await off_loop(request, threading.get_ident) == threading.get_ident()
        return len(body) <= INLINE_BYTES, on_loop, req.prompt

    for chars in (10, INLINE_BYTES - 40, INLINE_BYTES + 10, 200_000):
        small, on_loop, prompt = asyncio.run(where(chars))
        assert on_loop == small and prompt == "x" * chars
