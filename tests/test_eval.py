"""`camelid eval` on tiny random models: files, same-seed answers, KL, win rates, pair accuracy, bad input."""

from __future__ import annotations

import json
import math

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


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """base (the tiny model), sft and ppo (perturbed copies), a tiny random reward model."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("eval-models")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    cfg.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(cfg)
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "rm")
    return {"base": tiny_model_dir, "sft": _perturbed(tiny_model_dir, root / "sft", 1),
            "ppo": _perturbed(tiny_model_dir, root / "ppo", 2), "rm": root / "rm",
            "data": write_dataset(root / "data", n_pairs=6)}


def _cfg(models, out, **kw) -> EvalConfig:
    base = dict(data=str(models["data"]), base_model=str(models["base"]), sft_model=str(models["sft"]),
                ppo_model=str(models["ppo"]), reward_model=str(models["rm"]), out=str(out), max_questions=4,
                max_new_tokens=6, batch_size=4, temperature=1.0, top_p=1.0)
    return EvalConfig(**{**base, **kw})


def test_eval_writes_results_and_samples(models, tmp_path):
    from transformers import AutoTokenizer

    from camelid.train.common import load_split, qa_text

    res = run(_cfg(models, tmp_path / "eval"))
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert (tmp_path / "eval" / "config.yaml").is_file()
    samples = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert result["questions"] == len(samples) == 4
    assert set(result["models"]) == {"base", "sft", "ppo"}
    for row in samples:
        for m in ("base", "sft", "ppo"):
            assert isinstance(row[m], str) and math.isfinite(row[f"reward_{m}"]) and 0 <= row[f"length_{m}"] <= 6
    for key in ("ppo_vs_sft", "sft_vs_base", "ppo_vs_base"):
        w = result["win_rates"][key]
        assert w["n"] == 4 and w["wins"] + w["ties"] + w["losses"] == 4
        assert w["ci_low"] <= w["rate"] <= w["ci_high"]
    # The win rate is recomputed from the per-question rewards written beside it.
    wins = sum(r["reward_ppo"] > r["reward_sft"] for r in samples) + sum(r["reward_ppo"] == r["reward_sft"] for r in samples) / 2
    assert result["win_rates"]["ppo_vs_sft"]["rate"] == pytest.approx(wins / 4)
    assert math.isfinite(result["kl"]["per_answer"]) and result["kl"]["per_answer"] != 0
    # Pair accuracy beside the longer-answer baseline, counted here independently.
    ds = load_split(str(models["data"]), "evaluation", ("question", "response_j", "response_k"))
    tok = AutoTokenizer.from_pretrained(models["rm"])
    longer = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in
              ((len(tok(qa_text(q, j))["input_ids"]), len(tok(qa_text(q, k))["input_ids"]))
               for q, j, k in zip(ds["question"], ds["response_j"], ds["response_k"]))]
    assert result["rm_pairs"]["pairs"] == 6
    assert result["rm_pairs"]["longer_wins_accuracy"] == pytest.approx(sum(longer) / len(longer))
    assert res.result["config"]["max_questions"] == 4


def test_same_model_same_seed_same_answers_and_zero_kl(models, tmp_path):
    # SFT == base and PPO == its reference: identical answers (same sampling, same seeds), a 50%
    # win rate of all ties, and a KL of exactly zero.
    run(_cfg(models, tmp_path / "eval", sft_model=str(models["base"]), ppo_model=str(models["base"])))
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    samples = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(r["base"] == r["sft"] == r["ppo"] for r in samples)
    assert result["win_rates"]["sft_vs_base"]["ties"] == 4 and result["win_rates"]["sft_vs_base"]["rate"] == 0.5
    assert result["kl"]["per_answer"] == pytest.approx(0.0, abs=1e-6)


def test_several_answers_per_question(models, tmp_path):
    """--answers-per-question 2: each question answered twice with different seeds, every model
    on the same seeds; the win rate counts every answer; the first answers equal a 1-answer run."""
    run(_cfg(models, tmp_path / "one", max_questions=3))
    run(_cfg(models, tmp_path / "two", max_questions=3, answers_per_question=2))
    one = [json.loads(x) for x in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["questions"] == 3 and result["answers_per_question"] == 2 and len(two) == 6
    assert [r["question"] for r in two] == [r["question"] for r in one] * 2
    assert [r["ppo"] for r in two[:3]] == [r["ppo"] for r in one]
    assert any(a["ppo"] != b["ppo"] for a, b in zip(two[:3], two[3:]))  # a second draw, not a copy
    assert result["win_rates"]["ppo_vs_sft"]["n"] == 6 and result["kl"]["answers"] == 6


def test_eval_cli_run_folder_and_bad_input(models, tmp_path, capsys):
    # Only the base model, through the CLI: no PPO -> no KL, no win rates involving it.
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(models["data"]), "--base-model", str(models["base"]), "--sft-model", "",
                 "--ppo-model", "", "--reward-model", str(models["rm"]), "--out", str(out), "--max-questions", "3",
                 "--max-new-tokens", "4"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["models"]) == {"base"} and result["kl"] is None and result["win_rates"] == {}
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "nothing-here"), "--max-questions", "2"]) == 1
    assert main(["eval", "--data", str(models["data"]), "--base-model", str(models["base"]),
                 "--reward-model", str(tmp_path / "no-rm"), "--sft-model", "", "--ppo-model", ""]) == 1
    assert main(["eval", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("camelid: error:") == 3 and "Traceback" not in err
    with pytest.raises(CamelidError, match="not a reward model"):
        run(_cfg(models, tmp_path / "e2", reward_model=str(models["base"])))
