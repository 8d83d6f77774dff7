"""LLaMA-2-style models through every command: a SentencePiece tokenizer with byte fallback, no
pad token, an untied LM head (tests/llama2_fixture.py). The fixture itself; the pad token camelid
gives it and what trains on it; chat with FastChat's vicuna_v1.1 prompt; generate, --load-8bit and
a served request; the pipeline's stages and merge; GGUF export read back and run by llama.cpp."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.models.load import load_tokenizer

PAD, BOS, EOS = 0, 1, 2  # <unk> (the reserved pad camelid gives LLaMA), <s>, </s>
# Strings where tokenisers part ways: spaces, newlines, digits, emoji, CJK, accents, tabs, CR.
TRICKY = [
    "Hello world\n  12345 🦙 日本語", "a\n\nb\n", "ÿ€ café naïve", "tab\there\r\nnext", "3.14159 x² ≈ π",
    "def f(x):\n    return x  # two  spaces", "trailing  ", "\n", "Ünïcödé 😶\u200d🌫️ ✅ 🦙🦙",
]
LEADING = [" leading", "  two spaces first", " \n x"]  # see test_llamacpp_tokenizes_like_sentencepiece


def sp_processor(model_dir: Path):
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


# ---- the fixture --------------------------------------------------------------------------------

def test_fixture_has_llama2s_shape(llama2_model_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((llama2_model_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg.get("pad_token_id")) == (BOS, EOS, None)
    sp = sp_processor(llama2_model_dir)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert sp.get_piece_size() == cfg["vocab_size"] == 1000
    assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]  # newline through byte fallback, as in LLaMA
    tok = AutoTokenizer.from_pretrained(llama2_model_dir)
    assert tok.pad_token is None and tok.encode("hi")[0] == BOS and tok.encode("hi")[-1] != EOS
    for text in TRICKY:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text


# ---- the pad token and what trains on it ---------------------------------------------------

def test_pad_is_the_reserved_unk_and_eos_elsewhere(llama2_model_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    from camelid.models.load import set_pad_token
    from llama2_fixture import corpus_lines

    tok = load_tokenizer(llama2_model_dir)
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", PAD)
    ids = tok(corpus_lines() + TRICKY)["input_ids"]
    assert not any(PAD in row for row in ids)  # byte fallback: <unk> never appears in text
    # A byte-level BPE tokenizer without a pad token gets EOS (StackLLaMA's choice).
    bpe = AutoTokenizer.from_pretrained(tiny_model_dir)
    bpe.pad_token = None
    set_pad_token(bpe)
    assert bpe.pad_token_id == bpe.eos_token_id


def test_sft_and_reward_batches_train_on_eos_never_on_pad(llama2_model_dir, tmp_path):
    import datasets

    from camelid.models.lora import LoraSettings
    from camelid.models.train_load import load_for_training
    from camelid.train import reward, sft
    from camelid.qa import qa_text
    from camelid.train.common import RunState

    run = RunState(tmp_path, None, None)
    texts = [qa_text(f"How long do I boil egg {i}?", "About nine minutes." * (i + 1)) for i in range(6)]
    # SFT: packed blocks, no padding: every position is labelled, the EOS between texts included.
    model, tok, _ = load_for_training(llama2_model_dir, LoraSettings(), task="causal_lm")
    cfg = sft.SFTConfig(model=str(llama2_model_dir), out=str(tmp_path), seq_length=32, batch_size=2)
    ds = sft.packed_dataset(texts, tok, cfg.seq_length)
    trainer = sft.build_trainer(cfg, run, model, tok, ds, None, [])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())
    assert int((batch["input_ids"] == EOS).sum()) >= 2 and not bool((batch["input_ids"] == PAD).any())
    # Reward: right padding with the reserved id; the real EOS ending each row is attended to and
    # is the token the classifier reads its score at.
    model, tok, _ = load_for_training(llama2_model_dir, LoraSettings(), task="seq_cls")
    rows = [tok(t)["input_ids"] + [EOS] for t in texts]
    pairs = datasets.Dataset.from_dict({"chosen_ids": rows[:3], "rejected_ids": rows[3:]})
    rcfg = reward.RewardConfig(model=str(llama2_model_dir), out=str(tmp_path), max_length=128, batch_size=3)
    trainer = reward.build_trainer(rcfg, run, model, tok, pairs, None, [])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    lengths = torch.tensor([len(r) for r in rows[:3] + rows[3:]])
    positions = torch.arange(batch["input_ids"].shape[1])
    assert torch.equal(batch["attention_mask"], (positions < lengths[:, None]).long())
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == PAD).all())
    assert torch.equal(batch["input_ids"][torch.arange(6), lengths - 1], torch.full((6,), EOS))
    pooled = (positions * (batch["input_ids"] != model.config.pad_token_id)).argmax(-1)  # transformers' rule
    assert torch.equal(pooled, lengths - 1)


# ---- chat, generate, --load-8bit, serve -------------------------------------------------------

def fastchat_vicuna_prompt(system: str, turns: list[tuple[str, str | None]]) -> str:
    """FastChat's Conversation.get_prompt for vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO,
    sep " ", sep2 "</s>", roles USER / ASSISTANT); a None message is the open turn."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate((r, m) for turn in turns for r, m in zip(("USER", "ASSISTANT"), turn)):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def test_chat_vicuna_prompt_is_fastchats_with_eos_ids(llama2_model_dir, tmp_path):
    from camelid.engine import Engine

    saved, system = tmp_path / "conv.json", "You answer cooking questions."
    script = f"How do I boil an egg?\nAnd a soft one?\n!!save {saved}\n!!exit\n"
    args = ["chat", "--backend", "torch", "--model", str(llama2_model_dir), "--conv-template", "vicuna_v1.1", "--system", system,
            "--style", "programmatic", "--debug", "--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "camelid", *args], input=script, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    prompts = re.findall(r"\[prompt\]\n(.*?)\n\[/prompt\]", r.stdout, flags=re.S)
    answers = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "assistant"]
    assert len(prompts) == len(answers) == 2 and answers[0]
    assert prompts[0] == fastchat_vicuna_prompt(system, [("How do I boil an egg?", None)])
    want = fastchat_vicuna_prompt(system, [("How do I boil an egg?", answers[0]), ("And a soft one?", None)])
    assert prompts[1] == want == f"{system} USER: How do I boil an egg? ASSISTANT: {answers[0]}</s>USER: And a soft one? ASSISTANT:"
    # "</s>" after the answer is the EOS id, not its characters; BOS is prepended once.
    ids = Engine.load(str(llama2_model_dir), device="cpu", dtype="float32").encode(prompts[1])
    assert ids[0] == BOS and ids.count(BOS) == 1 and ids.count(EOS) == 1
    tok = load_tokenizer(llama2_model_dir)
    head = tok(prompts[1].split("</s>")[0])["input_ids"]
    assert ids[: len(head) + 1] == head + [EOS]


