"""Evaluation of a run (base vs SFT vs PPO / DPO answers scored by two judges) and the HTML report.

- `camelid.eval.evaluate`: `run(EvalConfig) -> EvalResult`, writes `eval/result.json` + samples;
- `camelid.eval.compare`: per-question paired comparison (bootstrap interval, sign test,
  length-controlled view) and the verdict;
- `camelid.eval.stats`: Wilson intervals, the sign test, bootstrap intervals, repetition;
- `camelid.eval.report`: `build_report(run_dir)` -> one self-contained HTML file + Markdown
  (`stages` reads the run folder, `plots` draws);
- `camelid.eval.cli`: the `camelid eval` command (parsing only).
"""
