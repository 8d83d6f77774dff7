"""Shared fixtures: the real bundled model (converted once into the cache) and a tiny random
Llama built on the bundled tokenizer, for fast end-to-end tests of every stage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
EVALDATA = REPO.parent / "shared" / "evaldata"


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (converted from its GGUF once)."""
    from camelid.models.resolve import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_dir) -> Path:
    """A 2-layer random Llama with the bundled tokenizer and chat template (seeded, ~3.5M params)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def evaldata() -> Path:
    if not EVALDATA.is_dir():
        pytest.skip(f"{EVALDATA} not present")
    return EVALDATA


@pytest.fixture(scope="session")
def llama2_tokenizer_dir(tmp_path_factory) -> Path:
    """A LLaMA-2-style SentencePiece tokenizer (BPE, byte fallback, 1000 pieces, no pad token)
    trained on the bundled sample dump (tests/llama2_fixture.py)."""
    from llama2_fixture import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("llama2-tokenizer"))


@pytest.fixture(scope="session")
def llama2_model_dir(tmp_path_factory, llama2_tokenizer_dir) -> Path:
    """A 2-layer random LlamaForCausalLM in LLaMA-2's config shape (untied head, rope theta 10000,
    no pad token; hidden 64) with the SentencePiece tokenizer (seeded, ~0.2M params)."""
    from llama2_fixture import write_model

    return write_model(tmp_path_factory.mktemp("llama2") / "llama2-tiny", llama2_tokenizer_dir)


def pytest_runtest_setup(item):
    """A test of a CPU fast path itself has nothing to test with the kit switched off."""
    if item.get_closest_marker("cpu_kit") and os.environ.get("CAMELID_CPU_FAST", "1") == "0":
        pytest.skip("tests a CPU fast path, which CAMELID_CPU_FAST=0 turns off")