def test_generate_and_load_8bit(llama2_model_dir, capsys):
    for extra in ([], ["--load-8bit"]):
        args = ["generate", "--backend", "torch", "--model", str(llama2_model_dir), "--conv-template", "vicuna_v1.1", "--temperature", "0",
                "--max-new-tokens", "5", *extra, "What is a roux?"]
        assert main(args) == 0
        assert capsys.readouterr().out.endswith("\n")


def test_serve_answers_a_chat_request(llama2_model_dir):
    import httpx
    from serve_helpers import live_server

    with live_server(llama2_model_dir, "vicuna-tiny", template="vicuna_v1.1") as (url, _):
        body = {"model": "vicuna-tiny", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["role"] == "assistant" and out["usage"]["completion_tokens"] >= 1


# ---- training: the pipeline's stages, merge ---------------------------------------------------

PRESET = """
data: {splits: [0.25, 0.25, 0.25, 0.25], workers: 1, progress: false}
sft: {max_steps: 2, batch_size: 2, seq_length: 64, save_steps: 2, logging_steps: 1}
reward: {max_steps: 2, batch_size: 2, max_length: 160, save_steps: 2, logging_steps: 1, min_pairs: 1}
ppo: {steps: 2, batch_size: 2, mini_batch_size: 1, ppo_epochs: 1, min_new_tokens: 3, max_new_tokens: 5,
      save_steps: 2, samples_every: 1, forward_batch_size: 2, reward_batch_size: 4}
eval: {max_questions: 2, max_new_tokens: 5, batch_size: 4}
"""


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, llama2_model_dir) -> Path:
    """`camelid pipeline --model <fixture>` on a generated dump, every stage at a tiny size."""
    from test_pipeline import write_dump

    root = tmp_path_factory.mktemp("llama2-pipeline")
    (root / "tiny.yaml").write_text(PRESET)
    dump = write_dump(root / "dump")
    args = ["pipeline", "--preset", str(root / "tiny.yaml"), "--data", str(dump), "--model", str(llama2_model_dir),
            "--out", str(root / "run")]
    assert main(args) == 0
    return root / "run"


