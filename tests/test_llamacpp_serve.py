"""Continuous batching on the llama.cpp backend: running requests decode together, one
llama_decode per step (each its own sequence; new prompts join the running rows' decode), and
over a real HTTP server concurrent requests get exactly the greedy text they get one at a time,
while one client's bad request fails alone."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

from camelid.engine import SamplingParams  # noqa: E402
from camelid.engine.llamacpp import COPY_CELLS_PER_TOKEN, load_llamacpp_engine  # noqa: E402
from camelid.export.core import ExportConfig, export_gguf  # noqa: E402

PARALLEL = 4
SEQ_CONTEXT = 256
PROMPTS = [f"Question {i}: tell me about the number {i * 7}." for i in range(6)]  # more than PARALLEL: some wait


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcpp-serve") / "tiny-f16.gguf"
    return export_gguf(ExportConfig(model=str(tiny_model_dir), out=str(out), quant="f16", progress=False, modelfile=False)).path


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    eng = load_llamacpp_engine(str(tiny_gguf), threads=2, max_context=SEQ_CONTEXT, parallel=PARALLEL)
    yield eng
    eng.close()


def decode_sizes(engine, monkeypatch) -> list[int]:
    """The token count of each llama_decode the engine makes from here on (the test's list)."""
    calls: list[int] = []
    real = engine.ctx.decode
    monkeypatch.setattr(engine.ctx, "decode", lambda batch: (calls.append(batch.batch.n_tokens), real(batch))[1])
    return calls


def test_prefill_and_each_step_are_one_decode_for_all_rows(engine, monkeypatch):
    import torch

    from camelid.engine.backend import Backend, RowBatch

    assert isinstance(engine, Backend) and isinstance(engine.new_batch(), RowBatch)

    calls = decode_sizes(engine, monkeypatch)
    params = [SamplingParams(temperature=0, max_new_tokens=5 + i) for i in range(3)]
    want = [c.token_ids for c in (engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params))]
    got = {i: [] for i in range(3)}
    batch = engine.new_batch()
    engine.clear_cache()  # the prompts are cached from the runs above: prefill them in full
    calls.clear()
    with torch.inference_mode():
        for deltas in batch.add([0, 1, 2], PROMPTS[:3], params):
            for d in deltas:
                got[d.index] += d.token_ids
        assert calls == [sum(len(engine.encode(p)) for p in PROMPTS[:3])], "the three prompts prefilled in one decode"
        while batch.rows:
            calls.clear()
            running = len(batch.rows)
            for d in batch.step():
                got[d.index] += d.token_ids
            assert calls == [running], "one decode holds one token of every running row"
    assert [got[i] for i in range(3)] == want, "batched greedy equals each prompt alone"
    assert sorted(engine._free_slots) == list(range(PARALLEL))


