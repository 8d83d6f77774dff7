"""Constrained decoding: a grammar a row's answer must follow, applied as a per-row token mask.

A row whose SamplingParams carry a `grammar` gets a matcher; before each sampling step the
matcher says which tokens may come next (a bitmask over the vocabulary), the sampler sets every
other logit to -inf, and the sampled token advances the matcher. Rows without a grammar are
untouched. Both backends use it: the llama.cpp backend samples with camelid's sampler too.

Library: llguidance (also used by llama.cpp, vLLM and SGLang). Measured on CPU with the bundled
SmolLM2 tokenizer (49,152 byte-level BPE tokens), a six-field JSON schema and a 74-token answer,
mask + advance per token (median): llguidance 0.11 ms, outlines-core 0.26 ms (mean 0.97 ms),
xgrammar 0.31 ms; compiling the schema: 3 ms, 294 ms, 13 ms. outlines-core builds an index over
the whole vocabulary for every new schema, which a server with per-request schemas pays each
time; xgrammar needs torch's triton. llguidance reads byte-level BPE and SentencePiece
(byte-fallback) tokenizers alike and builds its tokenizer from a GGUF's own vocabulary.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from camelid.errors import CamelidError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON as `json.dumps` writes it: no free whitespace, which a small model may otherwise emit
until max_tokens runs out."""
PARALLEL_MASK_ROWS = 2
"""From this many grammar rows in one step, their masks are computed on llguidance's threads."""

_lock = threading.Lock()
_executor = None


def _limits() -> Any:
    import llguidance

    # Default resource limits; errors do not echo the grammar or parser state back to a client.
    return llguidance.LLParserLimits(verbose_errors=False)


def grammar_tokenizer(engine: Any) -> Any:
    """The llguidance view of the engine's vocabulary, built once per engine (about a second)
    and cached on it. The EOS set is the engine's, so the grammar ends a row on any of them."""
    cached = getattr(engine, "_grammar_tokenizer", None)
    if cached is not None:
        return cached
    with _lock:
        if getattr(engine, "_grammar_tokenizer", None) is None:
            engine._grammar_tokenizer = _build_tokenizer(engine)
    return engine._grammar_tokenizer


def _build_tokenizer(engine: Any) -> Any:
    eos = sorted(engine.eos_ids)
    if hasattr(engine, "llama_cpp"):
        from llguidance.llamacpp import lltokenizer_from_vocab

        return lltokenizer_from_vocab(engine.model.vocab, eos_token=eos)
    import transformers
    from llguidance.hf import from_tokenizer

    tok = engine.tokenizer
    if not isinstance(tok, transformers.PreTrainedTokenizerFast) and not getattr(tok, "is_fast", False):
        raise CamelidError("structured output needs a fast (tokenizer.json) tokenizer; re-save the model's tokenizer "
                           "with AutoTokenizer.from_pretrained(...).save_pretrained(...)")
    return from_tokenizer(tok, n_vocab=len(tok), eos_token=eos)


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON documents valid against `schema` (JSON_OPTIONS spacing)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise CamelidError(f"the JSON schema cannot be used: {e}") from None


def lark_grammar(lark: str) -> str:
    """An llguidance grammar from Lark text (llguidance's syntax, which may embed %json{...})."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def check_grammar(engine: Any, grammar: str) -> None:
    """CamelidError naming the problem when the grammar cannot run with this engine's vocabulary
    (an unsupported schema keyword, a grammar past the resource limits)."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, grammar_tokenizer(engine), limits=_limits())
    if is_error:
        raise CamelidError(f"the grammar cannot be used: {messages[0] if messages else 'invalid'}")


def new_matcher(engine: Any, grammar: str) -> Any:
    """A fresh matcher for one row."""
    import llguidance

    matcher = llguidance.LLMatcher(grammar_tokenizer(engine), grammar, log_level=0, limits=_limits())
    if matcher.is_error():
        raise CamelidError(f"the grammar cannot be used: {matcher.get_error()}")
    return matcher


def advance(matcher: Any, token: int) -> None:
    """Feed a sampled token to a row's matcher (it was allowed, so this fails only on a bug)."""
    if not matcher.consume_token(token):
        raise CamelidError(f"the grammar rejected token {token}: {matcher.get_error()}")


def allowed_tokens(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """(B, 32 * ceil(vocab_size / 32)) bool: the tokens each row's matcher allows next; rows
    without a matcher (None) allow every token."""
    import llguidance.torch as lt

    global _executor
    bitmask = lt.allocate_token_bitmask(len(matchers), vocab_size)
    rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
    if len(rows) >= PARALLEL_MASK_ROWS:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        lt.fill_next_token_bitmask_par(_executor, rows, bitmask)
    else:
        for m, i in rows:
            lt.fill_next_token_bitmask(m, bitmask, i)
    return unpack_bits(bitmask)


def unpack_bits(bitmask: torch.Tensor) -> torch.Tensor:
    """(B, W) int32 words, bit k of word w = token 32w + k (llguidance's layout) -> (B, 32W) bool."""
    b8 = bitmask.contiguous().view(torch.uint8)  # little-endian: byte j of word w holds tokens 32w + 8j ...
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b8[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1).bool()


def row_constraints(engine: Any, rows: list[Any]) -> tuple[list[list[int]] | None, torch.Tensor | None]:
    """What the sampler needs beyond the logits for `rows` (objects with params, out, matcher,
    error): each row's answer so far where a row has presence/frequency penalties, and the
    grammar mask where a row has a grammar. A row whose matcher went into error gets that error
    (it ends alone) and is sampled without a mask."""
    outputs = [r.out for r in rows] if any(r.params.penalised for r in rows) else None
    matchers = []
    for r in rows:
        m = getattr(r, "matcher", None)
        if m is not None and r.error is None and m.is_error():
            r.error = CamelidError(f"the grammar failed: {m.get_error()}")
        matchers.append(m if m is not None and r.error is None and r.finish is None else None)
    allowed = None
    if any(m is not None for m in matchers):
        allowed = allowed_tokens(matchers, grammar_tokenizer(engine).vocab_size)
    return outputs, allowed
