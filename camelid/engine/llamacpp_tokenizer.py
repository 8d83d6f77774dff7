"""The GGUF's own tokenizer, for the llama.cpp backend (`engine.llamacpp`): the parts of the
Hugging Face tokenizer API camelid uses, over llama.cpp's vocabulary, so that chat templates,
stop strings and detokenisation work as with the torch engine."""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

from camelid.errors import CamelidError


class LlamaCppTokenizer:
    """The GGUF's own tokenizer with the parts of the Hugging Face tokenizer API camelid uses
    (encode/decode/__call__, special tokens, chat_template, apply_chat_template)."""

    def __init__(self, model: Any, llama_cpp: Any):
        self._m, self._lc = model, llama_cpp
        self._vocab = model.vocab
        meta = model.metadata()
        self.chat_template = meta.get("tokenizer.chat_template")
        self.bos_token_id = _or_none(model.token_bos())
        self.eos_token_id = _or_none(model.token_eos())
        pad = meta.get("tokenizer.ggml.padding_token_id")
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.bos_token = self._text(self.bos_token_id)
        self.eos_token = self._text(self.eos_token_id)
        self.add_bos = bool(model.add_bos_token())
        # SentencePiece vocabularies: a word's piece carries its leading space ("▁Hello"); the
        # first one decoded drops it, as the Hugging Face tokenizer's decoder and llama.cpp's
        # own detokenizer do.
        self._lstrip = 1 if llama_cpp.llama_vocab_type(self._vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM else 0

    def _text(self, tid: int | None) -> str | None:
        return None if tid is None else self._m.token_get_text(tid)

    def __len__(self) -> int:
        return self._m.n_vocab()

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        # Control-token text such as <|im_end|> becomes its id, as in HF tokenizers, unless
        # split_special_tokens (text from a user is only text).
        return self._m.tokenize(text.encode("utf-8"), add_special_tokens and self.add_bos, not split_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens, split_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        pieces: list[bytes] = []
        for t in ids:
            piece = self._piece(int(t), not skip_special_tokens, 0 if pieces else self._lstrip)
            if piece:
                pieces.append(piece)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _piece(self, tid: int, special: bool, lstrip: int = 0) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._lc.llama_token_to_piece(self._vocab, tid, buf, 256, lstrip, special)
        return buf.raw[: max(n, 0)]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._m.token_get_text(int(t)) for t in ids]

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any) -> Any:
        from camelid.export.ollama import render

        if not self.chat_template:
            raise CamelidError("this GGUF has no chat template; pass --conv-template chatml, vicuna_v1.1 or stackllama")
        text = render(self.chat_template, messages, bos=self.bos_token or "", eos=self.eos_token or "", add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _or_none(tid: int) -> int | None:
    return None if tid is None or tid < 0 else int(tid)
