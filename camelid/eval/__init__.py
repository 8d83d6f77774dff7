"""Evaluation of a run (base vs SFT vs PPO answers scored by the reward model) and the HTML report.

- `camelid.eval.evaluate`: `run(EvalConfig) -> EvalResult`, writes `eval/result.json` + samples;
- `camelid.eval.stats`: win rates with Wilson intervals, repetition, small pure helpers;
- `camelid.eval.report`: `build_report(run_dir)` -> one self-contained HTML file + Markdown;
- `camelid.eval.cli`: the `camelid eval` command (parsing only).
"""