def test_a_prompt_added_to_running_rows_shares_their_next_decode(engine, monkeypatch):
    """A request that joins running rows is prefilled in the same llama_decode as their next
    tokens (as llama-server batches them), and every row still gets its greedy text alone."""
    import torch

    from camelid.utils import shared_start

    calls = decode_sizes(engine, monkeypatch)
    params = [SamplingParams(temperature=0, max_new_tokens=6) for _ in range(3)]
    want = [engine.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    engine.clear_cache()
    got = {i: [] for i in range(3)}
    batch = engine.new_batch()
    with torch.inference_mode():
        for deltas in batch.add([0, 1], PROMPTS[:2], params[:2]):
            for d in deltas:
                got[d.index] += d.token_ids
        for d in batch.step():
            got[d.index] += d.token_ids
        calls.clear()
        for deltas in batch.add([2], PROMPTS[2:3], params[2:]):
            for d in deltas:
                got[d.index] += d.token_ids
        # the new prompt copies the start it shares with a running row when that pays (its own test below)
        lent = max(shared_start(engine.encode(PROMPTS[2]), engine.encode(p)) for p in PROMPTS[:2])
        own = len(engine.encode(PROMPTS[2])) - (lent if lent * COPY_CELLS_PER_TOKEN >= engine.max_context else 0)
        assert calls == [2 + own], "two running tokens and the new prompt in one decode"
        assert [len(got[i]) for i in range(3)] == [3, 3, 1], "the running rows advanced by one token with it"
        while batch.rows:
            for d in batch.step():
                got[d.index] += d.token_ids
    assert [got[i] for i in range(3)] == want
    assert sorted(engine._free_slots) == list(range(PARALLEL))


def test_decode_takes_items_in_any_sequence_order(engine):
    """Items of several sequences, interleaved and out of order, give each wanted item its own
    logits, in the items' order (llama.cpp gets them sorted by sequence)."""
    import numpy as np

    prompts = [engine.encode(p) for p in PROMPTS[:3]]
    slots = [engine.take_slot() for _ in prompts]
    try:
        alone = []
        for slot, ids in zip(slots, prompts):
            alone += engine.decode([(t, i, slot, i == len(ids) - 1) for i, t in enumerate(ids)])
            engine.reuse(slot, ())
        items = [(t, i, slot, i == len(ids) - 1) for slot, ids in zip(slots, prompts) for i, t in enumerate(ids)]
        items = items[::-1]  # last sequence first, each one's positions backwards
        together = engine.decode(items)
        wanted = [slots.index(it[2]) for it in items if it[3]]
        assert wanted == [2, 1, 0]
        for got, k in zip(together, wanted):
            assert np.abs(got - alone[k]).max() < 1e-3 * np.abs(alone[k]).max() + 1e-4
    finally:
        for slot in slots:
            engine.release_slot(slot)


def test_a_request_reuses_the_cache_of_one_that_started_the_same_way(engine, monkeypatch):
    """A sequence keeps its cache after its request; a request that starts the same way (the same
    prompt again, the next turn of a conversation) prefills only what is new, and its answer is
    the one a full prefill gives. A sequence whose decode failed is not reused."""
    real = engine.ctx.decode
    calls = decode_sizes(engine, monkeypatch)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    engine.clear_cache()
    first = engine.generate([PROMPTS[0]], greedy)[0]
    n_prompt = len(engine.encode(PROMPTS[0]))
    assert calls[0] == n_prompt
    calls.clear()
    assert engine.generate([PROMPTS[0]], greedy)[0].token_ids == first.token_ids
    assert calls[0] == 1, "the same prompt again: only its last token is decoded (for its logits)"
    turn = engine.encode(PROMPTS[0]) + first.token_ids + engine.encode(" And then?")
    calls.clear()
    again = engine.generate([turn], greedy)[0]
    # the cache holds the prompt and the answer but its last token (sampled, never fed back)
    assert calls[0] == len(turn) - (n_prompt + len(first.token_ids) - 1)
    engine.clear_cache()
    calls.clear()
    assert engine.generate([turn], greedy)[0].token_ids == again.token_ids
    assert calls[0] == len(turn), "after clear_cache the prompt is prefilled in full"

    def fail(batch):
        if batch.batch.n_tokens == 1:
            raise RuntimeError("decode failed")
        return real(batch)

    ids = engine.encode(PROMPTS[1])
    monkeypatch.setattr(engine.ctx, "decode", fail)
    with pytest.raises(RuntimeError):
        engine.generate([PROMPTS[1]], greedy)  # its prompt was prefilled, then its first step failed
    assert all(engine._cached[s][: len(ids)] != ids for s in engine._free_slots), "a failed sequence is not kept"
    monkeypatch.setattr(engine.ctx, "decode", real)
    engine.clear_cache()
    assert engine.generate([PROMPTS[1]], greedy)[0].token_ids == engine.generate([PROMPTS[1]], greedy)[0].token_ids


def test_a_request_sharing_only_a_start_copies_it_and_leaves_the_other_cache(engine, monkeypatch):
    """Two conversations with the same system prompt take turns: the second copies the shared start
    from the first one's sequence into a sequence of its own (prefilling only its own part, with
    a full prefill's answer), and the first one's cache survives for its next request."""
    from camelid.utils import shared_start

    calls = decode_sizes(engine, monkeypatch)
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    system = "You are a terse assistant who answers every question in one short line. "
    a, b = system + "What is two plus two?", system + "Name a colour of the sky."
    shared = shared_start(engine.encode(a), engine.encode(b))
    assert shared >= 10 and shared * COPY_CELLS_PER_TOKEN >= engine.max_context  # long enough to be copied
    engine.clear_cache()
    out_a = engine.generate([a], greedy)[0]
    calls.clear()
    out_b = engine.generate([b], greedy)[0]
    assert calls[0] == len(engine.encode(b)) - shared, "only the second conversation's own part is prefilled"
    calls.clear()
    assert engine.generate([a], greedy)[0].token_ids == out_a.token_ids
    assert calls[0] == 1, "the first conversation's cache survived the second"
    engine.clear_cache()
    calls.clear()
    assert engine.generate([b], greedy)[0].token_ids == out_b.token_ids, "the copied start gives a full prefill's answer"
    assert calls[0] == len(engine.encode(b))
    assert sorted(engine._free_slots) == list(range(PARALLEL))


def test_a_new_conversation_copies_the_start_a_running_one_holds(engine, monkeypatch):
    """A conversation that joins a running one with the same system prompt (a burst reaching a
    fresh server) copies the shared start from the running row's sequence and prefills only its
    own part, in the running row's next decode; both answers are what each gets alone."""
    import torch

    from camelid.utils import shared_start

    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    system = "You are a terse assistant who answers every question in one short line. "
    a, b = system + "What is two plus two?", system + "Name a colour of the sky."
    shared = shared_start(engine.encode(a), engine.encode(b))
    assert shared * COPY_CELLS_PER_TOKEN >= engine.max_context  # long enough to be copied
    engine.clear_cache()
    want = [engine.generate([p], greedy)[0].token_ids for p in (a, b)]
    engine.clear_cache()
    calls = decode_sizes(engine, monkeypatch)
    got = {0: [], 1: []}
    batch = engine.new_batch()
    with torch.inference_mode():
        for deltas in batch.add([0], [a], [greedy]):
            for d in deltas:
                got[d.index] += d.token_ids
        assert calls == [len(engine.encode(a))]
        calls.clear()
        for deltas in batch.add([1], [b], [greedy]):
            for d in deltas:
                got[d.index] += d.token_ids
        assert calls == [1 + len(engine.encode(b)) - shared], "the running row's token and b's own part"
        while batch.rows:
            for d in batch.step():
                got[d.index] += d.token_ids
    assert [got[0], got[1]] == want, "the copied start gives a full prefill's answer"
    assert sorted(engine._free_slots) == list(range(PARALLEL))


def test_running_rows_keep_consecutive_sequence_ids(engine, monkeypatch):
    """llama.cpp runs a batch in one pass only over consecutive sequence ids: when requests end
    and leave gaps, the rows still running swap into them (caches copied both ways), every row's
    greedy text is still what it gets alone, and the cache a gap held survives the swap."""
    import torch

    lengths = [2, 9, 3, 9]  # the first and third end early and leave gaps
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in lengths]
    want = [engine.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    engine.clear_cache()
    seqs: list[list[int]] = []
    real = engine.decode
    monkeypatch.setattr(engine, "decode", lambda items: (seqs.append(sorted({it[2] for it in items})), real(items))[1])
    got = {i: [] for i in range(4)}
    batch = engine.new_batch()
    with torch.inference_mode():
        for deltas in batch.add([0, 1, 2, 3], PROMPTS[:4], params):
            for d in deltas:
                got[d.index] += d.token_ids
        while batch.rows:
            for d in batch.step():
                got[d.index] += d.token_ids
    assert [got[i] for i in range(4)] == want, "moved rows continue exactly"
    assert [len(s) for s in seqs] == [4, 4, 3, 2, 2, 2, 2, 2, 2], "two rows ended, after one and two steps"
    assert all(s == list(range(s[0], s[0] + len(s))) for s in seqs), f"consecutive ids in every decode: {seqs}"
    assert sorted(engine._free_slots) == list(range(PARALLEL))
    monkeypatch.setattr(engine, "decode", real)
    calls = decode_sizes(engine, monkeypatch)
    for p, sp, out in zip(PROMPTS[:4], params, want):
        calls.clear()
        assert engine.generate([p], sp)[0].token_ids == out
        assert calls[0] == 1, "each finished request's cache survived the swaps"


def _serve(eng, tiny_model_dir):
    """A registry serving a loaded llama.cpp engine as "m", through the server's own scheduler."""
    from camelid.serve.registry import ModelRegistry, ServedModel
    from camelid.serve.scheduler import Scheduler
    from camelid.templates import pick_template

    registry = ModelRegistry()
    registry.add(ServedModel("m", eng, Scheduler(eng, PARALLEL, 64), pick_template(None, eng.tokenizer, tiny_model_dir)))
    return registry


def test_concurrent_requests_over_http_equal_one_at_a_time(tiny_gguf):
    """`camelid serve --backend llama.cpp` (build_registry from its config): more concurrent
    streams than sequences; each gets the text it gets alone, and requests ran batched."""
    from camelid.engine.llamacpp import LlamaCppEngine
    from camelid.serve.app import create_app
    from camelid.serve.server import ServeConfig, ServerThread, build_registry

    registry = build_registry(ServeConfig(model=str(tiny_gguf), served_model_name="m", backend="llama.cpp",
                                          max_batch_size=PARALLEL, max_context=SEQ_CONTEXT, threads=2))
    assert isinstance(registry.get("m").engine, LlamaCppEngine) and registry.get("m").engine.parallel == PARALLEL
    body = {"model": "m", "temperature": 0}
    try:
        with ServerThread(create_app(registry)) as base, httpx.Client(base_url=base, timeout=120) as http:
            alone = [http.post("/v1/completions", json={**body, "prompt": p, "max_tokens": 8 + i}).json()["choices"][0]["text"]
                     for i, p in enumerate(PROMPTS)]

            def stream(i: int) -> tuple[str, str]:
                with httpx.Client(base_url=base, timeout=120) as own:
                    r = own.post("/v1/completions", json={**body, "prompt": PROMPTS[i], "max_tokens": 8 + i, "stream": True})
                chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
                return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]

            with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
                together = list(pool.map(stream, range(len(PROMPTS))))
            stats = http.get("/health").json()["models"]["m"]
    finally:
        registry.close()
    assert [t for t, _ in together] == alone
    assert all(finish == "length" for _, finish in together)
    assert stats["peak_running_sequences"] > 1, "requests that arrived together ran in one batch"


