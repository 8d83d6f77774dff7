"""The llama.cpp backend: the engine's interface over a GGUF file, run by llama-cpp-python.

A `backend.Backend` like the torch engine, sharing its driver loop and per-token finish logic
(`engine.backend`), so chat, generate and serve's continuous-batching scheduler take it
unchanged. What differs is only who computes the logits: llama.cpp decodes one batch holding one
token per running request (each request its own sequence in one KV cache, as llama-server does;
new requests' prompts are prefilled together the same way). A sequence keeps its tokens' keys and
values after its request ends, and a new request takes the free sequence that already holds the
longest start of its prompt and prefills only the rest (llama-server's prompt cache): the next
turn of a chat, or another request with the same system prompt, skips what was computed. The
logits go through camelid's
own sampler (`engine.sampling.sample_next`) and stop-string / detokenisation helpers
(`engine.text`), so the sampling flags, seeds, stop strings and streaming behave exactly as with
the torch engine. The model is a `.gguf` given directly, or any model
camelid can load exported on the fly into the cache ($CAMELID_HOME/gguf, see export.core).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from camelid.engine.backend import BackendBase, BatchBase, Delta, Row, Sampled, emit, new_row, prompt_ids, sample
from camelid.engine.llamacpp_tokenizer import LlamaCppTokenizer
from camelid.engine.sampling import SamplingParams
from camelid.errors import CamelidError
from camelid.export.writer import DEFAULT_QUANT
from camelid.utils import shared_start

INSTALL_HINT = "pip install 'camelid[llamacpp]' (compiles llama.cpp, ~10 minutes; pip caches the wheel)"
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PARALLEL = 4  # sequences decoded together (the server's concurrent requests)
KV_MEMORY_SHARE = 0.25
"""Share of the machine's memory the KV cache (allocated whole when the engine starts) may take
when no context length is asked for; the sequences' context is shortened to fit it."""
MIN_SEQUENCE_CONTEXT = 512
"""Context per sequence that the memory share never shortens below."""
CONTEXT_STEP = 256
COPY_CELLS_PER_TOKEN = 512
"""Copying a sequence's slice of the KV cache costs about as much as prefilling one token per
this many cells of the slice (bundled model, q4_0, 2 threads: 4,096 cells 21 ms, a token 2.8 ms):
a cached start is copied into another sequence when it is at least slice / this many tokens."""
MOVE_CELLS_PER_TOKEN = 128
"""A running row moves to close a gap in the sequence ids (`LlamaCppBatch.compact`) only with at
least slice / this many tokens left to generate: its swap copies three slices (a prefill token per
COPY_CELLS_PER_TOKEN cells each), and the gap costs about one more pass over the weights (a
batch-1 decode step, ~4.5 ms) per step, so this is ~2x the break-even."""


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError:
        raise CamelidError(f"the llama.cpp backend needs llama-cpp-python: {INSTALL_HINT}") from None
    _logger.set_verbose(False)  # llama.cpp's load log is noise in a chat window
    return llama_cpp


def kv_bytes_per_token(lc: Any, model: Any) -> int:
    """Bytes one token takes in llama.cpp's KV cache (f16 keys and values in every layer)."""
    n_head = max(1, lc.llama_model_n_head(model))
    head_dim = lc.llama_model_n_embd(model) // n_head
    return 2 * 2 * lc.llama_model_n_layer(model) * head_dim * lc.llama_model_n_head_kv(model)


