"""`camelid report`: a run folder of fabricated but realistic stage outputs -> HTML + Markdown.

The test writes the files each stage writes (layout: camelid.pipeline's docstring), with
curves shaped like real runs, then checks the report holds every plot and table; a partial run
says which stages did not run.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
from pathlib import Path

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.eval.report import PLOTS, build_report
from camelid.eval.stats import mean_std, repeated_ngram_share, wilson_interval, win_rate


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _done(stage_dir: Path, seconds: float, peak_mb: float, config: dict, result: dict | None = None) -> None:
    (stage_dir / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    marker = {"stage": stage_dir.name, "config_hash": "0" * 16, "config": config, "seconds": seconds,
              "peak_mb": peak_mb, "peak_kind": "peak RSS", "finished": "2026-01-01T00:00:00", "result": result}
    (stage_dir / "done.json").write_text(json.dumps(marker))


def fabricate_run(run: Path, stages: tuple[str, ...] = ("data", "sft", "reward", "ppo", "dpo", "eval"),
                  hacked: bool = False) -> None:
    """Every stage's files; `hacked`: the second judge scores PPO below SFT where the training judge scores it above."""
    rng = random.Random(0)
    if "data" in stages:
        stats = {"questions_kept": 173, "answers_kept": 556, "pairs": 640,
                 "splits": {"finetune": {"questions": 52, "pairs": 190}, "evaluation": {"questions": 17, "pairs": 60}}}
        (run / "data").mkdir(parents=True)
        (run / "data" / "stats.json").write_text(json.dumps(stats))
        _done(run / "data", 4.2, 310.0, {"input": "sample"}, {"out": str(run / "data"), "stats": stats})
    if "sft" in stages:
        _jsonl(run / "sft" / "metrics.jsonl", [{"step": s, "sft/loss": 2.6 * math.exp(-s / 40) + 1.1 + rng.gauss(0, .03)}
                                               for s in range(5, 105, 5)] + [{"step": 100, "sft/eval_loss": 1.42}])
        result = {"steps": 100, "train_loss": 1.6, "eval_loss": 1.42, "perplexity": 4.14, "tokens_per_s": 850.0}
        (run / "sft" / "result.json").write_text(json.dumps(result))
        _done(run / "sft", 210.0, 1650.0, {"seq_length": 256, "batch_size": 4}, result)
    if "reward" in stages:
        _jsonl(run / "reward" / "metrics.jsonl", [{"step": s, "reward/loss": 0.69 * math.exp(-s / 60) + 0.3}
                                                  for s in range(5, 65, 5)])
        result = {"steps": 60, "train_pairs": 190, "eval": {"pairs": 60, "accuracy": 0.78, "mean_margin": 0.9,
                                                            "loss": 0.45, "longer_wins_accuracy": 0.62}}
        (run / "reward" / "result.json").write_text(json.dumps(result))
        _done(run / "reward", 120.0, 1400.0, {"max_length": 512}, result)
        judge = {"steps": 60, "train_split": "rl", "train_pairs": 150,
                 "eval": {"pairs": 60, "accuracy": 0.71, "mean_margin": 0.7, "loss": 0.5, "longer_wins_accuracy": 0.62}}
        (run / "reward" / "judge").mkdir()
        (run / "reward" / "judge" / "result.json").write_text(json.dumps(judge))
    if "ppo" in stages:
        rows = [{"step": s, "env/reward_mean": -0.5 + s * 0.04 + rng.gauss(0, .05), "env/reward_std": 0.6,
                 "objective/kl": 0.15 * s, "objective/kl_coef": 0.2 * (1 - 0.001 * s),
                 "objective/entropy": 40 - 0.3 * s, "ppo/loss/policy": rng.gauss(0, .02)} for s in range(1, 31)]
        _jsonl(run / "ppo" / "metrics.jsonl", rows)
        _jsonl(run / "ppo" / "samples.jsonl", [{"step": s, "query": "Question: q\n\nAnswer: ", "response": "r",
                                                "score": rng.gauss(-0.5 + s * 0.04, 0.6), "kl": 0.1}
                                               for s in (1, 10, 20, 30) for _ in range(8)])
        _done(run / "ppo", 400.0, 2100.0, {"kl_target": 6.0, "steps": 30})
    if "dpo" in stages:
        _jsonl(run / "dpo" / "metrics.jsonl", [{"step": s, "dpo/loss": 0.69 * math.exp(-s / 30), "dpo/rewards/accuracies": 0.5 + s / 100,
                                                "dpo/rewards/margins": s / 20} for s in range(1, 31)])
        result = {"steps": 30, "train_pairs": 190, "truncated_train_pairs": 40, "train_loss": 0.5, "eval_pairs": 60,
                  "eval": {"loss": 0.55, "reward_accuracy": 0.66, "reward_margin": 0.4}, "pairs_per_s": 3.0}
        (run / "dpo" / "result.json").write_text(json.dumps(result))
        _done(run / "dpo", 300.0, 1900.0, {"beta": 0.1}, result)
    if "eval" in stages:
        _fabricate_eval(run, rng, hacked)