def test_a_bad_request_beside_a_stream_fails_alone(tiny_gguf, tiny_model_dir):
    """Beside a running stream: a request the API refuses (400), and one whose sequence breaks
    the shared llama_decode (its KV slice overflows: an engine told a longer context than its
    sequences hold, which --max-context cannot set up). Each fails on its own; the stream ends
    with the text it has alone, and the server goes on."""
    from camelid.serve.app import create_app
    from camelid.serve.server import ServerThread

    eng = load_llamacpp_engine(str(tiny_gguf), threads=2, max_context=SEQ_CONTEXT, parallel=PARALLEL)
    eng.max_context = 4 * SEQ_CONTEXT
    registry = _serve(eng, tiny_model_dir)
    chat = {"model": "m", "messages": [{"role": "user", "content": "Tell me about the garden"}], "temperature": 0,
            "max_tokens": 120, "ignore_eos": True}
    long_ids = eng.encode("word " * 2000)[: SEQ_CONTEXT - 6]  # overflows its sequence on its sixth new token
    try:
        with ServerThread(create_app(registry)) as base, httpx.Client(base_url=base, timeout=120) as http:
            whole = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
            with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as good:
                lines = good.iter_lines()
                assert next(lines).startswith("data: ")  # it is running
                refused = http.post("/v1/completions", json={"model": "m", "prompt": "hi", "temperature": -1})
                broken = http.post("/v1/completions", json={"model": "m", "prompt": long_ids, "max_tokens": 12, "temperature": 0})
                events = [line[len("data: "):] for line in [*lines] if line.startswith("data: ")]
            after = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
            stats = http.get("/health").json()["models"]["m"]
    finally:
        registry.close()
        eng.close()
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"
    assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole == after
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert stats["peak_running_sequences"] >= 2 and stats["alive"], "the two ran in one batch; the server lives on"
