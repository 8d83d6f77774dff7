"""One request cannot fail the others: a row whose parameters break sampling, or whose sequence
breaks the shared forward pass, ends alone, in the engine's batch, in the scheduler and over
HTTP, while the requests beside it finish with exactly the text they get when run alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from camelid.engine import Engine, SamplingParams

PROMPT = "Tell me about the garden and the roses in spring"
GOOD = SamplingParams(temperature=0.9, seed=11, max_new_tokens=10)


def broken_params() -> SamplingParams:
    """Parameters no sampler can use, past validation (as a value that slipped through would be):
    more alternatives per token than the vocabulary has."""
    sp = SamplingParams(temperature=0.9, max_new_tokens=10)
    object.__setattr__(sp, "top_logprobs", 10**6)
    return sp


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def long_context_engine(tiny_model_dir):
    """An engine told its context is 2048 on a model with 1024 positions (what `--max-context`
    now refuses): a sequence that reaches position 1024 breaks the shared forward pass."""
    eng = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32", max_context=2048)
    if eng.fast is None:
        pytest.skip("the fast path is off (CAMELID_FAST_PATH=0 or CAMELID_CPU_FAST=0): "
                    "the library forward has no rotary table to run past")
    return eng


def alone(engine, prompt, sp) -> list[int]:
    return engine.generate([prompt], sp)[0].token_ids


def drive(batch) -> dict[int, list]:
    """Run a batch to its end; every delta per row id."""
    out: dict[int, list] = {}
    while batch.rows:
        for d in batch.step():
            out.setdefault(d.index, []).append(d)
    return out


def test_a_row_whose_sampling_fails_ends_alone(engine):
    import torch

    want = alone(engine, PROMPT, GOOD)
    batch = engine.new_batch()
    with torch.inference_mode():
        (first,) = list(batch.add([0, 1], [PROMPT, PROMPT], [GOOD, broken_params()]))
        rest = drive(batch)
    bad = [d for d in first if d.index == 1]
    assert bad[0].finish_reason == "error" and isinstance(bad[0].error, RuntimeError)
    assert 1 not in rest, "the failed row left the batch"
    good = [d for d in first if d.index == 0] + rest[0]
    assert [t for d in good for t in d.token_ids] == want, "the seeded row drew what it draws alone"
    assert good[-1].finish_reason == "length"


def test_a_row_that_breaks_the_shared_forward_is_found_by_rebuilding(long_context_engine, engine):
    import torch

    eng = long_context_engine
    long_ids = eng.encode("word " * 2000)[:1020]  # reaches position 1024 on its fourth new token
    short = SamplingParams(temperature=0, max_new_tokens=8)
    want = alone(engine, PROMPT, short)
    batch = eng.new_batch()
    got: dict[int, list] = {}
    with torch.inference_mode():
        for deltas in batch.add([0, 1], [long_ids, PROMPT], [SamplingParams(temperature=0, max_new_tokens=8), short]):
            for d in deltas:
                got.setdefault(d.index, []).append(d)
        with pytest.raises(IndexError):
            while True:
                for d in batch.step():
                    got.setdefault(d.index, []).append(d)
        for d in batch.rebuild():
            got.setdefault(d.index, []).append(d)
        for i, ds in drive(batch).items():
            got[i] += ds
    assert got[0][-1].finish_reason == "error" and got[0][-1].error is not None
    assert [t for d in got[1] for t in d.token_ids] == want, "the other row went on exactly"
    assert got[1][-1].finish_reason == "length"


def run_with_rebuild(batch, ids, prompts, params, rebuild_at: int) -> dict[int, list[int]]:
    """Token ids per row, with `batch.rebuild()` standing in for the step at `rebuild_at`."""
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    for deltas in batch.add(ids, prompts, params):
        for d in deltas:
            tokens[d.index] += d.token_ids
    n = 0
    while batch.rows:
        n += 1
        for d in batch.rebuild() if n == rebuild_at else batch.step():
            tokens[d.index] += d.token_ids
    return tokens


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_rebuild_continues_every_row_where_it_was(backend, engine, request):
    """`rebuild` recomputes each row from its tokens: greedy and seeded rows go on as if nothing
    happened, and a cancelled row ends."""
    import torch

    from camelid.engine.backend import Backend, RowBatch

    eng = engine if backend == "torch" else request.getfixturevalue("gguf_engine")
    assert isinstance(eng, Backend) and isinstance(eng.new_batch(), RowBatch), "one interface, both backends"
    params = [SamplingParams(temperature=0, max_new_tokens=9), GOOD, SamplingParams(temperature=0, max_new_tokens=4)]
    prompts = [PROMPT, "Hi", "The quick brown fox"]
    with torch.inference_mode():
        want = [[t for step in eng.stream([p], sp) for d in step for t in d.token_ids] for p, sp in zip(prompts, params)]
        got = run_with_rebuild(eng.new_batch(), [0, 1, 2], prompts, params, rebuild_at=3)
        assert [got[i] for i in range(3)] == want
        batch = eng.new_batch()
        list(batch.add([0, 1], prompts[:2], params[:2]))
        batch.cancel([1])
        ends = {d.index: d.finish_reason for d in batch.rebuild()}
        assert ends[1] == "cancelled" and ends[0] is None and [r.rid for r in batch.rows] == [0]
        batch.close()


@pytest.fixture(scope="module")
def gguf_engine(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from camelid.engine.llamacpp import load_llamacpp_engine
    from camelid.export.core import ExportConfig, export_gguf

    out = tmp_path_factory.mktemp("lcpp") / "tiny-f16.gguf"
    path = export_gguf(ExportConfig(model=str(tiny_model_dir), out=str(out), quant="f16", progress=False, modelfile=False)).path
    eng = load_llamacpp_engine(str(path), threads=2, max_context=512, parallel=4)
    yield eng
    eng.close()


def test_llamacpp_row_whose_sampling_fails_ends_alone(gguf_engine):
    eng = gguf_engine
    want = alone(eng, PROMPT, GOOD)
    batch = eng.new_batch()
    try:
        (first,) = list(batch.add([0, 1], [PROMPT, PROMPT], [GOOD, broken_params()]))
        assert [d.finish_reason for d in first if d.index == 1] == ["error"]
        rest = drive(batch)
        assert [t for d in [*(d for d in first if d.index == 0), *rest[0]] for t in d.token_ids] == want
        assert len(eng._free_slots) == eng.parallel - len(batch.rows) == eng.parallel, "the failed row's slot is free"
    finally:
        batch.close()


# ---- the scheduler ------------------------------------------------------------------------------
async def run_jobs(scheduler, jobs_spec) -> list:
    """Submit (prompt ids, params) jobs together; per job its token ids, or the exception it got."""
    from camelid.serve.scheduler import Job

    loop = asyncio.get_running_loop()
    jobs = [Job([ids] * len(ps), ps, loop) for ids, ps in jobs_spec]
    for job in jobs:
        scheduler.submit(job)

    async def result(job):
        tokens = []
        while (item := await asyncio.wait_for(job.events.get(), 60)) is not None:
            if isinstance(item, Exception):
                return item
            tokens += [t for d in item for t in d.token_ids]
        return tokens

    return await asyncio.gather(*(result(j) for j in jobs))


def test_scheduler_fails_only_the_request_whose_row_fails(engine):
    from camelid.serve.scheduler import Scheduler

    want = alone(engine, PROMPT, GOOD)
    ids = engine.encode(PROMPT)
    sched = Scheduler(engine, max_batch_size=8, max_queue=8)
    try:
        # the broken request has a good choice too: that one leaves the batch with it
        good, bad, again = asyncio.run(run_jobs(sched, [([*ids], [GOOD]), ([*ids], [GOOD, broken_params()]), ([*ids], [GOOD])]))
        assert good == want and again == want
        assert isinstance(bad, RuntimeError)
        stats = sched.stats()
        assert stats["alive"] and stats["running_sequences"] == 0 and stats["completed_requests"] == 2
        (after,) = asyncio.run(run_jobs(sched, [([*ids], [GOOD])]))
        assert after == want, "the scheduler goes on serving"
    finally:
        sched.close()


def test_scheduler_recovers_from_a_failed_shared_step(long_context_engine, engine):
    from camelid.serve.scheduler import Scheduler

    eng = long_context_engine
    short = SamplingParams(temperature=0, max_new_tokens=12)
    want = alone(engine, PROMPT, short)
    sched = Scheduler(eng, max_batch_size=8, max_queue=8)
    try:
        long_ids = eng.encode("word " * 2000)[:1020]
        broken, ok = asyncio.run(run_jobs(sched, [(long_ids, [SamplingParams(temperature=0, max_new_tokens=12)]),
                                                  (eng.encode(PROMPT), [short])]))
        assert isinstance(broken, IndexError)
        assert ok == want
        assert sched.stats()["alive"]
    finally:
        sched.close()


# ---- over HTTP ----------------------------------------------------------------------------------
def test_a_failing_request_beside_a_stream_over_http(long_context_engine, tiny_model_dir):
    """A request whose sequence breaks the shared forward (one the server could only get with a
    --max-context it now refuses) streams beside another: that one ends with an in-band error,
    the other stream completes with the text it has alone."""
    from camelid.serve.app import create_app
    from camelid.serve.registry import ModelRegistry, ServedModel
    from camelid.serve.scheduler import Scheduler
    from camelid.serve.server import ServerThread
    from camelid.templates import pick_template

    eng = long_context_engine
    registry = ModelRegistry()
    registry.add(ServedModel("m", eng, Scheduler(eng, 8, 8), pick_template(None, eng.tokenizer, tiny_model_dir)))
    # long enough to still be running when the other request fails, four steps after it joins
    chat = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 400,
            "ignore_eos": True}
    with ServerThread(create_app(registry)) as base, httpx.Client(base_url=base, timeout=60) as http:
        whole = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
        long_ids = eng.encode("word " * 2000)[:1020]
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as good:
            lines = good.iter_lines()
            assert next(lines).startswith("data: ")  # it is running
            bad = http.post("/v1/completions", json={"model": "m", "prompt": long_ids, "max_tokens": 12, "temperature": 0})
            events = [line[len("data: "):] for line in [*lines] if line.startswith("data: ")]
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        health = http.get("/health").json()
        assert health["status"] == "ok"
        assert health["models"]["m"]["peak_running_sequences"] >= 2, "the two ran in one batch"
    registry.close()
