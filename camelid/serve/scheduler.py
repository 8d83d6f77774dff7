"""The scheduler: one thread owns the engine and serves every request through continuous batching.

HTTP handlers (asyncio) submit a `Job` (one request: a prompt and one SamplingParams per choice)
and read its deltas from an asyncio queue. The scheduler thread loops: admit queued jobs into the
running `engine.Batch` (a prefill, up to `max_batch_size` sequences in flight), run one decode
step for every sequence, hand each job its deltas. Sequences join and leave between steps, so a
request never waits for an unrelated longer one to finish (Orca's iteration-level scheduling,
Yu et al. OSDI 2022; vLLM's scheduler does the same). With max_batch_size=1 it serves one
sequence at a time, which is how FastChat's model worker runs without vLLM (the bench baseline).

A job whose client went away is cancelled: dropped from the queue, or its rows leave the batch
at the next step, so a disconnect frees its slot.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
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
    _open: int = 0  # choices still generating
    _rids: list[int] = field(default_factory=list)

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

    def __init__(self, engine, max_batch_size: int = 32, max_queue: int = 256):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.engine = engine
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
        self._thread = threading.Thread(target=self._loop, name="camelid-scheduler", daemon=True)
        self._thread.start()

    # ---- called from HTTP handlers -------------------------------------------------------
    def submit(self, job: Job) -> None:
        if job.n > self.max_batch_size:
            raise ValueError(f"n={job.n} is more than this server's batch size ({self.max_batch_size})")
        with self._cv:
            if self._closed or not self._thread.is_alive():
                raise QueueFull("the server is shutting down")
            if self._pending_rows + job.n > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} sequences waiting)")
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
                if cancelled:
                    batch.cancel(cancelled)
                try:
                    if admitted:
                        self._prefill(batch, admitted)
                    if batch.rows:
                        self._dispatch(batch.step())
                except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                    log.exception("generation failed; failing the %d running request(s)", len(self._running_jobs))
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

    def _prefill(self, batch, jobs: list[Job]) -> None:
        rids = [rid for job in jobs for rid in job._rids]
        prompts = [ids for job in jobs for ids in job.prompts]
        params = [p for job in jobs for p in job.params]
        try:
            for deltas in batch.add(rids, prompts, params):
                self._dispatch(deltas)
        except Exception as e:  # noqa: BLE001 - only the new jobs failed; the batch is intact
            log.exception("prefill failed for %d request(s)", len(jobs))
            with self._cv:
                self._fail(jobs, e)

    def _dispatch(self, deltas: list) -> None:
        """Route each delta to its job (index rewritten to the choice number); end finished jobs."""
        by_job: dict[Job, list] = {}
        finished: list[Job] = []
        with self._cv:
            for d in deltas:
                rid = d.index
                entry = self._running.get(rid)
                if entry is None:
                    continue
                job, choice = entry
                self.generated_tokens += len(d.token_ids)
                if not job.cancelled:
                    d.index = choice
                    by_job.setdefault(job, []).append(d)
                if d.finish_reason is not None:
                    del self._running[rid]
                    job._open -= 1
                    if job._open == 0:
                        self._running_jobs.discard(job)
                        self.completed += 0 if job.cancelled else 1
                        finished.append(job)
        for job, ds in by_job.items():
            job._post(ds)
        for job in finished:
            job._post(None)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """Called with the lock held: end `jobs` with `error` and forget their rows."""
        for job in jobs:
            for rid in job._rids:
                self._running.pop(rid, None)
            self._running_jobs.discard(job)
            job._open = 0
            job._post(error)
