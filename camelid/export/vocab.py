"""A Hugging Face tokenizer -> the GGUF `tokenizer.ggml.*` keys llama.cpp reads.

Two kinds are exported, as llama.cpp's own converter writes them (`conversion/base.py`):
- byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM2, Llama 3, Qwen; `get_vocab_base`,
  `_set_vocab_gpt2`): tokens in id order, added tokens marked CONTROL (special) or USER_DEFINED,
  ids missing from the vocabulary padded as UNUSED `[PAD<i>]`, merges and special ids through
  `gguf.SpecialVocab`;
- SentencePiece BPE with byte fallback (`"llama"`: LLaMA-1/2, Vicuna, Mistral), in
  camelid.export.spm, on this module's shared parts (GgufVocab, special ids, add-bos/eos flags).
`camelid.export.core.build_vocab` picks the kind (`tokenizer_kind`).
Other kinds (Unigram, WordPiece, WordLevel tokenizers) are refused by name.
Two things are decided from the tokenizer's behaviour rather than guessed from its files: the
add-bos/add-eos flags (encode a string with and without special tokens) and, for byte-level BPE,
the pre-tokenizer name (llama.cpp's hash of the ids of a fixed text), because a wrong value there
silently changes the ids llama.cpp produces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.export.header import read_header
from camelid.export.pretokenizers import CHECK_TEXT, PRE_BY_HASH


GPT2, LLAMA = "gpt2", "llama"
"""`tokenizer.ggml.model` of byte-level BPE and of SentencePiece (byte-fallback BPE) vocabularies."""


@dataclass
class GgufVocab:
    """Everything the writer puts under `tokenizer.*`."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    eos_token: str | None = None
    model: str = GPT2
    scores: list[float] | None = None
    """Per token (SentencePiece only): llama.cpp merges the adjacent pair whose joined piece scores highest."""


def _no_tokenizer(model_dir: Path) -> CamelidError:
    return CamelidError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy the base model's tokenizer files into it")


def load_hf_tokenizer(model_dir: Path) -> Any:
    """The model's own tokenizer, or a one-line error saying what is missing."""
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise _no_tokenizer(model_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CamelidError(f"cannot load the tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None


def tokenizer_kind(model_dir: Path) -> str:
    """GPT2 (byte-level BPE) or LLAMA (SentencePiece BPE with byte fallback: a tokenizer.model,
    or a tokenizer.json of that kind); any other kind is a one-line error that names it."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            return LLAMA
        raise _no_tokenizer(model_dir)
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError) as e:
        raise CamelidError(f"cannot read {path}: {e}") from None
    if model.get("type") == "BPE":
        return LLAMA if model.get("byte_fallback") else GPT2
    raise CamelidError(
        f"{model_dir} has a {model.get('type') or 'typeless'} tokenizer; camelid exports byte-level BPE (gpt2) and "
        "SentencePiece BPE with byte fallback (llama) tokenizers; convert this model with llama.cpp's convert_hf_to_gguf.py"
    )


def pre_from_hash(tokenizer: Any) -> str | None:
    """llama.cpp's pre-tokenizer name for this tokenizer, or None when llama.cpp does not know it."""
    ids = tokenizer.encode(CHECK_TEXT)
    return PRE_BY_HASH.get(hashlib.sha256(str(ids).encode()).hexdigest())


def source_gguf(dirs: tuple[Path, ...]) -> Path | None:
    """The GGUF file a model was converted from, where a camelid.json in `dirs` records one."""
    for d in dirs:
        record = d / "camelid.json"
        source = Path(json.loads(record.read_text()).get("source_gguf", "")) if record.is_file() else None
        if source is not None and source.is_file():
            return source
    return None


def special_ids(special: Any, tokenizer: Any) -> dict[str, int]:
    """bos/eos/unk/pad ids: config.json's (through gguf.SpecialVocab), the tokenizer's own view winning."""
    ids = dict(special.special_token_ids)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None) if tokenizer is not None else None
        if tid is not None:
            ids[kind] = tid
    return ids


def added_flags(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read off the tokenizer's actual output."""
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    full = tokenizer.encode("Hello", add_special_tokens=True)
    extra = len(full) - len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = extra > 0 and bos is not None and full[0] == bos and full[: len(plain) + 1] != plain
    add_eos = extra > 0 and eos is not None and full[-1] == eos and full[-len(plain) - 1 :] != plain
    return add_bos, add_eos


def looks_special(text: str) -> bool:
    # llama.cpp `does_token_look_special`: added tokens shaped like <|...|> are control tokens
    # even where the tokenizer forgot to mark them special.
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _tokens_and_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CamelidError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}; the tokenizer does not belong to this model")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            if not added[i].normalized:
                # llama.cpp expects added tokens pre-normalised (its converter does the same round trip)
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            types.append(TokenType.CONTROL if added[i].special or looks_special(text) else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def build_bpe_vocab(model_dir: Path, vocab_size: int, hint_dirs: tuple[Path, ...] = ()) -> GgufVocab:
    """Read the byte-level BPE tokenizer in `model_dir` into GGUF vocabulary fields. The
    pre-tokenizer name is taken from the GGUF the model descends from (recorded in a `hint_dirs`
    camelid.json), else detected by llama.cpp's hash."""
    import gguf

    tokenizer = load_hf_tokenizer(model_dir)
    source = source_gguf(hint_dirs or (model_dir,))
    pre = read_header(source, tensors=False).kv.get("tokenizer.ggml.pre") if source else None
    pre = pre or pre_from_hash(tokenizer)
    if pre is None:
        raise CamelidError(
            f"llama.cpp does not know the pre-tokenizer of {model_dir}'s tokenizer (its check hash is in no "
            "known family), so a GGUF would tokenise differently from the model; export refused"
        )
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise CamelidError(f"{model_dir}/tokenizer.json has no BPE merges; the tokenizer is incomplete")
    ids = special_ids(special, tokenizer)
    add_bos, add_eos = added_flags(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else special.chat_template
    return GgufVocab(
        pre=pre, tokens=tokens, token_types=types, merges=special.merges, special_ids=ids,
        add_bos=add_bos, add_eos=add_eos, chat_template=template, eos_token=tokenizer.eos_token,
    )


def write_vocab(writer: Any, v: GgufVocab) -> None:
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    writer.add_token_types(v.token_types)
    if v.merges:
        writer.add_token_merges(v.merges)
    for kind, tid in v.special_ids.items():
        add = getattr(writer, f"add_{kind}_token_id", None)
        if add is not None:
            add(tid)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