def _fabricate_eval(run: Path, rng: random.Random, hacked: bool) -> None:
    """17 questions x 2 answers (answer-major) from 4 models, scored by two judges, compared as `camelid eval` does."""
    from camelid.eval.compare import compare, verdict

    n, k = 17, 2
    shift = {"base": -1.0, "sft": 0.0, "ppo": 0.6, "dpo": 0.4}
    samples = []
    for j in range(k):
        for i in range(n):
            row = {"index": i, "answer": j, "question": f"How do I do thing {i}? <b>|pipes|</b>"}
            for m, d in shift.items():
                row[m] = f"{m} answer {i}.{j}" + ("\nwith a second line" if m == "ppo" else "")
                row[f"reward_{m}"] = rng.gauss(d, .5)
                row[f"judge_{m}"] = rng.gauss(-d if hacked and m == "ppo" else d / 2, .5)
                row[f"length_{m}"] = 40 + rng.randrange(10)
            samples.append(row)
    _jsonl(run / "eval" / "samples.jsonl", samples)
    col = lambda key: [r[key] for r in samples]
    comparisons = {f"{a}_vs_{b}": {judge: compare(col(f"{key}_{a}"), col(f"{key}_{b}"), col(f"length_{a}"),
                                                  col(f"length_{b}"), n, 500).to_dict()
                                   for judge, key in (("training", "reward"), ("second", "judge"))}
                   for a, b in (("ppo", "sft"), ("dpo", "sft"), ("sft", "base"))}
    verdicts = {name: verdict(name.split("_vs_")[0], "sft", c["training"], c["second"])
                for name, c in comparisons.items() if name.endswith("_vs_sft")}
    models = {m: {"path": f"/x/{m}", "reward_mean": mean_std(col(f"reward_{m}"))[0], "reward_std": 0.5,
                  "reward": {"training": {"mean": mean_std(col(f"reward_{m}"))[0], "std": 0.5},
                             "second": {"mean": mean_std(col(f"judge_{m}"))[0], "std": 0.5}},
                  "length_mean": 44.0, "rep4": 0.02} for m in shift}
    pairs = {"pairs": 60, "accuracy": 0.78, "longer_wins_accuracy": 0.62, "mean_margin": 0.9}
    result = {"questions": n, "answers_per_question": k,
              "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 0}, "models": models,
              "comparisons": comparisons, "verdicts": verdicts,
              "judges": {"training": {"path": "/x/reward", "pairs": pairs},
                         "second": {"path": "/x/reward/judge", "pairs": {**pairs, "accuracy": 0.71}}},
              "kl": {"ppo": {"per_token": 0.05, "per_answer": 2.1, "reference": "/x/sft"},
                     "dpo": {"per_token": 0.03, "per_answer": 1.4, "reference": "/x/sft"}}}
    (run / "eval" / "result.json").write_text(json.dumps(result))
    _done(run / "eval", 90.0, 1300.0, {"num_questions": n}, result)


