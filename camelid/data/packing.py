"""Packing for causal-LM fine-tuning: texts joined with EOS and cut into constant-length blocks.

This is StackLLaMA's `ConstantLengthDataset` (trl/examples/research_projects/stack_llama/scripts/
supervised_finetuning.py, after the "wrapped" strategy of TRL's `pack_dataset`): every text's
tokens are followed by one EOS, the stream is concatenated and cut into blocks of exactly
`block_size` tokens; the tail shorter than a block is dropped. No padding, so every position
of every block is a training token and every batch has the same shape. A text may straddle two
blocks, and tokens attend across the EOS to the previous text in the same block: the price of
zero padding that StackLLaMA accepted, and the model learns that EOS ends a text.

Pure Python + numpy, so it is exact and testable without a model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pack_token_lists(token_lists: Iterable[Sequence[int]], block_size: int, eos_id: int) -> np.ndarray:
    """Concatenate `tokens + [eos_id]` for every list and cut into rows of `block_size`.

    Returns an int64 array of shape (n_blocks, block_size) where
    n_blocks = sum(len(t) + 1 for t in token_lists) // block_size (the short tail is dropped).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    pieces = []
    eos = np.array([eos_id], dtype=np.int64)
    for tokens in token_lists:
        pieces.append(np.asarray(tokens, dtype=np.int64))
        pieces.append(eos)
    if not pieces:
        return np.zeros((0, block_size), dtype=np.int64)
    stream = np.concatenate(pieces)
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size)


def pack_texts(texts: Sequence[str], tokenizer, block_size: int, batch_size: int = 1000) -> np.ndarray:
    """Tokenize `texts` (in batches, with the tokenizer's usual special tokens) and pack them.

    Special tokens are added as the model was trained with them (e.g. BOS for LLaMA-1/2, none for
    SmolLM2); EOS is then appended by `pack_token_lists`, so it marks every text boundary.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; packing needs one to mark text boundaries")
    token_lists: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        token_lists.extend(tokenizer(batch, add_special_tokens=True)["input_ids"])
    return pack_token_lists(token_lists, block_size, tokenizer.eos_token_id)


def packed_token_count(token_lists: Iterable[Sequence[int]]) -> int:
    """Tokens in the packed stream before cutting (texts plus one EOS each)."""
    return sum(len(t) + 1 for t in token_lists)