def test_pipeline_stages_train_and_record_the_pad(pipeline_run):
    result = {s: json.loads((pipeline_run / s / "result.json").read_text()) for s in ("sft", "reward", "ppo", "eval")}
    assert math.isfinite(result["sft"]["train_loss"]) and math.isfinite(result["sft"]["eval_loss"])
    assert math.isfinite(result["reward"]["train_loss"]) and math.isfinite(result["reward"]["eval"]["loss"])
    ppo_rows = [json.loads(x) for x in (pipeline_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["ppo/loss/policy"] for row in ppo_rows if "ppo/loss/policy" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert result["eval"]["questions"] == 2 and (pipeline_run / "report" / "report.html").is_file()
    for stage in ("sft", "reward", "ppo"):
        model = pipeline_run / stage / "model"
        cfg = json.loads((model / "config.json").read_text())
        assert cfg["pad_token_id"] == PAD and cfg["tie_word_embeddings"] is False, stage
        assert load_tokenizer(model).pad_token == "<unk>", stage
        assert json.loads((model / "tokenizer_config.json").read_text())["pad_token"] == "<unk>", stage


def test_merge_sft_adapter_equals_the_stage_model(pipeline_run, tmp_path):
    from camelid.models.load import load_for_inference

    assert main(["merge", str(pipeline_run / "sft" / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([load_tokenizer(tmp_path / "merged").encode("Question: soup?\n\nAnswer: salt")])
    logits = []
    for path in (tmp_path / "merged", pipeline_run / "sft" / "model"):
        lm, _, _ = load_for_inference(str(path), device="cpu", dtype="float32")
        assert not lm.config.tie_word_embeddings
        with torch.no_grad():
            logits.append(lm(ids).logits)
    torch.testing.assert_close(logits[0], logits[1])


# ---- GGUF: the SentencePiece vocabulary and llama.cpp ----------------------------------------

def _export(model: Path, out: Path, quant: str = "f16") -> Path:
    from camelid.export.core import ExportConfig, export_gguf

    return export_gguf(ExportConfig(model=str(model), out=str(out), quant=quant, progress=False, modelfile=False)).path


@pytest.fixture(scope="module")
def llama2_gguf(llama2_model_dir, tmp_path_factory) -> Path:
    return _export(llama2_model_dir, tmp_path_factory.mktemp("llama2-gguf") / "llama2-f16.gguf")


def test_gguf_vocabulary_and_untied_output(llama2_gguf, llama2_model_dir):
    import numpy as np
    from gguf import GGUFReader, TokenType
    from safetensors.numpy import load_file

    r = GGUFReader(str(llama2_gguf))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    sp = sp_processor(llama2_model_dir)
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("llama", "default")
    assert "tokenizer.ggml.merges" not in kv
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(1000)]
    assert kv["tokenizer.ggml.scores"][3:] == pytest.approx([sp.get_score(i) for i in range(3, 1000)])
    types = kv["tokenizer.ggml.token_type"]
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert set(types[3:259]) == {TokenType.BYTE} and set(types[259:]) == {TokenType.NORMAL}
    ids = (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.unknown_token_id"])
    assert ids == (BOS, EOS, PAD) and "tokenizer.ggml.padding_token_id" not in kv  # the base model has no pad
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    tensors = {t.name: t for t in r.tensors}
    head = load_file(str(llama2_model_dir / "model.safetensors"))["lm_head.weight"]
    np.testing.assert_allclose(np.asarray(tensors["output.weight"].data, dtype=np.float32), head, atol=1e-3)
    assert not np.allclose(np.asarray(tensors["token_embd.weight"].data, dtype=np.float32), head, atol=1e-3)


@pytest.fixture(scope="module")
def lcpp(llama2_gguf):
    pytest.importorskip("llama_cpp")
    from camelid.engine.llamacpp import load_llamacpp_engine

    eng = load_llamacpp_engine(str(llama2_gguf), threads=2, max_context=256, parallel=1)
    yield eng
    eng.close()


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_like_sentencepiece_and_hugging_face(lcpp, llama2_model_dir):
    from camelid.templates import TEMPLATES

    sp, hf = sp_processor(llama2_model_dir), load_tokenizer(llama2_model_dir)
    for text in TRICKY + LEADING:
        assert lcpp.tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), text
    # transformers 5 drops SentencePiece's dummy prefix before a leading space (" x": ▁x, not ▁ ▁x);
    # llama.cpp and SentencePiece keep it, so those strings are compared with SentencePiece only.
    for text in TRICKY:
        ids = hf.encode(text, add_special_tokens=False)
        assert lcpp.tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert lcpp.tokenizer.decode(ids) == hf.decode(ids), text
    prompt = TEMPLATES["vicuna_v1.1"].render([{"role": "user", "content": "Is 1 °C warm? 🦙"}])
    assert lcpp.encode(prompt) == hf(prompt)["input_ids"]  # BOS prepended by both
    assert lcpp.tokenizer.encode("</s>", add_special_tokens=False) == [EOS]


TIE = 0.002
"""A logit margin f16 rounding may overturn: about twice llama.cpp's rounding of these logits
(|logit| < 1, f16 weights and activations: 2^-10 relative). Greedy paths with a closer call are
not compared token for token (either token is right); their logits still are."""


@pytest.mark.llamacpp
def test_llamacpp_greedy_equals_torch_float32(lcpp, llama2_model_dir):
    import numpy as np

    from camelid.engine import Engine, SamplingParams
    from camelid.templates import TEMPLATES

    torch_engine = Engine.load(str(llama2_model_dir), device="cpu", dtype="float32")
    questions = ["How do I cook rice?", "What is 2+2?", "Name three colours.", "Is 74 °C safe for turkey?",
                 "Why does bread rise?", "How do I sharpen a knife?", "What is a roux?", "Can I freeze basil?"]
    prompts = [TEMPLATES["vicuna_v1.1"].render([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    compared = 0
    for prompt in prompts:
        want = torch_engine.generate([prompt], params)[0].token_ids
        ids = torch_engine.encode(prompt)
        with torch.no_grad():
            logits = torch_engine.model(torch.tensor([ids + want])).logits[0, len(ids) - 1 : -1]
        slot = lcpp.take_slot()  # llama.cpp's logits along the same path (teacher-forced)
        try:
            got = lcpp.decode([(t, i, slot, i >= len(ids) - 1) for i, t in enumerate(ids + want[:-1])])
        finally:
            lcpp.release_slot(slot)
        torch.testing.assert_close(torch.tensor(np.stack(got)), logits, atol=TIE / 2, rtol=0)
        top = logits.topk(2).values
        if bool(((top[:, 0] - top[:, 1]) < TIE).any()):
            continue
        assert lcpp.generate([prompt], params)[0].token_ids == want, prompt
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize("drop", ["tokenizer.model", "tokenizer.json"])
def test_either_tokenizer_file_exports_the_same_vocabulary(drop, llama2_gguf, llama2_model_dir, tmp_path):
    """tokenizer.json alone is what transformers saves for a model trained here: the scores come
    from its merges and order the joins as SentencePiece's own do. tokenizer.model alone is a
    Vicuna v1.5 hub folder."""
    import shutil

    from gguf import GGUFReader

    d = Path(shutil.copytree(llama2_model_dir, tmp_path / "m"))
    (d / drop).unlink()
    assert load_tokenizer(d).encode("Hello world") == load_tokenizer(llama2_model_dir).encode("Hello world")
    a, b = ({k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
            for path in (llama2_gguf, _export(d, tmp_path / "x.gguf")))
    order = lambda kv: sorted(range(259, 1000), key=lambda i: -kv["tokenizer.ggml.scores"][i])  # noqa: E731
    assert order(a) == order(b)
    assert {k: v for k, v in a.items() if k != "tokenizer.ggml.scores"} == {k: v for k, v in b.items() if k != "tokenizer.ggml.scores"}


def test_unsupported_tokenizer_kinds_are_named(llama2_model_dir, tmp_path):
    import shutil

    d = Path(shutil.copytree(llama2_model_dir, tmp_path / "m"))
    (d / "tokenizer.model").unlink()
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [[p, 0.0] for p in tj["model"]["vocab"]]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CamelidError, match="has a Unigram tokenizer; camelid exports byte-level BPE"):
        _export(d, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


# ---- llama.cpp's KV cache size; PPO's reward model in 8 bits ---------------------------------

def test_llamacpp_kv_cache_fits_a_share_of_memory(llama2_gguf):
    pytest.importorskip("llama_cpp")
    from camelid.engine.llamacpp import (KV_MEMORY_SHARE, MIN_SEQUENCE_CONTEXT, load_llamacpp_engine,
                                         sequence_context)

    gib, per_token_7b = 2**30, 2 * 2 * 32 * 4096  # f16 K and V, 32 layers of 4096
    # The 7B served 32 at once: 4096 tokens each would be 64 GiB; 128 GiB of memory gives 2048 each.
    assert sequence_context(None, 4096, 32, per_token_7b, 128 * gib) == 2048
    assert 32 * 2048 * per_token_7b <= KV_MEMORY_SHARE * 128 * gib
    assert sequence_context(None, 4096, 32, per_token_7b, 8 * gib) == MIN_SEQUENCE_CONTEXT
    assert sequence_context(None, 4096, 1, per_token_7b, 128 * gib) == 4096  # room for the whole context
    assert sequence_context(3000, 4096, 32, per_token_7b, 8 * gib) == 3000  # asked for: given
    assert sequence_context(None, 4096, 4, 0, 0) == 4096  # unknown memory: the full context
    eng = load_llamacpp_engine(str(llama2_gguf), threads=1, parallel=3)
    try:
        import llama_cpp

        assert eng.max_context == 4096  # 2 x 2 x 2 x 64 bytes a token: 4 x 4096 tokens fit anywhere
        # one slice per sequence, and the scratch sequence rows swap through (LlamaCppEngine.move)
        assert llama_cpp.llama_n_ctx(eng.ctx.ctx) == (3 + 1) * eng.max_context
    finally:
        eng.close()


def test_ppo_reward_model_in_8_bits(pipeline_run, tmp_path):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear8bitLt

    from camelid.train.ppo import run
    from camelid.train.ppo_config import PPOConfig
    from camelid.train.ppo_scorers import RewardModelScorer

    scorer = RewardModelScorer(str(pipeline_run / "reward"), "float32", 4, load_8bit=True)
    assert any(isinstance(m, Linear8bitLt) for m in scorer.model.modules())
    assert all(math.isfinite(x) for x in scorer(["Question: a?\n\nAnswer: "] * 2, ["yes", "no"], [[1], [2]]).tolist())
    with pytest.raises(CamelidError, match="LoRA adapter; an 8-bit reward model loads from a merged one"):
        RewardModelScorer(str(pipeline_run / "reward" / "adapter"), "float32", 4, load_8bit=True)
    cfg = PPOConfig(policy=str(pipeline_run / "sft"), reward_model=str(pipeline_run / "reward"), reward_load_8bit=True,
                    data=str(pipeline_run / "data"), out=str(tmp_path / "ppo"), steps=1, batch_size=2, mini_batch_size=1,
                    ppo_epochs=1, min_new_tokens=2, max_new_tokens=4, num_threads=1, merge=False)
    result = run(cfg)
    assert result.steps == 1 and (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