def _images(html: str) -> dict[str, bytes]:
    return {m.group(1): base64.b64decode(m.group(2))
            for m in re.finditer(r"id='plot-(\w+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)}


def test_full_run_report_has_every_plot_and_table(tmp_path):
    run = tmp_path / "run"
    fabricate_run(run)
    res = build_report(run)
    html = res.html.read_text()
    images = _images(html)
    assert set(images) == set(PLOTS) and all(png.startswith(b"\x89PNG") for png in images.values())
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    assert all(res.plots.values())
    for name in PLOTS:
        assert (run / "report" / "plots" / f"{name}.png").is_file()
    md = res.markdown.read_text()
    for text in ("Quality bar", "PASS", "Resolved configs", "max_length: 512", "3.5 min", "2,100 MB",
                 "ppo vs sft", "dpo vs sft", "Sample answers", "173 questions", "second judge", "similar-length"):
        assert text in md, text
    # Cell text is escaped in HTML and pipes escaped in Markdown tables.
    assert "&lt;b&gt;|pipes|&lt;/b&gt;" in html and "<b>\\|pipes\\|</b>" in md
    # The quality bar: each judge above the length baseline; KL 2.1 <= 2 x 6 passes; DPO's KL is shown, not judged.
    assert re.search(r"training judge's accuracy above the longer-answer baseline \| 0\.780 vs 0\.620 .*\| PASS", md)
    assert re.search(r"second judge's accuracy above the longer-answer baseline \| 0\.710 vs 0\.620 .*\| PASS", md)
    assert re.search(r"PPO's KL to the reference bounded .*\| PASS", md) and re.search(r"DPO's KL .*\| – \|", md)
    # The verdict is stated with its interval and the number of questions, never a bare point estimate.
    row = next(line for line in md.splitlines() if line.startswith("| PPO beats SFT"))
    assert re.search(r"PPO beats SFT on \d+ of 17 questions: win rate 0\.\d\d \(paired 95% CI 0\.\d\d-[01]\.\d\d; "
                     r"sign test p = [0-9.e-]+\), training judge; PPO beats SFT on \d+ of 17 questions.*second judge \| PASS", row)
    assert "judges disagree" not in md


def test_judges_disagreeing_is_said_in_one_line(tmp_path):
    run = tmp_path / "run"
    fabricate_run(run, hacked=True)
    md = build_report(run).markdown.read_text()
    assert "PPO vs SFT: the judges disagree: possible reward hacking" in md.splitlines()
    row = next(line for line in md.splitlines() if line.startswith("| PPO beats SFT"))
    assert row.endswith("| FAIL |")


def test_partial_run_says_stage_not_run(tmp_path, capsys):
    run = tmp_path / "run"
    fabricate_run(run, stages=("data", "sft"))
    (run / "reward").mkdir()
    _jsonl(run / "reward" / "metrics.jsonl", [{"step": 5, "reward/loss": 0.6}])  # interrupted: no done.json
    assert main(["report", str(run)]) == 0
    assert "no data yet for: ppo_curves, dpo_curves, reward_hist" in capsys.readouterr().out
    md = (run / "report" / "report.md").read_text()
    assert "Stage not run" in md and "incomplete (no done marker)" in md
    assert "Not measured: the evaluation stage has not run." in md
    assert set(_images((run / "report" / "report.html").read_text())) == {"sft_loss", "reward_accuracy"}


def test_report_bad_input(tmp_path):
    with pytest.raises(CamelidError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(CamelidError, match="holds no stage output"):
        build_report(tmp_path)


def test_wilson_interval_by_hand():
    # 8 wins of 10, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.71674,
    # half = 1.96/1.38416 * sqrt(0.016 + 0.0096040) = 0.22664 -> [0.4901, 0.9434] (Wilson 1927).
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-3), pytest.approx(0.9433, abs=1e-3))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    w = win_rate([1, 2, 3, 0], [0, 2, 1, 1])  # win, tie, win, loss -> (2 + 0.5) / 4
    assert (w.wins, w.ties, w.losses, w.rate) == (2, 1, 1, 0.625)


def test_repeated_ngram_share():
    assert repeated_ngram_share(list("abcdefg"), n=2) == 0.0
    assert repeated_ngram_share(["a", "b"] * 4, n=2) == pytest.approx(1 - 2 / 7)  # ab, ba repeat
    assert repeated_ngram_share(["a"], n=4) == 0.0