def physical_memory() -> int:
    """The machine's memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def sequence_context(asked: int | None, n_ctx_train: int, parallel: int, bytes_per_token: int, memory: int) -> int:
    """Tokens of KV cache each of the `parallel` sequences gets (llama.cpp allocates them all at
    start). A context asked for is given (up to the model's training context). Otherwise the
    training context, at most DEFAULT_MAX_CONTEXT, shortened in CONTEXT_STEP steps until the
    whole cache fits KV_MEMORY_SHARE of `memory`, never below MIN_SEQUENCE_CONTEXT: a 7B LLaMA
    (0.5 MiB a token) served 32 requests at once gets 2048 tokens each on 128 GiB (32 GiB of
    cache), where 4096 each would have taken 64 GiB."""
    if asked:
        return int(min(asked, n_ctx_train))
    full = min(DEFAULT_MAX_CONTEXT, n_ctx_train)
    if not memory or not bytes_per_token:
        return full
    fits = int(KV_MEMORY_SHARE * memory) // (bytes_per_token * parallel) // CONTEXT_STEP * CONTEXT_STEP
    return max(min(full, fits), min(full, MIN_SEQUENCE_CONTEXT))


@dataclass
class SeqRow(Row):
    """A row and the llama.cpp sequence that holds its KV cache."""

    slot: int = -1
    pos: int = 0
    """The position of the next token fed to its sequence."""
    synced: bool = False
    """Its sequence holds exactly its first `pos` tokens (its last decode succeeded)."""

    def held(self) -> list[int]:
        """The tokens its sequence holds from position 0, when `synced`."""
        return (self.prompt + self.out)[: self.pos]


class LlamaCppEngine(BackendBase):
    """Generation over a GGUF with llama.cpp. Build it with `load_llamacpp_engine`."""

    def __init__(self, gguf: Path, threads: int | None = None, max_context: int | None = None, parallel: int = DEFAULT_PARALLEL):
        lc = import_llama_cpp()
        from llama_cpp import _internals

        self.llama_cpp, self.gguf = lc, Path(gguf)
        mparams = lc.llama_model_default_params()
        try:
            self.model = _internals.LlamaModel(path_model=str(gguf), params=mparams, verbose=False)
        except ValueError as e:
            raise CamelidError(f"llama.cpp cannot load {gguf} ({e}); is it a complete GGUF of an architecture llama.cpp supports?") from None
        streams = parallel + 1 if parallel > 1 else 1  # a scratch sequence for `move`, where rows can move
        self.max_context = sequence_context(max_context, self.model.n_ctx_train(), streams,
                                            kv_bytes_per_token(lc, self.model.model), physical_memory())
        self.parallel = self.max_rows = parallel
        self.scratch = parallel
        """A sequence no request gets (with more than one): where `move` parks a cache while it
        swaps two."""
        self.threads = threads or os.cpu_count() or 1
        cparams = lc.llama_context_default_params()
        # `parallel` sequences, each with its own max_context-token slice of the KV cache.
        cparams.n_ctx = self.max_context * streams
        cparams.n_batch = cparams.n_ubatch = min(512, self.max_context)
        cparams.n_seq_max = streams
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = self.threads
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.batch_buf = _internals.LlamaBatch(n_tokens=cparams.n_batch, embd=0, n_seq_max=parallel, verbose=False)
        self.tokenizer = LlamaCppTokenizer(self.model, lc)
        self.n_vocab = self.model.n_vocab()
        self.eos_ids = {t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self.model.vocab, t)}
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.name, self.path = self.gguf.stem, self.gguf
        self.device = "cpu"
        self._free_slots = list(range(parallel))
        """Free sequences, the one released longest ago first."""
        self._cached: list[list[int]] = [[] for _ in range(parallel)]
        """Per sequence, the tokens its KV cache holds from position 0 (kept after its request
        ends, for the next request that starts the same way)."""

    def close(self) -> None:
        self.batch_buf.close()
        self.ctx.close()
        self.model.close()

    # ---- llama.cpp calls -------------------------------------------------------------------
    def decode(self, items: list[tuple[int, int, int, bool]]) -> list[Any]:
        """Run (token, position, sequence, want_logits) items; return a numpy logits row per
        wanted item, in the items' order. Chunked by the context's batch size (long prompts).

        The items go to llama.cpp sorted by sequence: with a KV cache per sequence, a batch whose
        sequence ids come out of order is split into several computations (a 16-sequence decode
        step of the bundled model ran at half the speed)."""
        import numpy as np

        order = sorted(range(len(items)), key=lambda i: (items[i][2], items[i][1]))
        rows: dict[int, Any] = {}
        b = self.batch_buf.batch
        for start in range(0, len(order), self.batch_buf._n_tokens):
            chunk = order[start : start + self.batch_buf._n_tokens]
            b.n_tokens = len(chunk)
            for i, k in enumerate(chunk):
                tok, pos, seq, want = items[k]
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            self.ctx.decode(self.batch_buf)
            for i, k in enumerate(chunk):
                if items[k][3]:
                    rows[k] = np.ctypeslib.as_array(self.ctx.get_logits_ith(i), shape=(self.n_vocab,)).copy()
        return [rows[k] for k in sorted(rows)]

    def take_slot(self, tokens: Sequence[int] = (), running: Mapping[int, Sequence[int]] | None = None) -> int:
        """A free sequence for a request starting with `tokens`, holding in its cache the longest
        start of them that a free sequence holds, or a running one (`running`: busy sequence ->
        the tokens its cache holds from position 0); `reuse` then keeps that start. Without
        `tokens`, an empty sequence.

        Where the request and the best free cache part ways (another conversation with the same
        system prompt), that sequence keeps its cache for its own next turn: the shared start is
        copied into an empty free sequence, else the one released longest ago, whose cache is the
        one given up. A request that a free cache holds whole (the same prompt again) takes it.
        A running sequence that holds a longer start lends it the same way, by a copy: a burst of
        new conversations prefills their common system prompt once. llama.cpp copies a whole
        sequence's slice of the KV cache between sequences (at its next decode), which costs
        about as much as prefilling one token per `COPY_CELLS_PER_TOKEN` cells of a slice (the
        bundled model, q4_0, 2 threads); shorter starts are recomputed."""
        if not self._free_slots:
            raise CamelidError(f"the llama.cpp backend runs at most {self.parallel} requests at once")
        shared = {s: shared_start(self._cached[s], tokens) for s in self._free_slots}
        best = max(self._free_slots, key=shared.__getitem__)  # ties: released longest ago
        lent = {s: shared_start(held, tokens) for s, held in (running or {}).items()}
        lender = max(lent, key=lent.__getitem__, default=None)
        slot = best
        others = [s for s in self._free_slots if s != best]
        if lender is not None and lent[lender] > shared[best] and lent[lender] * COPY_CELLS_PER_TOKEN >= self.max_context:
            slot = self._spare(self._free_slots)
            self._copy(lender, slot, running[lender])
        elif shared[best] < min(len(tokens), len(self._cached[best])) and others:
            slot = self._spare(others)
            if shared[best] * COPY_CELLS_PER_TOKEN >= self.max_context:
                self._copy(best, slot, self._cached[best])
        self._free_slots.remove(slot)
        if not tokens:
            self._clear(slot)
        return slot

    def _spare(self, among: Sequence[int]) -> int:
        """Of the free sequences `among` (in release order), the one to overwrite: an empty one,
        else the one released longest ago."""
        return min(among, key=lambda s: len(self._cached[s]) > 0)

    def _copy(self, src: int, dst: int, held: Sequence[int]) -> None:
        """Copy sequence `src`, which holds `held`, into `dst` (the whole slice; `reuse` trims it)."""
        self.ctx.kv_cache_seq_cp(src, dst, -1, -1)
        self._cached[dst] = list(held)

    def move(self, src: int, dst: int) -> None:
        """Swap a running request's sequence `src` with the free sequence `dst`: the request's cache
        goes to `dst` and the cache `dst` held to `src`, which is freed holding it (llama.cpp copies
        slices at its next decode, in order: `dst` to the scratch sequence, `src` to `dst`, the
        scratch to `src`).

        llama.cpp computes a batch in one pass only over consecutive sequence ids (each gap costs
        another pass over the weights: 8 rows on every other sequence decoded at 0.4x the speed
        of 8 consecutive ones, bundled model, q4_0, 2 threads), so batches move their rows into
        the gaps that finished requests leave (`LlamaCppBatch.compact`); swapping keeps the cache
        each gap held (the next turn of the conversation that ended there)."""
        held = self._cached[dst]
        if held:
            self.ctx.kv_cache_seq_cp(dst, self.scratch, -1, -1)
        self.ctx.kv_cache_seq_cp(src, dst, -1, -1)
        if held:
            self.ctx.kv_cache_seq_cp(self.scratch, src, -1, -1)
            self.ctx.kv_cache_seq_rm(self.scratch, -1, -1)
        else:
            self.ctx.kv_cache_seq_rm(src, -1, -1)
        self._free_slots.remove(dst)
        self._free_slots.append(src)
        self._cached[dst], self._cached[src] = [], list(held)

    def release_slot(self, slot: int, tokens: Sequence[int] | None = None) -> None:
        """Give a sequence back; its cache stays for reuse when `tokens` (what it holds from
        position 0) is given, else it is cleared."""
        if tokens is None:
            self._clear(slot)
        else:
            self._cached[slot] = list(tokens)
        self._free_slots.append(slot)

    def reuse(self, slot: int, tokens: Sequence[int]) -> int:
        """Keep the start of `slot`'s cache that `tokens` begins with, drop the rest; how many
        tokens were kept. The last token is always recomputed (its logits are wanted)."""
        keep = min(shared_start(self._cached[slot], tokens), len(tokens) - 1)
        self._cached[slot] = []  # until the caller's decode has filled it (release_slot says)
        if keep <= 0 or not self.ctx.kv_cache_seq_rm(slot, keep, -1):
            self._clear(slot)
            return 0
        return keep

    def _clear(self, slot: int) -> None:
        self.ctx.kv_cache_seq_rm(slot, -1, -1)
        self._cached[slot] = []

    def clear_cache(self) -> None:
        """Forget what the free sequences hold (the next requests prefill in full)."""
        for slot in self._free_slots:
            self._clear(slot)

    # ---- generation (backend.BackendBase drives it) ----------------------------------------
    def new_batch(self) -> "LlamaCppBatch":
        """A fresh batch; one is live at a time, so a batch the caller dropped (the server does
        after a failed step) gives its sequences back here."""
        if getattr(self, "_live", None) is not None:
            self._live.close()
        self._live = LlamaCppBatch(self)
        return self._live


class LlamaCppBatch(BatchBase):
    """Running requests, one llama.cpp sequence each (`backend.RowBatch`): `add` prefills the new
    prompts and decodes the running rows' next tokens, `step` decodes one token for every row,
    each in one llama_decode call over a batch whose tokens carry their own sequence ids."""

    add_steps_running = True  # in the same llama_decode as the new prompts, as llama-server batches

    def add(self, ids: list[int], prompts, params: list[SamplingParams]) -> Iterator[list[Delta]]:
        eng = self.engine
        toks = prompt_ids(eng, prompts, params)
        if len(self.rows) + len(toks) > eng.parallel:
            raise CamelidError(f"the llama.cpp backend runs at most {eng.parallel} requests at once")
        self.compact()
        # what each running row's sequence holds: a start a new prompt may copy
        held = {r.slot: r.held() for r in self.rows if r.synced and r.finish is None and r.error is None}
        new_rows = [new_row(eng, rid, t, sp, self.on_row, SeqRow, slot=eng.take_slot(t, held), pos=len(t))
                    for rid, t, sp in zip(ids, toks, params)]
        for row in new_rows:
            if row.params.return_hidden and row.error is None:
                row.error = CamelidError("return_hidden needs the torch engine (--backend torch)")
        running = [r for r in self.rows if r.finish is None]
        self.rows += new_rows
        logits = self._decode(running, [r for r in new_rows if r.error is None])
        yield self._emit(list(self.rows), logits)

    def _decode(self, running: list[SeqRow], rows: list[SeqRow], reuse: bool = True) -> list[Any]:
        """One llama_decode: each running row's next token, and each of `rows`' history (prompt +
        answer so far) from the first token its cache does not already hold (from the start when
        not `reuse`); one logits row per row, running rows first, each from its last token."""
        items = [(r.out[-1], r.pos, r.slot, True) for r in running]
        for row in rows:
            toks = row.prompt + row.out
            keep = self.engine.reuse(row.slot, toks if reuse else ())
            items += [(tok, i, row.slot, i == len(toks) - 1) for i, tok in enumerate(toks) if i >= keep]
            row.pos = len(toks)
        for r in running + rows:
            r.synced = False
        logits = self.engine.decode(items)
        for r in running:
            r.pos += 1
        for r in running + rows:
            r.synced = True
        return logits

    def step(self) -> list[Delta]:
        self.compact()
        return self._emit(list(self.rows), self._decode([r for r in self.rows if r.finish is None], []))

    def compact(self) -> None:
        """Give the running rows consecutive sequence ids (`LlamaCppEngine.move`): the window of
        consecutive ids that already holds the most of them keeps them, and the others that have
        enough tokens left to generate (`MOVE_CELLS_PER_TOKEN`) swap into its free sequences."""
        eng = self.engine
        rows = [r for r in self.rows if r.finish is None and r.error is None]
        held = {r.slot for r in rows}
        if not rows or max(held) - min(held) == len(held) - 1:
            return
        k = len(held)
        start = max(range(eng.parallel - k + 1), key=lambda a: (sum(a <= s < a + k for s in held), -a))
        free = set(eng._free_slots)
        targets = [s for s in range(start, start + k) if s in free]
        outside = [r for r in rows if not start <= r.slot < start + k and r.synced
                   and r.params.max_new_tokens - len(r.out) >= eng.max_context // MOVE_CELLS_PER_TOKEN]
        for row, slot in zip(outside, targets):
            eng.move(row.slot, slot)
            row.slot = slot

    def rebuild(self) -> list[Delta]:
        """As `engine.Batch.rebuild`: after a failed decode, each row's sequence is cleared and
        recomputed alone from its tokens (prompt + answer so far), one step's result per row; a
        row that fails alone ends with an error delta."""
        logits = []
        for row in self.rows:
            if row.finish is None and row.error is None:
                try:
                    logits += self._decode([], [row], reuse=False)
                except Exception as e:  # noqa: BLE001 - it fails alone: it is this row's
                    row.error = e
        return self._emit(list(self.rows), logits)

    def close(self) -> None:
        for row in self.rows:
            self._release(row)
        self.rows = []

    def _release(self, row: SeqRow) -> None:
        """A row's sequence back to the engine, its cache kept when it is known to be whole."""
        whole = row.synced and row.error is None
        self.engine.release_slot(row.slot, row.held() if whole else None)

    def _emit(self, rows: list[SeqRow], logits: list[Any]) -> list[Delta]:
        """Sample for `rows`: the running ones without an error of their own each have a logits
        row, in order; then the rows that finished leave and give their sequences back."""
        live = [r for r in rows if r.finish is None and r.error is None]
        by_row = dict(zip(map(id, live), _sample(self.engine, live, logits))) if live else {}
        none = (0, 0.0, None, None)  # the row ends this step: cancelled or failed
        tokens, logps, alts, errors = zip(*(by_row.get(id(r), none) for r in rows)) if rows else ((),) * 4
        deltas = emit(rows, Sampled(list(tokens), list(logps), list(alts), list(errors)), self.engine.eos_ids)
        for row in [r for r in self.rows if r.finish is not None]:
            self._release(row)
        self.rows = [r for r in self.rows if r.finish is None]
        return deltas


def _sample(engine: LlamaCppEngine, rows: list[SeqRow], logits: list[Any]) -> list[tuple[int, float, Any, Exception | None]]:
    """(token, log-probability, alternatives, error) per row from camelid's sampler: the same
    penalties, logit_bias and grammar masks as the torch engine, and each row's own failure
    (`sampling.sample_rows`). Plain greedy rows take a numpy argmax, which is what the sampler
    would return."""
    import numpy as np

    arr = np.stack(logits)
    if all(r.params.greedy and r.params.plain and not r.params.logprobs and not r.params.top_logprobs for r in rows):
        return [(int(t), 0.0, None, None) for t in arr.argmax(-1)]
    import torch

    seen = None
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        seen = torch.zeros(arr.shape, dtype=torch.bool)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.prompt + r.out, dtype=torch.long)] = True
    _, s = sample(engine, rows, torch.from_numpy(arr), seen)
    return list(zip(s.tokens, s.logprobs, s.alternatives, s.errors))


def load_llamacpp_engine(model: str | os.PathLike | None = None, threads: int | None = None, quant: str = DEFAULT_QUANT,
                         max_context: int | None = None, parallel: int = DEFAULT_PARALLEL) -> LlamaCppEngine:
    """The llama.cpp engine for `model`: a .gguf file, or any model camelid loads (bundled name,
    HF folder, adapter folder), exported to GGUF (`quant`) into the cache on first use."""
    from camelid.export.core import cached_gguf
    from camelid.export.header import read_header
    from camelid.models.resolve import DEFAULT_MODEL, resolve_model

    import_llama_cpp()  # fail fast, before any export, when the package is missing
    name = str(model or DEFAULT_MODEL)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise CamelidError(f"cannot use {path} with llama.cpp: it does not exist (or is not a file)")
        try:
            read_header(path, tensors=False)
        except (OSError, ValueError) as e:
            raise CamelidError(f"cannot use {path} with llama.cpp: {e}") from None
        source = path
    else:
        source = resolve_model(name)
        path = cached_gguf(name, quant)
    engine = LlamaCppEngine(path, threads=threads, max_context=max_context, parallel=parallel)
    engine.name, engine.path = name, source
    return engine
