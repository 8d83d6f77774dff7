"""Packing: texts joined with EOS, cut into constant-length blocks, no padding."""

from __future__ import annotations

import numpy as np
import pytest

from camelid.data.packing import pack_texts, pack_token_lists, packed_token_count

EOS = 0


def test_exact_blocks_eos_at_every_boundary_no_padding():
    texts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]  # 3+1 + 2+1 + 4+1 + 1+1 = 14 tokens in the stream
    blocks = pack_token_lists(texts, block_size=4, eos_id=EOS)
    assert blocks.shape == (3, 4)  # 14 // 4 = 3 blocks; the 2-token tail [14, EOS] is dropped
    # The stream written out by hand: each text followed by one EOS, in order.
    assert blocks.tolist() == [[5, 6, 7, EOS], [8, 9, EOS, 10], [11, 12, 13, EOS]]


def test_every_text_boundary_has_eos_and_nothing_else_is_eos():
    rng = np.random.default_rng(0)
    texts = [list(rng.integers(1, 100, size=rng.integers(1, 30))) for _ in range(50)]
    block = 16
    blocks = pack_token_lists(texts, block_size=block, eos_id=EOS)
    total = packed_token_count(texts)
    assert blocks.shape == (total // block, block)
    flat = blocks.reshape(-1)
    boundaries = np.cumsum([len(t) + 1 for t in texts]) - 1  # index of each text's EOS in the stream
    kept = boundaries[boundaries < len(flat)]
    assert (flat[kept] == EOS).all()
    assert (flat == EOS).sum() == len(kept)  # no padding: EOS appears only at text ends
    assert np.array_equal(flat, np.concatenate([np.append(t, EOS) for t in texts])[: len(flat)])


def test_short_input_gives_no_block_and_bad_size_is_rejected():
    assert pack_token_lists([[1, 2]], block_size=8, eos_id=EOS).shape == (0, 8)
    assert pack_token_lists([], block_size=8, eos_id=EOS).shape == (0, 8)
    with pytest.raises(ValueError):
        pack_token_lists([[1]], block_size=1, eos_id=EOS)


def test_pack_texts_with_real_tokenizer(bundled_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    texts = [f"Question: q{i}\n\nAnswer: answer number {i} " * (i % 3 + 1) for i in range(20)]
    ids = tok(texts)["input_ids"]
    blocks = pack_texts(texts, tok, block_size=32, batch_size=7)
    assert blocks.shape == (packed_token_count(ids) // 32, 32)
    assert (blocks == tok.eos_token_id).sum() == sum(1 for b in np.cumsum([len(t) + 1 for t in ids]) if b <= blocks.size)
    assert tok.decode(blocks[0]).startswith("Question: q0")
