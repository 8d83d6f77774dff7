"""`camelid pipeline` end to end on the tiny random Llama and a handful of generated questions:
every stage's outputs, the report with every plot, resume after an interrupted stage, skipping
complete stages, a changed config rerunning only what depends on it, --force, and --method
(DPO beside PPO, switching methods reruns neither)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from camelid import pipeline
from camelid.cli import main
from camelid.eval.report import PLOTS
from camelid.pipeline import PipelineConfig, parse_sets
from camelid.runfiles import STAGES, read_done

TOPICS = ("bread", "tomatoes", "python lists", "git branches", "cast iron", "roses", "sql joins", "compost")

# Tiny settings for every stage: a few optimizer steps, short texts.
PRESET = """
data: {splits: [0.25, 0.25, 0.25, 0.25], workers: 1, progress: false}
sft: {max_steps: 3, batch_size: 2, seq_length: 64, save_steps: 1, logging_steps: 1}
reward: {max_steps: 3, batch_size: 2, max_length: 160, save_steps: 1, logging_steps: 1, min_pairs: 1}
ppo: {steps: 3, batch_size: 2, mini_batch_size: 1, ppo_epochs: 1, min_new_tokens: 3, max_new_tokens: 5,
      save_steps: 1, samples_every: 1, forward_batch_size: 2, reward_batch_size: 4}
