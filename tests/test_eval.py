"""`camelid eval` on tiny random models: files, each model's own seeds, KL, paired comparisons under
two judges, verdicts, pair accuracy, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.eval.evaluate import EvalConfig, run
from train_data import write_dataset

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)


def _perturbed(src, dst, seed: float, scale: float = 0.05):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _reward_model(tiny_model_dir, dst, seed: int):
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    cfg.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(seed)
    LlamaForSequenceClassification(cfg).save_pretrained(dst)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """base (the tiny model), sft, ppo and dpo (perturbed copies), two tiny random reward models."""
    root = tmp_path_factory.mktemp("eval-models")
    return {"base": tiny_model_dir, "sft": _perturbed(tiny_model_dir, root / "sft", 1),
            "ppo": _perturbed(tiny_model_dir, root / "ppo", 2), "dpo": _perturbed(tiny_model_dir, root / "dpo", 3),
            "rm": _reward_model(tiny_model_dir, root / "rm", 1), "judge": _reward_model(tiny_model_dir, root / "judge", 2),
            "data": write_dataset(root / "data", n_pairs=6)}


def _cfg(models, out, **kw) -> EvalConfig:
    base = dict(data=str(models["data"]), base_model=str(models["base"]), sft_model=str(models["sft"]),
                ppo_model=str(models["ppo"]), reward_model=str(models["rm"]), judge_model=str(models["judge"]),
                out=str(out), max_questions=4, answers_per_question=2, max_new_tokens=6, batch_size=8,
                temperature=1.0, top_p=1.0, bootstrap_resamples=200)
    return EvalConfig(**{**base, **kw})


def _read(out):
    return (json.loads((out / "result.json").read_text()),
            [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()])


def test_eval_writes_results_samples_and_a_paired_verdict(models, tmp_path):
    from transformers import AutoTokenizer

    from camelid.eval.compare import per_question_means
    from camelid.qa import load_split, qa_text

    res = run(_cfg(models, tmp_path / "eval", dpo_model=str(models["dpo"])))
    result, samples = _read(tmp_path / "eval")
    assert (tmp_path / "eval" / "config.yaml").is_file()
    assert result["questions"] == 4 and result["answers_per_question"] == 2 and len(samples) == 8
    assert [(r["index"], r["answer"]) for r in samples] == [(i, j) for j in range(2) for i in range(4)]
    assert set(result["models"]) == {"base", "sft", "ppo", "dpo"}
    for row in samples:
        for m in ("base", "sft", "ppo", "dpo"):
            assert isinstance(row[m], str) and 0 <= row[f"length_{m}"] <= 6
            assert math.isfinite(row[f"reward_{m}"]) and math.isfinite(row[f"judge_{m}"])
    assert set(result["comparisons"]) == {"ppo_vs_sft", "dpo_vs_sft", "sft_vs_base", "ppo_vs_base", "dpo_vs_base",
                                          "dpo_vs_ppo"}
    # The per-question win rate under each judge, recomputed from the scores written beside it.
    for judge, key in (("training", "reward"), ("second", "judge")):
        c = result["comparisons"]["ppo_vs_sft"][judge]
        a = per_question_means([r[f"{key}_ppo"] for r in samples], 4)
        b = per_question_means([r[f"{key}_sft"] for r in samples], 4)
        assert c["questions"] == 4 and (c["wins"], c["losses"]) == (sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b)))
        assert c["rate"] == pytest.approx((c["wins"] + c["ties"] / 2) / 4) and c["ci_low"] <= c["rate"] <= c["ci_high"]
        assert 0 <= c["sign_p"] <= 1 and c["answer_pairs"] == 8 and c["similar_pairs"] <= 8
    # Verdicts for PPO and DPO against SFT, stated with the interval and the number of questions.
    for m in ("ppo", "dpo"):
        v = result["verdicts"][f"{m}_vs_sft"]
        assert v["lines"][0].startswith(f"{m.upper()} beats SFT on ") and "of 4 questions" in v["lines"][0]
        assert "paired 95% CI" in v["lines"][0] and v["lines"][1].endswith("second judge")
        assert v["passed"] == (v["training_passed"] and v["second_passed"])
        assert math.isfinite(result["kl"][m]["per_answer"]) and result["kl"][m]["per_answer"] != 0
    # Each judge's pair accuracy beside the longer-answer baseline, counted here independently.
    ds = load_split(str(models["data"]), "evaluation", ("question", "response_j", "response_k"))
    tok = AutoTokenizer.from_pretrained(models["rm"])
    longer = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in
              ((len(tok(qa_text(q, j))["input_ids"]), len(tok(qa_text(q, k))["input_ids"]))
               for q, j, k in zip(ds["question"], ds["response_j"], ds["response_k"]))]
    for judge in ("training", "second"):
        p = result["judges"][judge]["pairs"]
        assert p["pairs"] == 6 and p["longer_wins_accuracy"] == pytest.approx(sum(longer) / len(longer))
    assert result["judges"]["training"]["pairs"]["mean_margin"] != result["judges"]["second"]["pairs"]["mean_margin"]
    assert result["judges"]["second"]["path"] == str(models["judge"])
    assert res.result["config"]["max_questions"] == 4


def test_long_questions_are_cut_so_prompt_and_answer_fit_the_judges(models, tmp_path):
    """A held-out question whose prompt would leave no room for an answer within max_length is cut
    at its end (as the pair stages cut it); the others are kept whole; the report counts them."""
    from transformers import AutoTokenizer

    from camelid.eval.evaluate import fit_questions, held_out_questions
    from camelid.qa import qa_text

    tok = AutoTokenizer.from_pretrained(models["sft"])
    cfg = _cfg(models, tmp_path / "cut", max_length=24, max_new_tokens=6)
    questions = held_out_questions(cfg) + ["word " * 200]
    fitted, cut = fit_questions(questions, cfg, str(models["sft"]))
    lengths = [len(tok(qa_text(q))["input_ids"]) for q in questions]
    assert cut == sum(n > 18 for n in lengths) >= 1
    for q, f, n in zip(questions, fitted, lengths):
        assert len(tok(qa_text(f))["input_ids"]) <= 18
        assert f == q if n <= 18 else q.startswith(f) and len(f) < len(q)
    run(replace(cfg, max_length=24))
    result, samples = _read(tmp_path / "cut")
    assert result["questions_cut"] == sum(n > 18 for n in lengths[: result["questions"]])
    assert {r["question"] for r in samples} == set(fitted[: result["questions"]])
    with pytest.raises(CamelidError, match="no room for a question"):
        fit_questions(questions, replace(cfg, max_length=6), str(models["sft"]))


def test_each_model_samples_with_its_own_seeds(models, tmp_path):
    """SFT == base and PPO == its reference: different answers (each model its own seeds), the
    same answers again on a rerun, and a KL of zero (up to float rounding: PPO's log-probs come
    from the states its answers were sampled from, the reference's from a teacher-forced pass)."""
    cfg = _cfg(models, tmp_path / "a", sft_model=str(models["base"]), ppo_model=str(models["base"]))
    run(cfg)
    run(replace(cfg, out=str(tmp_path / "b")))
    (result, samples), (_, again) = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert samples == again
    assert any(r["base"] != r["sft"] for r in samples) and any(r["sft"] != r["ppo"] for r in samples)
    assert result["kl"]["ppo"]["per_answer"] == pytest.approx(0.0, abs=2e-3)


def test_several_answers_per_question(models, tmp_path):
    """Each question answered k times with different seeds; the first answers equal a 1-answer run;
    the comparison counts questions, its length view answers."""
    run(_cfg(models, tmp_path / "one", max_questions=3, answers_per_question=1))
    run(_cfg(models, tmp_path / "three", max_questions=3, answers_per_question=3))
    (_, one), (result, three) = _read(tmp_path / "one"), _read(tmp_path / "three")
    assert result["questions"] == 3 and result["answers_per_question"] == 3 and len(three) == 9
    assert [r["question"] for r in three] == [r["question"] for r in one] * 3
    assert [r["ppo"] for r in three[:3]] == [r["ppo"] for r in one]
    assert any(a["ppo"] != b["ppo"] for a, b in zip(three[:3], three[3:6]))  # a second draw, not a copy
    c = result["comparisons"]["ppo_vs_sft"]["training"]
    assert c["questions"] == 3 and c["answer_pairs"] == 9 and result["kl"]["ppo"]["answers"] == 9


def test_eval_cli_run_folder_and_bad_input(models, tmp_path, capsys):
    # Only the base model, through the CLI: no PPO -> no KL, no comparisons, no verdict.
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(models["data"]), "--base-model", str(models["base"]), "--sft-model", "",
                 "--ppo-model", "", "--reward-model", str(models["rm"]), "--out", str(out), "--max-questions", "3",
                 "--max-new-tokens", "4"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["models"]) == {"base"} and result["kl"] == {} and result["comparisons"] == {}
    assert result["answers_per_question"] == 4 and set(result["judges"]) == {"training"}
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "nothing-here"), "--max-questions", "2"]) == 1
    assert main(["eval", "--data", str(models["data"]), "--base-model", str(models["base"]),
                 "--reward-model", str(tmp_path / "no-rm"), "--sft-model", "", "--ppo-model", ""]) == 1
    assert main(["eval", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("camelid: error:") == 3 and "Traceback" not in err
    with pytest.raises(CamelidError, match="not a reward model"):
        run(_cfg(models, tmp_path / "e2", reward_model=str(models["base"])))
    with pytest.raises(CamelidError, match="not a reward model"):
        run(_cfg(models, tmp_path / "e3", judge_model=str(models["sft"])))


def test_shared_prompt_passes_equal_the_full_passes(models):
    """The prompt-once forward passes give what a full pass over each text gives: a reward model's
    score (`score_texts`) and a causal LM's teacher-forced log-probability of each answer, for
    answers of different lengths to a few prompts, in batches that split a prompt's answers."""
    import torch

    from camelid.eval.evaluate import answer_logprobs
    from camelid.train.prefix import (
        continuation_hidden,
        logprobs_shared,
        score_texts_shared,
    )
    from camelid.models.load import load_for_inference
    from camelid.qa import qa_text
    from camelid.train.ppo_batch import pack, response_logprobs
    from camelid.train.reward import load_reward_model, score_texts

    rm, tok = load_reward_model(str(models["rm"]), "float32")
    groups = [[qa_text("How do I boil an egg?", a) for a in ("In water.", "Put it in boiling water for nine minutes.", "Fry it")],
              [qa_text("Why is the sky blue?", a) for a in ("Rayleigh scattering of sunlight.", "Because")]]
    shared = score_texts_shared(rm, tok, groups, batch_size=2)
    full = [score_texts(rm, tok, g) for g in groups]
    torch.testing.assert_close(torch.tensor([x for g in shared for x in g]), torch.tensor([x for g in full for x in g]), atol=1e-4, rtol=1e-4)

    lm, ltok, _ = load_for_inference(str(models["sft"]), device="cpu", dtype="float32")
    prompts = [ltok(qa_text(q))["input_ids"] for q in ("How do I boil an egg?", "Why is the sky blue?", "How do I boil an egg?")]
    responses = [ltok(" In water for nine minutes.")["input_ids"], ltok(" Scattering")["input_ids"], ltok(" Fry")["input_ids"]]
    got = logprobs_shared(lm, prompts, responses, ltok.eos_token_id, batch_size=2)
    with torch.no_grad():
        want = (response_logprobs(lm, pack(prompts, responses, 0, torch.device("cpu")))
                * pack(prompts, responses, 0, torch.device("cpu")).mask).sum(1).tolist()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)
    answers = [{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, responses)]
    cfg = EvalConfig(data=str(models["data"]), reward_model=str(models["rm"]), dtype="float32", device="cpu", batch_size=2)
    torch.testing.assert_close(torch.tensor(answer_logprobs(str(models["sft"]), answers, cfg)), torch.tensor(want), atol=1e-4, rtol=1e-4)
    # Row t predicts continuation token t; the last row reads the whole text.
    hidden = continuation_hidden(lm, prompts[:1], responses[:1], ltok.eos_token_id, batch_size=1)[0]
    assert hidden.shape == (len(responses[0]) + 1, lm.config.hidden_size)


def test_a_judges_recorded_accuracy_is_reused_only_for_the_same_pairs(models, tmp_path):
    """A reward run folder whose result.json measured the accuracy on the pairs eval would read
    (same data, split, max_length, pair count, seed) is not scored again; any difference is."""
    import shutil

    import yaml

    from camelid.eval.evaluate import pair_accuracy
    from camelid.train.reward import load_reward_model

    run_dir = tmp_path / "reward"
    shutil.copytree(models["rm"], run_dir / "model")
    trained = {"data": str(models["data"]), "eval_split": "evaluation", "max_length": 512, "max_eval_samples": 200,
               "seed": 0, "max_prompt_length": 0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(trained))
    recorded = {"pairs": 5, "accuracy": 0.6, "mean_margin": 0.1, "loss": 0.6, "longer_wins_accuracy": 0.4}
    (run_dir / "result.json").write_text(json.dumps({"eval": recorded, "dropped_eval_pairs": 1}))
    rm, tok = load_reward_model(str(run_dir / "model"), "float32")
    cfg = EvalConfig(data=str(models["data"]), reward_model=str(run_dir), max_pairs=200, max_length=512)
    got = pair_accuracy(rm, tok, cfg, run_dir / "model")
    assert got["accuracy"] == 0.6 and got["pairs"] == 5 and got["from"].endswith("result.json")
    scored = pair_accuracy(rm, tok, replace(cfg, max_pairs=3), run_dir / "model")
    assert "from" not in scored and scored["pairs"] == 3
    assert "from" not in pair_accuracy(rm, tok, replace(cfg, seed=1), run_dir / "model")
