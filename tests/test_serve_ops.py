"""Operations on a live server: `/metrics` parsed by prometheus_client (counters move as requests
are made, one registry per app), SSE keep-alive comments while a stream waits in the queue, and
CORS with --allowed-origins (off by default; the Host, content-type and key checks still apply),
and connections that send each streamed chunk at once (TCP_NODELAY)."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import CHAT, MODEL, live_server, openai_client

openai = pytest.importorskip("openai")
DEADLINE_S = 60


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    with live_server(tiny_model_dir, max_batch_size=8, max_queue=32) as served:
        yield served


def test_metrics_move_with_requests(served):
    url, _ = served
    client = openai_client(url, timeout=60)
    before = scrape(url)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=7)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=5)
    httpx.get(url + "/no/such/page", timeout=10)
    after = scrape(url)
    chat = "/v1/chat/completions"
    assert value(after, "camelid_requests_total", route=chat, status="200") == value(before, "camelid_requests_total", route=chat, status="200") + 1
    assert value(after, "camelid_requests_total", route=chat, status="400") == value(before, "camelid_requests_total", route=chat, status="400") + 1
    assert value(after, "camelid_requests_total", route="unmatched", status="404") >= 1
    assert value(after, "camelid_generated_tokens_total", model=MODEL) - value(before, "camelid_generated_tokens_total", model=MODEL) == r.usage.completion_tokens
    ttft = "camelid_time_to_first_token_seconds_count"
    per_token = "camelid_time_per_output_token_seconds_count"
    assert value(after, ttft, model=MODEL) == value(before, ttft, model=MODEL) + 1
    assert value(after, per_token, model=MODEL) == value(before, per_token, model=MODEL) + r.usage.completion_tokens - 1
    assert value(after, "camelid_queue_sequences", model=MODEL) == 0
    assert value(after, "camelid_running_sequences", model=MODEL) == 0


def test_each_app_has_its_own_registry(served, tiny_model_dir):
    url, _ = served
    with live_server(tiny_model_dir, max_batch_size=2) as (other, _):
        httpx.get(other + "/health", timeout=10)
        assert value(scrape(other), "camelid_requests_total", route="/health", status="200") == 1
    assert value(scrape(url), "camelid_requests_total", route="/metrics", status="200") >= 1


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, bundled_dir):
    """A random Llama with room for the longest answer a request may ask for (MAX_NEW_TOKENS): a
    request that holds the only batch slot for thousands of steps."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("long-llama")
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_keepalive_while_queued_and_queue_gauge(long_model_dir):
    from camelid.serve.protocol import MAX_NEW_TOKENS

    body = {"model": MODEL, "messages": CHAT, "stream": True, "temperature": 0}
    with live_server(long_model_dir, max_batch_size=1, app_options={"sse_keepalive_s": 0.01}) as (url, _), \
            httpx.Client(base_url=url, timeout=DEADLINE_S) as http:
        # One sequence at a time: a long stream holds the slot, the second waits in the queue.
        with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True}) as blocker:
            assert blocker.status_code == 200
            running = blocker.iter_lines()  # held: a dropped iterator closes the connection, which cancels
            next(running)
            with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 4}) as waiting:
                lines = waiting.iter_lines()
                before = []  # what came before the first keep-alive: the role chunk alone
                for line in lines:
                    if line == ": keep-alive":
                        break
                    before += [json.loads(line[len("data: "):])["choices"][0]["delta"]] if line else []
                assert before == [{"role": "assistant", "content": ""}]
                samples = scrape(url)
                assert value(samples, "camelid_queue_sequences", model=MODEL) == 1
                assert value(samples, "camelid_running_sequences", model=MODEL) == 1
                blocker.close()  # frees the slot
                events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        # the openai client reads past the comments
        client = openai_client(url, timeout=DEADLINE_S)
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL, messages=CHAT, temperature=0, max_tokens=6, stream=True))
        assert text == client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=6).choices[0].message.content


PAGE = "http://app.example:3000"
PREFLIGHT = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_no_cors_by_default(served):
    url, _ = served
    r = httpx.options(url + "/v1/chat/completions", headers=PREFLIGHT, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
                   headers={"Origin": PAGE}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_allowed_origins(tiny_model_dir):
    from camelid.serve.server import ServeConfig

    with pytest.raises(ValueError, match="allowed-origins"):
        ServeConfig(allowed_origins=("http://app.example:3000/page",))
    key = "sk-cors-test-key"
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1}
    with live_server(tiny_model_dir, api_keys=[key], app_options={"allowed_origins": [PAGE]}, max_batch_size=2) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as http:
        ok = http.options("/v1/chat/completions", headers=PREFLIGHT)  # no key: a preflight carries none
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PAGE
        other = http.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        auth = {"Origin": PAGE, "Authorization": f"Bearer {key}"}
        r = http.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
        # refusals are readable by the page and still refusals
        no_key = http.post("/v1/chat/completions", json=body, headers={"Origin": PAGE})
        assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == PAGE
        plain = http.post("/v1/chat/completions", content=json.dumps(body), headers={**auth, "Content-Type": "text/plain"})
        assert plain.status_code == 415
        assert http.post("/v1/chat/completions", json=body, headers={**auth, "Host": "evil.example"}).status_code == 403


def test_cli_takes_allowed_origins(tiny_model_dir):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "camelid", "serve", "--model", str(tiny_model_dir), "--allowed-origins",
                        "ftp://x"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "allowed-origins" in r.stderr and "Traceback" not in r.stderr


def _loops():
    import asyncio

    yield pytest.param(asyncio.new_event_loop, id="asyncio")
    try:
        import uvloop
    except ImportError:  # Windows: the server runs on asyncio's loop
        return
    yield pytest.param(uvloop.new_event_loop, id="uvloop")


@pytest.mark.parametrize("new_loop", _loops())
def test_connections_send_each_write_at_once(new_loop):
    """The server's connections have Nagle's algorithm off (TCP_NODELAY), as asyncio (and uvloop,
    the server's loop where installed) set it on a connection of the listening socket `bind`
    makes: otherwise each streamed chunk waits for the client's delayed ACK of the one before."""
    import asyncio
    import socket

    from camelid.serve.server import bind

    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = bind("127.0.0.1", 0)
        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            flag = await asyncio.wait_for(seen, DEADLINE_S)
            writer.close()
        return flag

    loop = new_loop()
    try:
        assert loop.run_until_complete(main()) != 0
    finally:
        loop.close()


def test_steps_waiting_together_come_out_together():
    """A stream that fell behind gets the steps already waiting as one list, in order (one write),
    then the end; a failure after them still reaches the handler after the steps before it; with
    nothing to read, a keep-alive tick (None) each `idle_s`."""
    import asyncio

    from camelid.serve.openai_api import job_events
    from camelid.serve.scheduler import Job

    async def read(items, idle_s=None, ticks=0):
        job = Job([[1]], [None], asyncio.get_running_loop())
        for item in items:
            job.events.put_nowait(item)
        out = []
        with contextlib.suppress(RuntimeError):
            async for deltas in job_events(job, idle_s):
                out.append(deltas)
                if deltas is None and len(out) == ticks:
                    job.events.put_nowait(["late"])
                    job.events.put_nowait(None)
        return out

    assert asyncio.run(read([["a"], ["b", "c"], ["d"], None])) == [["a", "b", "c", "d"]]
    assert asyncio.run(read([["a"], ["b"], RuntimeError("boom"), ["never"]])) == [["a", "b"]]
    assert asyncio.run(read([], idle_s=0.01, ticks=2)) == [None, None, ["late"]]
