"""A SentencePiece BPE vocabulary with byte fallback (LLaMA-1/2, Vicuna, Mistral) -> GGUF, as
llama.cpp's converter writes it (`conversion/base.py` `_set_vocab_sentencepiece`): model "llama",
pre-tokenizer "default", every piece with its score and type, special ids and add-bos/add-eos.

llama.cpp tokenises such a vocabulary the way SentencePiece does: it repeatedly joins the adjacent
pair whose joined piece has the highest score, and spells a character missing from the vocabulary
with its UTF-8 bytes (`<0xNN>` pieces). So the scores must order the joins as the model's own
tokenizer does. From `tokenizer.model` (llama.cpp's first choice) they are SentencePiece's own.
A folder with only `tokenizer.json` (what transformers saves for a model trained here) gives the
same pieces from its BPE vocabulary, each piece a merge produces scored by minus the rank of the
first merge that produces it: the order the Hugging Face tokenizer applies its merges in, and for
a vocabulary converted from SentencePiece the order of SentencePiece's scores. Pieces no merge
produces (single characters) score below every merge.

Types: the unknown piece UNKNOWN, `<0xNN>` pieces BYTE, SentencePiece's control pieces and special
added tokens CONTROL, other added tokens USER_DEFINED, ids past the tokenizer UNUSED `[PAD<i>]`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.export.vocab import LLAMA, GgufVocab, added_flags, load_hf_tokenizer, looks_special, special_ids

ADDED_SCORE = -1000.0
"""llama.cpp's score for added tokens and for the padding ids past the tokenizer."""
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPM_PRE = "default"
"""`tokenizer.ggml.pre` of SentencePiece vocabularies (llama.cpp writes this name for them)."""


@dataclass
class Pieces:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def _padded(vocab_size: int) -> Pieces:
    from gguf import TokenType

    return Pieces([f"[PAD{i}]" for i in range(vocab_size)], [ADDED_SCORE] * vocab_size, [TokenType.UNUSED] * vocab_size)


def _check_size(n: int, vocab_size: int, where: Path) -> None:
    if n > vocab_size:
        raise CamelidError(f"{where} has {n} tokens but the model's vocab_size is {vocab_size}; the tokenizer does not belong to this model")


def pieces_from_model(path: Path, vocab_size: int) -> Pieces:
    """Pieces, scores and types of a `tokenizer.model`, read by the sentencepiece library."""
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise CamelidError(f"cannot read {path} as a SentencePiece model: {str(e).splitlines()[0]}") from None
    _check_size(sp.get_piece_size(), vocab_size, path)
    out = _padded(vocab_size)
    for i in range(sp.get_piece_size()):
        out.tokens[i], out.scores[i] = sp.id_to_piece(i), sp.get_score(i)
        out.types[i] = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                        else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    return out


def pieces_from_json(path: Path, vocab_size: int) -> Pieces:
    """Pieces, scores (from the merge ranks, see the module docstring) and types of a byte-fallback
    BPE `tokenizer.json`."""
    from gguf import TokenType

    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    vocab: dict[str, int] = model["vocab"]
    _check_size(max(vocab.values()) + 1, vocab_size, path)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    out = _padded(vocab_size)
    for piece, i in vocab.items():
        out.tokens[i] = piece
        if piece == model.get("unk_token"):
            out.types[i], out.scores[i] = TokenType.UNKNOWN, 0.0
        elif BYTE_PIECE.fullmatch(piece):
            out.types[i], out.scores[i] = TokenType.BYTE, 0.0
        else:
            out.types[i], out.scores[i] = TokenType.NORMAL, -float(rank.get(piece, len(merges) + i))
    return out


def added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokens added over the SentencePiece pieces, from
    added_tokens.json, tokenizer_config.json's added_tokens_decoder and tokenizer.json (later
    files win: they are what transformers reads)."""
    out: dict[int, tuple[str, bool]] = {}
    path = model_dir / "added_tokens.json"
    if path.is_file():
        out.update({int(i): (text, False) for text, i in json.loads(path.read_text(encoding="utf-8")).items()})
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        out.update({int(i): (t["content"], bool(t.get("special"))) for i, t in decoder.items()})
    path = model_dir / "tokenizer.json"
    if path.is_file():
        listed = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
        out.update({int(t["id"]): (t["content"], bool(t.get("special"))) for t in listed})
    return out


def apply_added(p: Pieces, added: dict[int, tuple[str, bool]], where: Path) -> None:
    """Put the added tokens into `p`: special ones CONTROL (the unknown piece stays UNKNOWN),
    others USER_DEFINED with SentencePiece's "▁" turned back into spaces (llama.cpp matches
    them in raw text)."""
    from gguf import TokenType

    for i, (text, special) in sorted(added.items()):
        _check_size(i + 1, len(p.tokens), where)
        if special or looks_special(text):
            if p.types[i] != TokenType.UNKNOWN:
                p.types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            p.types[i] = TokenType.USER_DEFINED
        p.tokens[i], p.scores[i] = text, ADDED_SCORE


def _tokenizer_or_none(model_dir: Path) -> Any:
    """The Hugging Face tokenizer where it loads; llama.cpp's converter needs only the files."""
    try:
        return load_hf_tokenizer(model_dir)
    except CamelidError:
        return None


def _special_vocab(model_dir: Path, vocab_size: int) -> Any:
    """gguf.SpecialVocab (special ids, add-bos/eos flags, chat template from the config files),
    without its warning about LLaMA's pair template (`<s> A <s> B`), which nothing here uses."""
    import logging

    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
    finally:
        log.setLevel(level)


def build_spm_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """The GgufVocab of the SentencePiece tokenizer in `model_dir` (see the module docstring)."""
    model_file = model_dir / "tokenizer.model"
    if model_file.is_file():
        p = pieces_from_model(model_file, vocab_size)
    else:
        p = pieces_from_json(model_dir / "tokenizer.json", vocab_size)
    apply_added(p, added_tokens(model_dir), model_dir)
    tokenizer = _tokenizer_or_none(model_dir)
    special = _special_vocab(model_dir, vocab_size)
    ids = special_ids(special, tokenizer)
    if tokenizer is not None:
        add_bos, add_eos = added_flags(tokenizer)
    else:  # LLaMA's defaults where tokenizer_config.json is silent
        add_bos, add_eos = special.add_special_token.get("bos", True), special.add_special_token.get("eos", False)
    template = tokenizer.chat_template if tokenizer is not None and isinstance(tokenizer.chat_template, str) else special.chat_template
    eos = p.tokens[ids["eos"]] if "eos" in ids else None
    return GgufVocab(
        pre=SPM_PRE, tokens=p.tokens, token_types=p.types, merges=[], special_ids=ids, add_bos=add_bos,
        add_eos=add_eos, chat_template=template, eos_token=eos, model=LLAMA, scores=p.scores,
    )
