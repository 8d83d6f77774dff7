"""camelid reward train / score on a 2-layer random Llama: the pairwise loss, learning a toy
preference, dropped pairs, the longer-answer baseline, merge, scoring, bad inputs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camelid.errors import CamelidError
from camelid.qa import qa_text
from camelid.train.pairs import tokenize_split
from camelid.train.reward import RewardConfig, load_reward_model, pairwise_loss, run, score_texts
from camelid.train.tracking import read_metrics
from train_data import MARKER, assert_same_adapter, torchrun_camelid, write_dataset

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)


def test_pairwise_loss_hand_values():
    r_j = torch.tensor([2.0, 0.0, -1.0])
    r_k = torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 2 -> 0.126928, d = 0 -> log 2 = 0.693147, d = -2 -> 2.126928
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert float(pairwise_loss(r_j, r_k)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.982334, abs=1e-6)
    # Finite where a naive log(sigmoid()) underflows to -inf.
    assert float(pairwise_loss(torch.tensor([-200.0]), torch.tensor([0.0]))) == pytest.approx(200.0)


def test_trl_reward_trainer_computes_the_pairwise_loss(tiny_model_dir, tmp_path):
    """RewardTrainer.compute_loss on a real batch equals -logsigmoid(r_j - r_k) of the model's scores."""
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from camelid.models.lora import LoraSettings
    from camelid.models.train_load import load_for_training

    torch.manual_seed(0)
    model, tok, _ = load_for_training(tiny_model_dir, LoraSettings(dropout=0.0), task="seq_cls")
    with torch.no_grad():
        model.base_model.model.score.modules_to_save.default.weight.normal_()  # non-trivial rewards
    j = [tok(qa_text("q?", f"good answer {i}"))["input_ids"] + [tok.eos_token_id] for i in range(3)]
    k = [tok(qa_text("q?", f"bad {i} " * (i + 1)))["input_ids"] + [tok.eos_token_id] for i in range(3)]
    ds = datasets.Dataset.from_dict({"chosen_ids": j, "rejected_ids": k})
    args = TRLRewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, fp16=False,
                           per_device_train_batch_size=3, activation_checkpointing=False, disable_dropout=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([ds[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        from camelid.train.reward import score_ids

        r_j, r_k = torch.tensor(score_ids(model, tok, j)), torch.tensor(score_ids(model, tok, k))
    assert (r_j - r_k).abs().max() > 1e-3
    by_hand = sum(math.log(1 + math.exp(-(a - b))) for a, b in zip(r_j.tolist(), r_k.tolist())) / 3
    assert float(loss) == pytest.approx(by_hand, abs=1e-5)
    assert float(loss) == pytest.approx(float(pairwise_loss(r_j, r_k)), abs=1e-5)


def test_length_buckets_give_trl_loss_and_gradients(tiny_model_dir, tmp_path):
    """Our trainer runs a batch's rows in passes of similar length; loss and LoRA gradients equal
    TRL's single padded pass on a batch whose rows differ a lot in length."""
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from camelid.models.lora import LoraSettings
    from camelid.models.train_load import load_for_training
    from camelid.train.reward import _bucketed

    torch.manual_seed(0)
    model, tok, _ = load_for_training(tiny_model_dir, LoraSettings(dropout=0.0), task="seq_cls")
    with torch.no_grad():
        model.base_model.model.score.modules_to_save.default.weight.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    j = [tok(qa_text("q?", "a long careful answer " * (1 + 6 * (i % 2))))["input_ids"] + [tok.eos_token_id] for i in range(4)]
    k = [tok(qa_text("q?", f"short {i}"))["input_ids"] + [tok.eos_token_id] for i in range(4)]
    ds = datasets.Dataset.from_dict({"chosen_ids": j, "rejected_ids": k})
    args = TRLRewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, fp16=False,
                           per_device_train_batch_size=4, activation_checkpointing=False, disable_dropout=False)
    trainer = _bucketed(RewardTrainer)(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([ds[i] for i in range(4)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > 2 * lengths.min()  # padding to cut

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(trainer, model, dict(batch))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours, g_ours = loss_and_grads(type(trainer).compute_loss)
    trl, g_trl = loss_and_grads(RewardTrainer.compute_loss)
    assert ours == pytest.approx(trl, abs=1e-5)
    for name, g in g_trl.items():
        torch.testing.assert_close(g_ours[name], g, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("rmdata"), n_pairs=128, seed=3)


def tiny_cfg(model: Path, data: Path, out: Path, **kw) -> RewardConfig:
    base = dict(model=str(model), data=str(data), out=str(out), max_length=35, max_prompt_length=24, batch_size=8, max_steps=36,
                save_steps=18, logging_steps=6, learning_rate=1e-2, lora_dropout=0.0, seed=1)
    return RewardConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data):
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path_factory.mktemp("rm") / "run")
    return cfg, run(cfg)


def test_learns_the_toy_preference_beyond_the_length_baseline(trained):
    cfg, r = trained
    assert r.steps == 36 and math.isfinite(r.train_loss)
    assert r.eval.accuracy > 0.9, r.eval
    assert r.eval.mean_margin > 0 and r.eval.accuracy > r.eval.longer_wins_accuracy
    rows = read_metrics(cfg.out)
    assert all(math.isfinite(row["reward/loss"]) for row in rows if "reward/loss" in row)
    assert any(row.get("reward/eval_accuracy") == pytest.approx(r.eval.accuracy) for row in rows)
    saved = json.loads((Path(cfg.out) / "result.json").read_text())
    assert saved["eval"]["accuracy"] == pytest.approx(r.eval.accuracy)


def test_long_pairs_cut_not_dropped_and_baseline_counted_independently(trained, tiny_model_dir):
    """Pairs over max_length are cut to fit, not dropped: each side is the first max_length - 1
    tokens of its full text + EOS (the prompt fits whole here); the baseline counts on those."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from camelid.data.output import split_path

    cfg, r = trained
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sides = {}
    for split in ("reward", "evaluation"):
        t = pq.read_table(split_path(cfg.data, split)).to_pylist()
        ids = lambda q, a: tok(qa_text(q, a))["input_ids"]  # noqa: E731
        full = [(ids(x["question"], x["response_j"]), ids(x["question"], x["response_k"])) for x in t]
        over = sum(max(len(a), len(b)) + 1 > cfg.max_length for a, b in full)
        cut = [(a[: cfg.max_length - 1] + [tok.eos_token_id], b[: cfg.max_length - 1] + [tok.eos_token_id]) for a, b in full]
        sides[split] = (over, [(a, b) for a, b in cut if a != b])
    assert sides["reward"][0] > 0, "the test data should have over-long pairs"
    assert (r.train_pairs, r.truncated_train_pairs) == (len(sides["reward"][1]), sides["reward"][0])
    assert r.train_pairs + r.dropped_train_pairs == 128 and r.train_pairs > 120
    assert r.eval_pairs == len(sides["evaluation"][1])
    kept = sides["evaluation"][1]
    longer = sum(1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0 for a, b in kept) / len(kept)
    assert r.eval.longer_wins_accuracy == pytest.approx(longer)


def test_lora_and_score_head_trained_base_untouched(trained, tiny_model_dir):
    cfg, _ = trained
    ad = load_file(str(Path(cfg.out) / "adapter" / "adapter_model.safetensors"))
    assert any("score" in k for k in ad) and all(v.abs().max() > 0 for k, v in ad.items() if "lora_B" in k)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(Path(cfg.out) / "model" / "model.safetensors"))
    for name, w in base.items():
        if name == "lm_head.weight" or any(f"{m}.weight" in name for m in cfg.lora_target_modules):
            continue
        assert torch.equal(merged[name], w), name
    assert merged["score.weight"].shape == (1, 64)


def test_merged_reward_model_scores_equal_adapter_scores_and_cli(trained, tmp_path, capsys):
    from camelid.cli import main

    cfg, _ = trained
    texts = [qa_text("How do I look after tree number 7?", f"the {MARKER} apple tree grows"),
             qa_text("How do I look after tree number 7?", "the apple tree grows")]
    merged, tok = load_reward_model(cfg.out)  # the run folder -> its model/
    adapter, tok2 = load_reward_model(str(Path(cfg.out) / "adapter"))
    s_m, s_a = score_texts(merged, tok, texts), score_texts(adapter, tok2, texts)
    assert s_m == pytest.approx(s_a, abs=1e-4)
    assert s_m[0] > s_m[1]  # the marker is preferred
    assert main(["reward", "score", "--model", cfg.out, texts[0].replace("\n", "\\n")]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(s_m[0], abs=1e-3)
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"question": "How do I look after tree number 7?",
                                                                    "answer": "the apple tree grows", "id": 2}) + "\n")
    assert main(["reward", "score", "--model", str(Path(cfg.out) / "model"), "--file", str(f)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["score"] for x in rows] == pytest.approx(s_m, abs=1e-3) and rows[1]["id"] == 2


def test_scores_through_the_cpu_pass_equal_the_models_own_forward(trained):
    """score_ids runs the CPU training pass's decoder and the score head at the token transformers
    pools (the rightmost non-padding one): against the model's forward with its padding mask, on
    rows of different lengths, one of them ending in the padding id (EOS is padding here)."""
    from camelid.cpu.llama_train import decoder_hidden
    from camelid.train.reward import _scores

    cfg, _ = trained
    model, tok = load_reward_model(cfg.out)
    pad = model.config.pad_token_id
    rows = [[5, 9, 14, 3], [7, 7, 21, 30, 11, 4, pad], [12]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        assert decoder_hidden(model, ids) is not None  # the pass applies to this model
        ours = _scores(model, ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_two_processes_equal_one_process_with_double_batch(trained, tmp_path):
    cfg, _ = trained
    cfg1 = replace(cfg, out=str(tmp_path / "one"), max_steps=3, batch_size=4, merge=False)
    r1 = run(cfg1)
    args = ["reward", "train", "--model", cfg.model, "--data", cfg.data, "--out", str(tmp_path / "two"),
            "--max-length", str(cfg.max_length), "--max-prompt-length", str(cfg.max_prompt_length), "--batch-size", "2", "--max-steps", "3", "--logging-steps", "1",
            "--learning-rate", str(cfg.learning_rate), "--lora-dropout", "0", "--seed", str(cfg.seed), "--no-merge"]
    torchrun_camelid(args, port=30500)
    assert_same_adapter(tmp_path / "two" / "adapter", r1.adapter_dir)


def test_bad_inputs(tmp_path, tiny_model_dir, data, trained):
    from transformers import LlamaConfig, ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    with pytest.raises(CamelidError, match="cannot be trained as a sequence classifier"):
        run(tiny_cfg(vit, data, tmp_path / "o"))
    three = tmp_path / "three"
    LlamaConfig(architectures=["LlamaForSequenceClassification"], num_labels=3).save_pretrained(three)
    with pytest.raises(CamelidError, match="3 outputs"):
        run(tiny_cfg(three, data, tmp_path / "o"))
    no_reward = write_dataset(tmp_path / "d1", n_pairs=4, splits=("finetune", "evaluation"))
    with pytest.raises(CamelidError, match="no reward split"):
        run(tiny_cfg(tiny_model_dir, no_reward, tmp_path / "o"))
    no_k = write_dataset(tmp_path / "d2", n_pairs=4, drop_columns=("response_k",))
    with pytest.raises(CamelidError, match="response_k"):
        run(tiny_cfg(tiny_model_dir, no_k, tmp_path / "o"))
    with pytest.raises(CamelidError, match="raise --max-length"):
        run(tiny_cfg(tiny_model_dir, data, tmp_path / "o", max_length=8))
    with pytest.raises(CamelidError, match="min_pairs=200"):
        run(tiny_cfg(tiny_model_dir, data, tmp_path / "o", min_pairs=200))
    cfg, _ = trained
    with pytest.raises(CamelidError, match="another config"):
        run(replace(cfg, max_length=48), resume=True)
    with pytest.raises(CamelidError, match="not a reward model"):
        load_reward_model(str(tiny_model_dir))
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_reward_ids_append_eos_and_cut_long(tiny_model_dir):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = datasets.Dataset.from_dict({"question": ["q", "q"], "response_j": ["a", "word " * 50], "response_k": ["b", "c"]})
    pairs = tokenize_split(ds, tok, max_length=20)
    j, k = pairs.reward_ids(tok.eos_token_id)
    assert pairs.dropped == 0 and pairs.truncated == 1 and len(j) == len(k) == 2
    assert j[0] == tok(qa_text("q", "a"))["input_ids"] + [tok.eos_token_id]
    assert j[1] == tok(qa_text("q", "word " * 50))["input_ids"][:19] + [tok.eos_token_id] and len(k[1]) < 20


def test_8bit_base_trains_with_float32_head(tmp_path, tiny_model_dir, data):
    """TRL casts a quantized model's trainable weights to bf16; ours stay float32 and train."""
    pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "q", max_steps=2, save_steps=2, load_8bit=True, max_eval_samples=8)
    r = run(cfg)
    assert r.steps == 2 and math.isfinite(r.train_loss) and math.isfinite(r.eval.loss)
    ad = load_file(str(r.adapter_dir / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in ad.values())


def test_batched_scores_come_back_in_order(trained):
    """score_texts batches texts of similar length together; each score still lands on its own
    text and equals the text scored alone."""
    cfg, _ = trained
    model, tok = load_reward_model(cfg.out)
    texts = [qa_text(f"How do I look after tree number {i}?", " ".join(["the apple tree grows"] * n))
             for i, n in enumerate((5, 1, 9, 2, 7))]
    batched = score_texts(model, tok, texts, batch_size=2)
    alone = [score_texts(model, tok, [t])[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(round(x, 4) for x in alone)) == len(texts)  # distinct scores: a mix-up would show


def test_second_judge_trains_on_questions_the_training_judge_never_saw(tmp_path, tiny_model_dir, data):
    """judge_split: a second reward model in OUT/judge, on the rl split's pairs; no question id is
    shared between the pairs it trained on and the training judge's. Overlapping splits are refused."""
    import pyarrow.parquet as pq

    from camelid.data.output import split_path
    from camelid.runfiles import JUDGE_DIR
    from camelid.train.reward import TRAIN_QUESTIONS

    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "rm", max_steps=2, save_steps=2, merge=False, judge_split="rl",
                   judge_steps=1)
    r = run(cfg)
    judge = tmp_path / "rm" / JUDGE_DIR
    assert r.train_split == "reward" and (judge / "adapter" / "adapter_config.json").is_file()
    assert json.loads((judge / "result.json").read_text())["train_split"] == "rl"
    assert (judge / "checkpoints" / "checkpoint-1").is_dir() and not (judge / "checkpoints" / "checkpoint-2").exists()
    assert (tmp_path / "rm" / "checkpoints" / "checkpoint-2").is_dir()  # judge_steps: the second judge's only
    ours, theirs = (json.loads((d / TRAIN_QUESTIONS).read_text()) for d in (tmp_path / "rm", judge))
    assert (ours["split"], theirs["split"]) == ("reward", "rl")
    assert ours["qids"] and theirs["qids"] and not set(ours["qids"]) & set(theirs["qids"])
    assert set(theirs["qids"]) <= set(pq.read_table(split_path(data, "rl")).column("qid").to_pylist())

    overlap = write_dataset(tmp_path / "overlap", n_pairs=8)
    rl = pq.read_table(split_path(overlap, "rl"))
    shared = pq.read_table(split_path(overlap, "reward")).column("qid")
    pq.write_table(rl.set_column(rl.schema.get_field_index("qid"), "qid", shared), split_path(overlap, "rl"))
    with pytest.raises(CamelidError, match="share 8 question"):
        run(replace(cfg, data=str(overlap), out=str(tmp_path / "o2")))
    with pytest.raises(CamelidError, match="judge_split must differ"):
        from camelid.config import build

        build(RewardConfig, {"judge_split": "reward"})