dpo: {max_steps: 2, batch_size: 2, max_length: 160, save_steps: 1, logging_steps: 1, min_pairs: 1, max_eval_samples: 4}
eval: {max_questions: 3, max_new_tokens: 5, batch_size: 8, answers_per_question: 2, bootstrap_resamples: 200}
"""


def write_dump(folder: Path) -> Path:
    """A Stack Exchange Posts.xml (BOM, escaped HTML) with 16 questions of 3 answers of distinct scores."""
    rows, pid = [], 1
    for i in range(16):
        topic = TOPICS[i % len(TOPICS)]
        q = pid
        rows.append(f'<row Id="{q}" PostTypeId="1" AcceptedAnswerId="{q + 1}" CreationDate="2020-01-0{1 + i % 9}T10:00:00.000" '
                    f'Score="5" Body="&lt;p&gt;How do I take care of {topic}, case {i}?&lt;/p&gt;" '
                    f'Title="Caring for {topic} {i}" Tags="&lt;{topic.replace(" ", "-")}&gt;" AnswerCount="3" />')
        for j, (score, text) in enumerate(((9, f"Here is a careful, complete answer about {topic}: do it step by step."),
                                           (2, f"Maybe try something with {topic}."), (-1, "No idea, search it."))):
            rows.append(f'<row Id="{q + 1 + j}" PostTypeId="2" ParentId="{q}" CreationDate="2020-02-01T10:00:00.000" '
                        f'Score="{score}" Body="&lt;p&gt;{text}&lt;/p&gt;" />')
        pid += 4
    folder.mkdir(parents=True)
    xml = '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n  ' + "\n  ".join(rows) + "\n</posts>\n"
    (folder / "Posts.xml").write_bytes(b"\xef\xbb\xbf" + xml.encode())
    return folder


@pytest.fixture()
def setup(tmp_path, tiny_model_dir):
    preset = tmp_path / "tiny-test.yaml"
    preset.write_text(PRESET)
    cfg = PipelineConfig(data=str(write_dump(tmp_path / "dump")), model=str(tiny_model_dir), out=str(tmp_path / "run"))
    return cfg, str(preset), tmp_path / "run"


def _finished(run: Path) -> dict[str, str]:
    return {s: (read_done(run / s) or {}).get("finished", "") for s in STAGES}


def test_pipeline_end_to_end_resume_skip_and_force(setup, monkeypatch, capsys):
    cfg, preset, run = setup
    # 1. PPO is interrupted at its second step (after its step-1 checkpoint), as by Ctrl-C.
    import camelid.train.ppo as ppo_mod

    real_step = ppo_mod.ppo_step

    def interrupted(step, *args, **kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(ppo_mod, "ppo_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, preset)
    assert all(read_done(run / s) for s in ("data", "sft", "reward"))
    assert read_done(run / "ppo") is None and not (run / "eval").exists() and not (run / "dpo").exists()
    before = _finished(run)

    # 2. The same command resumes: complete stages are skipped, PPO continues from its checkpoint.
    monkeypatch.setattr(ppo_mod, "ppo_step", real_step)
    res = pipeline.run(cfg, preset)
    err = capsys.readouterr().err  # stage lines are status lines
    assert res.ran == ("ppo", "eval") and "[4/5] ppo: resuming from its last checkpoint" in err
    assert "[3/5] reward: complete with the same config" in err and "[5/5] eval: done in" in err  # DPO not counted
    assert {k: v for k, v in _finished(run).items() if k in ("data", "sft", "reward")} == \
        {k: v for k, v in before.items() if k in ("data", "sft", "reward")}
    steps = [json.loads(x)["step"] for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()
             if "env/reward_mean" in json.loads(x)]
    assert steps == [1, 2, 3]

    # Every stage's outputs are there, with time and peak memory in its done marker.
    for path in ("data/stats.json", "sft/model/config.json", "reward/model/config.json", "reward/judge/model/config.json",
                 "ppo/model/config.json", "eval/result.json", "eval/samples.jsonl", "report/report.html",
                 "report/report.md"):
        assert (run / path).is_file(), path
    assert not (run / "dpo").exists()  # --method ppo (the default) leaves DPO out
    for s in ("data", "sft", "reward", "ppo", "eval"):
        done = read_done(run / s)
        assert done["seconds"] > 0 and done["peak_mb"] > 50 and done["config"]
    result = json.loads((run / "eval" / "result.json").read_text())
    assert set(result["judges"]) == {"training", "second"} and list(result["verdicts"]) == ["ppo_vs_sft"]
    assert result["judges"]["second"]["path"] == str(run / "reward" / "judge" / "model")
    html = (run / "report" / "report.html").read_text()
    assert set(re.findall(r"id='plot-(\w+)'", html)) == set(PLOTS) - {"dpo_curves"}
    assert "stage not run" not in html.lower() and "Not part of this run (--method ppo)." in html
    assert "PPO beats SFT on " in html and "of 3 questions" in html
    assert res.chat_model == run / "ppo" / "model"

    # 3. Nothing changed: nothing reruns. A changed eval setting reruns eval only.
    assert pipeline.run(cfg, preset).ran == ()
    assert pipeline.run(cfg, preset, parse_sets(["eval.max_questions=2"])).ran == ("eval",)
    assert json.loads((run / "eval" / "result.json").read_text())["questions"] == 2

    # 4. --force reward reruns reward and everything after it, from scratch.
    mid = _finished(run)
    capsys.readouterr()
    assert main(["pipeline", "--preset", preset, "--data", cfg.data, "--model", cfg.model, "--out", cfg.out,
                 "--force", "reward", "--set", "eval.max_questions=2"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    after = _finished(run)
    assert [s for s in STAGES if after[s] != mid[s]] == ["reward", "ppo", "eval"]
    assert "ppo: running" in captured.err and f"camelid chat --model {run / 'ppo' / 'model'}" in out and "report.html" in out

    # 5. --method both adds DPO beside PPO: only dpo and eval run; eval compares both with SFT.
    res = pipeline.run(replace(cfg, method="both"), preset, parse_sets(["eval.max_questions=2"]))
    assert res.ran == ("dpo", "eval")
    done = read_done(run / "dpo")
    assert done["seconds"] > 0 and done["peak_mb"] > 50 and (run / "dpo" / "model" / "config.json").is_file()
    result = json.loads((run / "eval" / "result.json").read_text())
    assert set(result["verdicts"]) == {"ppo_vs_sft", "dpo_vs_sft"} and set(result["kl"]) == {"ppo", "dpo"}
    assert set(result["comparisons"]["dpo_vs_sft"]) == {"training", "second"}
    md = (run / "report" / "report.md").read_text()
    assert re.search(r"\| dpo \| done \| \d+ s \| [\d,]+ MB \|", md) and "DPO beats SFT on " in md
    assert set(re.findall(r"id='plot-(\w+)'", (run / "report" / "report.html").read_text())) == set(PLOTS)

    # 6. --method dpo: DPO is complete, PPO is left out; only eval reruns; chat with DPO's model.
    res = pipeline.run(replace(cfg, method="dpo"), preset, parse_sets(["eval.max_questions=2"]))
    assert res.ran == ("eval",) and res.chat_model == run / "dpo" / "model"
    assert list(json.loads((run / "eval" / "result.json").read_text())["verdicts"]) == ["dpo_vs_sft"]


def test_pipeline_bad_input(tmp_path, capsys):
    assert main(["pipeline", "--force", "nonsense", "--out", str(tmp_path / "r")]) == 2
    assert main(["pipeline", "--set", "sft.max_steps", "--out", str(tmp_path / "r")]) == 2
    assert main(["pipeline", "--set", "sft.no_such_field=1", "--out", str(tmp_path / "r")]) == 2
    assert main(["pipeline", "--method", "grpo", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("camelid: error:") == 4 and "Traceback" not in err
    assert not (tmp_path / "r" / "data").exists()  # configs are checked before any stage runs


def test_input_fingerprint_follows_the_dump(tmp_path):
    dump = write_dump(tmp_path / "dump")
    before = pipeline.input_fingerprint(str(dump))
    assert pipeline.input_fingerprint(str(dump)) == before
    (dump / "Posts.xml").write_bytes((dump / "Posts.xml").read_bytes() + b"\n")
    assert pipeline.input_fingerprint(str(dump)) != before
    assert pipeline.input_fingerprint("sample") == pipeline.input_fingerprint("sample")


def test_one_rule_for_what_may_change_without_a_rerun():
    """A setting left out of a stage's config hash may also change on --resume, and the reverse."""
    from dataclasses import replace

    from camelid.config import to_dict
    from camelid.train.common import config_differences
    from camelid.train.ppo_config import PPOConfig

    run = Path("/runs/x")
    a = PPOConfig()
    for harmless in (dict(save_steps=7), dict(samples_every=9), dict(num_threads=1)):
        b = replace(a, **harmless)
        assert config_differences(a, b) == [], harmless
        assert pipeline._portable(to_dict(a), run) == pipeline._portable(to_dict(b), run), harmless
    b = replace(a, learning_rate=a.learning_rate * 2)
    assert config_differences(a, b) == ["learning_rate"]
    assert pipeline._portable(to_dict(a), run) != pipeline._portable(to_dict(b), run)


