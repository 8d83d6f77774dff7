"""A Hugging Face byte-level BPE tokenizer -> the GGUF `tokenizer.ggml.*` keys llama.cpp reads.

Follows llama.cpp's own converter (`conversion/base.py`: `get_vocab_base`, `_set_vocab_gpt2`):
tokens in id order, added tokens marked CONTROL (special) or USER_DEFINED, ids missing from the
vocabulary padded as UNUSED `[PAD<i>]`, merges and special ids through `gguf.SpecialVocab`.
Two things are decided from the tokenizer's behaviour rather than guessed from its files: the
add-bos/add-eos flags (encode a string with and without special tokens) and the pre-tokenizer
name (llama.cpp's hash of the ids of a fixed text), because a wrong value there silently
changes the ids llama.cpp produces.
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


def load_hf_tokenizer(model_dir: Path) -> Any:
    """The model's own tokenizer, or a one-line error saying what is missing."""
    if not (model_dir / "tokenizer.json").is_file():
        if (model_dir / "tokenizer.model").is_file():
            raise CamelidError(
                f"{model_dir} has a SentencePiece tokenizer (tokenizer.model) and no tokenizer.json; "
                "camelid exports byte-level BPE tokenizers; re-save it with a fast tokenizer "
                "(AutoTokenizer.from_pretrained(...).save_pretrained(...)) and retry"
            )
        raise CamelidError(f"{model_dir} has no tokenizer (tokenizer.json); copy the base model's tokenizer files into it")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CamelidError(f"cannot load the tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None


def _check_byte_level(model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise CamelidError(
            f"{model_dir} uses a {kind} tokenizer; camelid exports byte-level (gpt2-style) BPE "
            "tokenizers only; convert this model with llama.cpp's convert_hf_to_gguf.py"
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


def _added_flags(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read off the tokenizer's actual output."""
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    full = tokenizer.encode("Hello", add_special_tokens=True)
    extra = len(full) - len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = extra > 0 and bos is not None and full[0] == bos and full[: len(plain) + 1] != plain
    add_eos = extra > 0 and eos is not None and full[-1] == eos and full[-len(plain) - 1 :] != plain
    return add_bos, add_eos


def _looks_special(text: str) -> bool:
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
            types.append(TokenType.CONTROL if added[i].special or _looks_special(text) else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def build_vocab(model_dir: Path, vocab_size: int, hint_dirs: tuple[Path, ...] = ()) -> GgufVocab:
    """Read the tokenizer in `model_dir` into GGUF vocabulary fields. The pre-tokenizer name is
    taken from the GGUF the model descends from (recorded in a `hint_dirs` camelid.json), else
    detected by llama.cpp's hash."""
    import gguf

    tokenizer = load_hf_tokenizer(model_dir)
    _check_byte_level(model_dir)
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
    ids = dict(special.special_token_ids)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            ids[kind] = tid  # the tokenizer's own view wins over config.json
    add_bos, add_eos = _added_flags(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else special.chat_template
    return GgufVocab(
        pre=pre, tokens=tokens, token_types=types, merges=special.merges, special_ids=ids,
        add_bos=add_bos, add_eos=add_eos, chat_template=template, eos_token=tokenizer.eos_token,
    )


def write_vocab(writer: Any, v: GgufVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    writer.add_token_merges(v.merges)
    for kind, tid in v.special_ids.items():
        add = getattr(writer, f"add_{kind}_token_id", None)
        if add is not None:
            add(tid)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
