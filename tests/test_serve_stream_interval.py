"""A stream's chunks at most every `stream_interval`: the tokens made in between go out together,
the first token and the end at once, and nothing is lost or reordered (`serve/scheduler.py`)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from camelid.engine import Engine, SamplingParams
from camelid.engine.backend import Delta
from camelid.serve.scheduler import Job, Scheduler, merge

PROMPT = "Tell me about the garden and the roses in spring"
HOLD = 3600.0  # longer than any test: only the first token and the end go out on their own


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")


def test_merge_joins_each_choices_steps_in_order():
    steps = [Delta(0, "a", [1], [-0.5], None, [[(1, -0.5)]]), Delta(1, "x", [7], [-1.0], None, [[(7, -1.0)]]),
             Delta(0, "b", [2], [-0.25], None, [[(2, -0.25)]]), Delta(0, "", [3], [-2.0], "length", [[(3, -2.0)]])]
    first, second = merge(steps)
    assert (first.index, first.text, first.token_ids, first.logprobs, first.finish_reason) == (0, "ab", [1, 2, 3], [-0.5, -0.25, -2.0], "length")
    assert first.top_logprobs == [[(1, -0.5)], [(2, -0.25)], [(3, -2.0)]]
    assert (second.index, second.text, second.token_ids) == (1, "x", [7])
    assert merge([Delta(0, "a", [1]), Delta(0, "b", [2])])[0].logprobs is None  # none asked, none made up


async def _events(sched, params, prompt_ids):
    job = Job([prompt_ids], [params], asyncio.get_running_loop())
    sched.submit(job)
    out = []
    while (item := await asyncio.wait_for(job.events.get(), 60)) is not None:
        assert not isinstance(item, Exception), item
        out.append(item)
    return out


@pytest.mark.parametrize("interval", [0.0, HOLD])
def test_held_tokens_arrive_whole_first_token_at_once(engine, interval):
    sp = SamplingParams(temperature=0.9, seed=5, max_new_tokens=12, ignore_eos=True)
    want = engine.generate([PROMPT], sp)[0]
    sched = Scheduler(engine, 4, 4, stream_interval=interval)
    try:
        events = asyncio.run(_events(sched, sp, engine.encode(PROMPT)))
    finally:
        sched.close()
    deltas = [d for ev in events for d in ev]
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert "".join(d.text for d in deltas) == want.text
    assert len(events[0][0].token_ids) == 1, "the first token is never held"
    assert deltas[-1].finish_reason == "length"
    # every step alone, or the first token and then the rest in one delta (the end releases it)
    assert len(events) == (12 if interval == 0 else 2)


def test_held_tokens_go_out_before_another_requests_prefill(engine):
    """A prefill takes a while: the running streams get what they hold before it starts."""
    sched = Scheduler(engine, 4, 4, stream_interval=HOLD)

    async def scenario():
        loop = asyncio.get_running_loop()
        long = Job([engine.encode(PROMPT)], [SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)], loop)
        sched.submit(long)
        first = await asyncio.wait_for(long.events.get(), 60)
        await asyncio.sleep(0.2)  # a few held steps
        assert long.events.empty(), "held, not sent"
        other = Job([engine.encode("Say something else")], [SamplingParams(temperature=0, max_new_tokens=2)], loop)
        sched.submit(other)
        await asyncio.wait_for(other.events.get(), 60)
        released = long.events.get_nowait()  # posted before the prefill of `other`, so already here
        sched.cancel(long)
        return first, released

    try:
        first, released = asyncio.run(scenario())
    finally:
        sched.close()
    assert len(first[0].token_ids) == 1
    assert len(released) == 1 and len(released[0].token_ids) >= 1 and released[0].finish_reason is None


def test_a_stream_over_http_carries_every_token_and_log_probability(engine, tiny_model_dir):
    from camelid.serve.app import create_app
    from camelid.serve.registry import ModelRegistry, ServedModel
    from camelid.serve.server import ServerThread
    from camelid.templates import pick_template

    registry = ModelRegistry()
    registry.add(ServedModel("m", engine, Scheduler(engine, 4, 4, stream_interval=HOLD),
                             pick_template(None, engine.tokenizer, tiny_model_dir)))
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 9,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    with ServerThread(create_app(registry)) as base, httpx.Client(base_url=base, timeout=60) as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        r = http.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    registry.close()
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    entries = [len(c["choices"][0]["logprobs"]["content"]) for c in content]
    assert entries == [1, 8], "the first token alone, the held eight together"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == whole["message"]["content"]
    streamed = [e for c in content for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == 9