def test_one_seed_reaches_every_stage_but_the_split(tmp_path):
    """`--seed` sets training, sampling and evaluation seeds; the data split stays the preset's (every
    seed is judged on the same questions), and an explicit --set still wins."""
    preset = tmp_path / "p.yaml"
    preset.write_text(PRESET)
    base = pipeline.stage_configs(PipelineConfig(out=str(tmp_path / "r")), str(preset), {})
    seeded = pipeline.stage_configs(PipelineConfig(out=str(tmp_path / "r"), seed=7), str(preset),
                                    {"eval": {"seed": 3}})
    assert {n: seeded[n].seed for n in ("sft", "reward", "ppo", "dpo", "eval")} == \
        {"sft": 7, "reward": 7, "ppo": 7, "dpo": 7, "eval": 3}
    assert seeded["data"].seed == base["data"].seed
    assert base["sft"].seed != 7


def test_every_stage_is_run_cfg_resume_overwrite():
    """Each stage's entry point is `run(cfg, *, resume=False, overwrite=False)` in its own module
    (PPO adds `reward_fn` after them), which is what the pipeline calls."""
    import inspect

    for name in pipeline.STAGES:
        params = list(inspect.signature(pipeline.stage_function(name)).parameters.values())
        assert [p.name for p in params[:3]] == ["cfg", "resume", "overwrite"], name
        assert all(p.kind is p.KEYWORD_ONLY and p.default is False for p in params[1:3]), name
        assert all(p.default is not p.empty for p in params[1:]), name
