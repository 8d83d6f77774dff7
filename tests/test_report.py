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


def fabricate_run(run: Path, stages: tuple[str, ...] = ("data", "sft", "reward", "ppo", "eval")) -> None:
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
    if "ppo" in stages:
        rows = [{"step": s, "env/reward_mean": -0.5 + s * 0.04 + rng.gauss(0, .05), "env/reward_std": 0.6,
                 "objective/kl": 0.15 * s, "objective/kl_coef": 0.2 * (1 - 0.001 * s),
                 "objective/entropy": 40 - 0.3 * s, "ppo/loss/policy": rng.gauss(0, .02)} for s in range(1, 31)]
        _jsonl(run / "ppo" / "metrics.jsonl", rows)
        _jsonl(run / "ppo" / "samples.jsonl", [{"step": s, "query": "Question: q\n\nAnswer: ", "response": "r",
                                                "score": rng.gauss(-0.5 + s * 0.04, 0.6), "kl": 0.1}
                                               for s in (1, 10, 20, 30) for _ in range(8)])
        _done(run / "ppo", 400.0, 2100.0, {"kl_target": 6.0, "steps": 30})
    if "eval" in stages:
        samples = [{"qid": i, "question": f"How do I do thing {i}? <b>|pipes|</b>", "base": f"base answer {i}",
                    "sft": f"sft answer {i}", "ppo": f"ppo answer {i}\nwith a second line",
                    "reward_base": rng.gauss(-1, .5), "reward_sft": rng.gauss(0, .5), "reward_ppo": rng.gauss(.6, .5)}
                   for i in range(17)]
        _jsonl(run / "eval" / "samples.jsonl", samples)
        model = {m: {"path": f"/x/{m}", "reward_mean": mean_std([s[f"reward_{m}"] for s in samples])[0],
                     "reward_std": 0.5, "length_mean": 40.0, "rep4": 0.02} for m in ("base", "sft", "ppo")}
        result = {"questions": 17, "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 0},
                  "models": model,
                  "win_rates": {"ppo_vs_sft": win_rate([s["reward_ppo"] for s in samples],
                                                       [s["reward_sft"] for s in samples]).to_dict(),
                                "sft_vs_base": win_rate([s["reward_sft"] for s in samples],
                                                        [s["reward_base"] for s in samples]).to_dict()},
                  "kl": {"per_token": 0.05, "per_answer": 2.1, "reference": "/x/sft"},
                  "rm_pairs": {"pairs": 60, "accuracy": 0.78, "longer_wins_accuracy": 0.62, "mean_margin": 0.9}}
        (run / "eval" / "result.json").write_text(json.dumps(result))
        _done(run / "eval", 90.0, 1300.0, {"num_questions": 17}, result)


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
                 "ppo vs sft", "Sample answers", "173 questions"):
        assert text in md, text
    # Cell text is escaped in HTML and pipes escaped in Markdown tables.
    assert "&lt;b&gt;|pipes|&lt;/b&gt;" in html and "<b>\\|pipes\\|</b>" in md
    # The quality bar: 0.78 > 0.62 passes; KL 2.1 <= 2 x 6 passes.
    assert re.search(r"longer-answer baseline \| 0\.780 vs 0\.620 \| PASS", md)
    assert re.search(r"KL to the reference bounded .*\| PASS", md)


def test_partial_run_says_stage_not_run(tmp_path, capsys):
    run = tmp_path / "run"
    fabricate_run(run, stages=("data", "sft"))
    (run / "reward").mkdir()
    _jsonl(run / "reward" / "metrics.jsonl", [{"step": 5, "reward/loss": 0.6}])  # interrupted: no done.json
    assert main(["report", str(run)]) == 0
    assert "no data yet for: ppo_curves, reward_hist" in capsys.readouterr().out
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
