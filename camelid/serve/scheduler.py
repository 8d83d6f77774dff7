"""The scheduler: one thread owns the engine and serves every request through continuous batching.

HTTP handlers (asyncio) submit a `Job` (one request: a prompt and one SamplingParams per choice)
and read its deltas from an asyncio queue. The scheduler thread loops: admit queued jobs into the
running `engine.Batch` (a prefill, up to `max_batch_size` sequences in flight), run one decode
step for every sequence, hand each job its deltas. Sequences join and leave between steps, so a
request never waits for an unrelated longer one to finish (Orca's iteration-level scheduling,
Yu et al. OSDI 2022; vLLM's scheduler does the same). With max_batch_size=1 it serves one
sequence at a time, which is how FastChat's model worker runs without vLLM (the bench baseline).

A stream gets a running job's tokens as they are made, but no more often than every
`stream_interval` seconds: the tokens of steps in between are held and go out together in one
delta per choice (the first token and a job's end go out at once). A small model on a CPU makes a
token every few milliseconds, and each delivery costs the server's event loop (a wake-up, a JSON
chunk, an HTTP write) and the client about as much again, on the cores the decode runs on; a
display gains nothing from updates faster than it redraws. A slower model's tokens, further apart
than the interval, each go out alone. FastChat's worker streams every 2 tokens, vLLM's server has
`--stream-interval`; 0 sends every step's tokens as soon as they are made.

A job whose client went away is cancelled: dropped from the queue, or its rows leave the batch
at the next step, so a disconnect frees its slot.

One request cannot fail the others. A row that fails on its own (its parameters, its sampling,
its text) comes back from the engine as an error delta: its job fails, its other choices leave
the batch, every other job goes on. When a shared forward raises (the failure belongs to no
row), the batch is recomputed row by row (`Batch.rebuild`) and only rows that fail alone fail;
jobs whose shared prefill failed before they joined are retried one by one. Only when even
that is impossible does every running job fail, and the scheduler starts a new batch.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger("camelid.serve")


class QueueFull(Exception):
    """The bounded queue has no room; the app answers 503 with Retry-After."""


@dataclass(eq=False)
class Job:
    """One request: `len(params)` sequences (its choices), prompt `prompts[i]` for choice i.

    The scheduler thread posts to `events` (through the job's event loop): a list of
    engine Deltas whose `index` is the choice number, then None when every choice has
    finished, or an Exception if generation failed.
    """

    prompts: list[list[int]]
    params: list[Any]  # camelid.engine.SamplingParams, one per choice
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    """When the request was made (time to first token counts from here)."""
    first_token_at: float | None = None
    last_token_at: float | None = None
    _open: int = 0  # choices still generating
    _rids: list[int] = field(default_factory=list)
    _held: list = field(default_factory=list)  # deltas made since the last post (stream_interval)
    _posted_at: float | None = None

    @property
    def n(self) -> int:
        return len(self.params)

    def _post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


class Scheduler:
    """Owns `engine`; `submit` and `cancel` are safe to call from any thread."""

    def __init__(self, engine, max_batch_size: int = 32, max_queue: int = 256, stream_interval: float = 0.0):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if stream_interval < 0:
            raise ValueError("stream_interval must be >= 0")
        self.engine = engine
        self.stream_interval = stream_interval
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._pending_rows = 0
        self._running: dict[int, tuple[Job, int]] = {}  # row id -> (job, choice index)
        self._running_jobs: set[Job] = set()
        self._ids = itertools.count()
        self._closed = False
        self.completed = 0
        self.generated_tokens = 0
        self.peak_running = 0  # most sequences ever generated together (shows batching happened)
        self.observers: list = []
        """Objects with `tokens(job, now)`, called on this thread for each step that gave a job
        tokens (the app's metrics)."""
        self._thread = threading.Thread(target=self._loop, name="camelid-scheduler", daemon=True)
        self._thread.start()

    # ---- called from HTTP handlers -------------------------------------------------------
    def check_room(self, rows: int) -> None:
        """QueueFull unless `rows` more sequences fit the queue now (a request checks before it
        tokenises; `submit` checks again)."""
        with self._cv:
            self._check_room(rows)

    def _check_room(self, rows: int) -> None:
        if self._closed or not self._thread.is_alive():
            raise QueueFull("the server is shutting down")
        if self._pending_rows + rows > self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} sequences waiting)")

    def submit(self, job: Job) -> None:
        if job.n > self.max_batch_size:
            raise ValueError(f"n={job.n} is more than this server's batch size ({self.max_batch_size})")
        with self._cv:
            self._check_room(job.n)
            job._open = job.n
            self._pending.append(job)
            self._pending_rows += job.n
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away). Idempotent; a finished job is left alone."""
        with self._cv:
            if job._open == 0 or job.cancelled:
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._pending_rows -= job.n
                job._open = 0
                job._post(None)
            self._cv.notify()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {
                "alive": self._thread.is_alive(),
                "queued_requests": len(self._pending),
                "queued_sequences": self._pending_rows,
                "running_requests": len(self._running_jobs),
                "running_sequences": len(self._running),
                "active_requests": len(self._pending) + len(self._running_jobs),
                "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue,
                "completed_requests": self.completed,
                "generated_tokens": self.generated_tokens,
                "peak_running_sequences": self.peak_running,
            }

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            for job in list(self._pending):
                job._post(RuntimeError("server shutting down"))
            self._pending.clear()
            self._pending_rows = 0
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the scheduler thread ------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        batch = self.engine.new_batch()
        with torch.inference_mode():
            while True:
                admitted, cancelled = self._admit(idle=not batch.rows)
                if admitted is None:
                    break
                try:
                    if cancelled:
                        batch.cancel(cancelled)
                    if admitted:
                        batch = self._prefill(batch, admitted)
                        if batch.add_steps_running:
                            continue  # the running rows advanced with the prefill: admit again first
                    if batch.rows:
                        batch = self._step(batch)
                except Exception as e:  # noqa: BLE001 - last resort: the scheduler thread must live on
                    log.exception("scheduler error; failing the %d running request(s)", len(self._running_jobs))
                    with self._cv:
                        self._fail(list(self._running_jobs), e)
                    batch = self.engine.new_batch()
        with self._cv:
            self._fail(list(self._running_jobs), RuntimeError("server shutting down"))

    def _admit(self, idle: bool) -> tuple[list[Job] | None, list[int]]:
        """Take queued jobs that fit the batch; collect row ids of cancelled running jobs.

        Blocks while there is nothing to do. Returns (None, []) once closed.
        """
        with self._cv:
            while idle and not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None, []
            room = self.max_batch_size - len(self._running)
            admitted = []
            while self._pending and self._pending[0].n <= room:
                job = self._pending.popleft()
                self._pending_rows -= job.n
                room -= job.n
                job._rids = [next(self._ids) for _ in range(job.n)]
                for choice, rid in enumerate(job._rids):
                    self._running[rid] = (job, choice)
                self._running_jobs.add(job)
                admitted.append(job)
            self.peak_running = max(self.peak_running, len(self._running))
            cancelled = [rid for rid, (job, _) in self._running.items() if job.cancelled]
            return admitted, cancelled

    def _prefill(self, batch, jobs: list[Job]):
        """Add `jobs` to the batch with one shared prefill; returns the batch to go on with.

        If the prefill raises before the new rows joined, the batch is as it was (the engine
        merges all or nothing): several jobs are retried one by one, so only a job that fails
        alone fails. If they had joined, the batch is rebuilt row by row (`_recover`)."""
        rids = [rid for job in jobs for rid in job._rids]
        self._release_held()  # a prefill takes a while: held tokens go out before it
        try:
            for deltas in batch.add(rids, [ids for job in jobs for ids in job.prompts], [p for job in jobs for p in job.params]):
                self._dispatch(deltas)
            return batch
        except Exception as e:  # noqa: BLE001 - a failed prefill must not kill the server
            new = set(rids)
            if any(row.rid in new for row in batch.rows):
                log.exception("prefill failed after its rows joined; recomputing the batch row by row")
                return self._recover(batch, e)
            if len(jobs) == 1:
                log.warning("prefill failed for one request: %s", e)
                with self._cv:
                    self._fail(jobs, e)
                return batch
            log.warning("prefill of %d requests failed (%s); admitting them one by one", len(jobs), e)
            for job in jobs:
                batch = self._prefill(batch, [job])
            return batch

    def _step(self, batch):
        """One decode step; a shared forward that raises is recovered from by `_recover`."""
        try:
            self._dispatch(batch.step())
            return batch
        except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
            log.exception("decode step failed; recomputing the %d running rows one by one", len(batch.rows))
            return self._recover(batch, e)

    def _recover(self, batch, error: Exception):
        """Recompute every row of a batch whose shared state is suspect, each alone
        (`batch.rebuild()`): rows that fail alone fail their jobs, the rest go on. A job left
        with a row that is neither in the batch nor finished fails (never left waiting). If the
        rebuild itself raises, every running job fails and a new batch starts."""
        try:
            self._dispatch(batch.rebuild())
        except Exception:  # noqa: BLE001
            log.exception("recomputing the batch failed; failing the %d running request(s)", len(self._running_jobs))
            with self._cv:
                self._fail(list(self._running_jobs), error)
            return self.engine.new_batch()
        live = {row.rid for row in batch.rows}
        with self._cv:
            lost = {job for rid, (job, _) in self._running.items() if rid not in live}
            self._fail(list(lost), error)
        batch.cancel(rid for job in lost for rid in job._rids)  # their rows still running, if any
        return batch

    def _dispatch(self, deltas: list) -> None:
        """Route each delta to its job (index rewritten to the choice number); end finished jobs."""
        by_job: dict[Job, list] = {}
        finished: list[Job] = []
        failed: list[tuple[Job, Exception]] = []
        with self._cv:
            for d in deltas:
                rid = d.index
                entry = self._running.get(rid)
                if entry is None:
                    continue
                job, choice = entry
                self.generated_tokens += len(d.token_ids)
                if d.error is not None and not job.cancelled:
                    # This choice failed: the request fails; its other choices leave the batch.
                    job.cancelled = True
                    failed.append((job, d.error))
                elif not job.cancelled:
                    d.index = choice
                    by_job.setdefault(job, []).append(d)
                if d.finish_reason is not None:
                    del self._running[rid]
                    job._open -= 1
                    if job._open == 0:
                        self._running_jobs.discard(job)
                        self.completed += 0 if job.cancelled else 1
                        finished.append(job)
        now = time.monotonic()
        for job, ds in by_job.items():
            if any(d.token_ids for d in ds):
                for observer in self.observers:
                    try:
                        observer.tokens(job, now)
                    except Exception:  # noqa: BLE001 - metrics must never stop generation
                        log.exception("a scheduler observer failed")
            job._held += ds
            due = job._posted_at is None or now - job._posted_at >= self.stream_interval
            if due or any(d.finish_reason for d in ds):  # a finished job is released below
                self._release(job, now)
        for job, error in failed:
            log.warning("a request failed on its own and left the batch: %s", error)
            self._release(job, now)
            job._post(error)
        for job in finished:
            self._release(job, now)
            job._post(None)

    def _release(self, job: Job, now: float) -> None:
        """Post the job's held deltas, one per choice (`merge`)."""
        if job._held:
            job._post(merge(job._held))
            job._held = []
            job._posted_at = now

    def _release_held(self) -> None:
        now = time.monotonic()
        for job in list(self._running_jobs):
            self._release(job, now)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """Called with the lock held: end `jobs` with `error` and forget their rows."""
        for job in jobs:
            self._release(job, time.monotonic())
            for rid in job._rids:
                self._running.pop(rid, None)
            self._running_jobs.discard(job)
            job._open = 0
            job._post(error)


def merge(deltas: list) -> list:
    """Consecutive steps' deltas as one delta per choice, in order of first appearance: texts,
    token ids and log-probabilities joined, the last finish reason kept."""
    out: dict[int, Any] = {}
    for d in deltas:
        m = out.get(d.index)
        if m is None:
            out[d.index] = d
            continue
        out[d.index] = replace(m, text=m.text + d.text, token_ids=m.token_ids + d.token_ids,
                               logprobs=_join(m.logprobs, d.logprobs), top_logprobs=_join(m.top_logprobs, d.top_logprobs),
                               finish_reason=d.finish_reason or m.finish_reason, error=d.error or m.error)
    return list(out.values())


def _join(a: list | None, b: list | None) -> list | None:
    """Two steps' per-token lists as one; None when neither step had one (none asked for)."""
    return None if a is None and b is None else (a or []) + (b or [])
