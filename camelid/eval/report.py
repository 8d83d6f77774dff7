"""`camelid report RUN`: a pipeline run folder -> one self-contained HTML file + a Markdown summary.

    RUN/report/report.html   plots embedded as base64 PNG, inline CSS: opens offline, mails as one file
    RUN/report/report.md     the same tables, plots linked from RUN/report/plots/*.png

Sections: the quality bar (the verdicts of PPO / DPO vs SFT under two judges, stated with their
paired intervals and question counts, and the guards), time and peak memory per stage, data
counts, the SFT loss curve, both judges' accuracy beside the longer-answer baseline, PPO's reward /
KL / KL coefficient / entropy curves, DPO's loss / preference accuracy / margin, reward histograms,
the evaluation tables (paired comparisons, the length-controlled view) with side-by-side samples,
and every stage's resolved config. A stage that did not run says so; the report never fails on
a partial run. The run folder layout is camelid.pipeline's contract (names in camelid.runfiles).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.eval.plots import plot_dpo, plot_ppo, plot_reward, plot_reward_hist, plot_sft
from camelid.eval.render import Block, to_html, to_markdown
from camelid.eval.stages import Stage, config_value, judge_figures, load_stage, series
from camelid.runfiles import (CONFIG_FILE, JUDGE_DIR, METHOD_STAGES, PIPELINE_FILE, PLOTS_DIR, REPORT_DIR, REPORT_HTML,
                              REPORT_MD, RESULT_FILE, SAMPLES_FILE, STAGES, STATS_FILE, read_json, read_jsonl)

PLOTS = ("sft_loss", "reward_accuracy", "ppo_curves", "dpo_curves", "reward_hist")
SAMPLES_SHOWN = 8
MODELS = ("base", "sft", "ppo", "dpo")
JUDGE_STAGE = f"reward/{JUDGE_DIR}"
"""The second judge's run folder inside the reward stage's."""
REP4_MARGIN = 0.10
"""Fluency guard: a tuned model's repeated 4-gram share may exceed SFT's by at most this."""
KL_FACTOR = 2.0
"""KL guard: PPO's KL to its reference at most this times its KL target."""


# -- document model: lists of blocks, rendered by camelid.eval.render ----------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "no", None: "–"}[x]
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _mb(x: Any) -> str:
    return f"{x:,.0f} MB" if isinstance(x, (int, float)) else "–"


def quality_bar(stages: dict[str, Stage], judge: Stage) -> tuple[list[list[str]], list[str]]:
    """(rows of criterion / measured / verdict, the judges' disagreement lines). The verdict of PPO
    and DPO vs SFT: the paired 95% CI's lower end above 50% under the training judge and the
    point estimate above 50% under the second judge (camelid.eval.compare); then the guards:
    each judge above the longer-answer baseline, KL bounded, answers fluent."""
    rows: list[list[str]] = []
    ev = stages["eval"].result or {}
    disagree = []
    for name, v in (ev.get("verdicts") or {}).items():
        a = name.split("_vs_")[0].upper()
        rows.append([f"{a} beats SFT: paired 95% CI above 50% (training judge), point estimate above 50% (second judge)",
                     "; ".join(v["lines"]), _pass(v["passed"])])
        disagree += [f"{a} vs SFT: {line}" for line in v["lines"] if line.startswith("the judges disagree")]
    for role, f in judge_figures(stages["reward"], judge, stages["eval"]).items():
        rows.append([f"{role} judge's accuracy above the longer-answer baseline",
                     f"{f['accuracy']:.3f} vs {f['baseline']:.3f} ({f['pairs']} held-out pairs)",
                     _pass(f["accuracy"] > f["baseline"])])
    kl = ev.get("kl") or {}
    kl = {"ppo": kl} if "per_answer" in kl else kl
    target = float(config_value(stages["ppo"], "kl_target") or 6.0)
    for m, k in kl.items():
        per_answer = k.get("per_answer")
        if not isinstance(per_answer, (int, float)):
            continue
        measured = f"{per_answer:.2f} nats per answer ({k.get('per_token', float('nan')):.3f} per token)"
        if m == "ppo":
            rows.append([f"PPO's KL to the reference bounded (≤ {KL_FACTOR:g} × its KL target {target:g} nats per answer)",
                         measured, _pass(math.isfinite(per_answer) and per_answer <= KL_FACTOR * target)])
        else:
            rows.append([f"{m.upper()}'s KL to the reference (no target: β sets it)", measured, "–"])
    models = ev.get("models") or {}
    rs = (models.get("sft") or {}).get("rep4")
    for m in ("ppo", "dpo"):
        rp = (models.get(m) or {}).get("rep4")
        if isinstance(rp, (int, float)) and isinstance(rs, (int, float)):
            rows.append([f"answers stay fluent: {m.upper()}'s repeated 4-gram share ≤ SFT's + {REP4_MARGIN:.2f} (samples below)",
                         f"{rp:.3f} vs {rs:.3f}", _pass(rp <= rs + REP4_MARGIN)])
    return rows, disagree


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def headline(st: Stage) -> str:
    r = st.result or {}
    if st.name == "data" and r.get("stats"):
        s = r["stats"]
        return f"{s.get('questions_kept', '?')} questions, {s.get('pairs', '?')} pairs"
    if st.name == "sft" and r:
        return f"eval loss {fmt(r.get('eval_loss'))}, perplexity {fmt(r.get('perplexity'), 2)}"
    if st.name == "reward" and r.get("eval"):
        e = r["eval"]
        second = ((read_json(st.path / JUDGE_DIR / RESULT_FILE) or {}).get("eval") or {}).get("accuracy")
        return (f"accuracy {fmt(e.get('accuracy'))} (longer wins {fmt(e.get('longer_wins_accuracy'))})"
                + (f"; second judge {fmt(second)}" if second is not None else ""))
    if st.name == "ppo":
        last = {k: series(st.metrics, k)[1] for k in ("env/reward_mean", "objective/kl")}
        if last["env/reward_mean"]:
            kl = last["objective/kl"][-1] if last["objective/kl"] else float("nan")
            return f"last reward {last['env/reward_mean'][-1]:+.3f}, KL {kl:.3f}"
    if st.name == "dpo" and r.get("eval"):
        return f"held-out preference accuracy {fmt(r['eval'].get('reward_accuracy'))}, loss {fmt(r['eval'].get('loss'))}"
    if st.name == "eval" and r.get("verdicts"):
        return "; ".join(f"{k.split('_vs_')[0].upper()} vs SFT {'PASS' if v['passed'] else 'FAIL'}"
                         for k, v in r["verdicts"].items())
    return ""


def overview(stages: dict[str, Stage]) -> Block:
    rows = []
    for st in stages.values():
        d = st.done or {}
        rows.append([st.name, st.status(), _duration(d.get("seconds")), _mb(d.get("peak_mb")), headline(st)])
    return ("table", ["stage", "status", "time", "peak memory", "result"], rows)


def not_run(st: Stage, method: str = "") -> list[Block]:
    if not st.ran and method and st.name in METHOD_STAGES and method not in (st.name, "both"):
        return [("p", f"Not part of this run (--method {method}).")]
    return [("p", f"Stage not run ({st.path} has no output)." if not st.ran
             else f"Stage {st.status()}: showing what it wrote.")]


def run_method(run: Path) -> str:
    """The pipeline's --method for this run folder ('' when pipeline.yaml does not say)."""
    import yaml

    try:
        plan = yaml.safe_load((run / PIPELINE_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str(((plan.get("pipeline") or {}) if isinstance(plan, dict) else {}).get("method") or "")


def data_section(st: Stage) -> list[Block]:
    out: list[Block] = [("h2", "Data")]
    stats = (st.result or {}).get("stats") or read_json(st.path / STATS_FILE)
    if not stats:
        return out + not_run(st)
    out.append(("p", f"{stats.get('questions_kept', '?')} questions, {stats.get('answers_kept', '?')} answers, "
                     f"{stats.get('pairs', '?')} preference pairs."))
    splits = stats.get("splits") or {}
    out.append(("table", ["split", "questions", "pairs"],
                [[k, fmt(v.get("questions")), fmt(v.get("pairs"))] for k, v in splits.items()]))
    return out


def figures_table(result: dict[str, Any], keys: tuple[str, ...]) -> Block:
    return ("table", ["figure", "value"], [[k.replace("_", " "), fmt(result.get(k))] for k in keys if k in result])


def training_sections(stages: dict[str, Stage], judge: Stage, plots: dict[str, bytes | None],
                      method: str = "") -> list[Block]:
    sft, reward, ppo, dpo = stages["sft"], stages["reward"], stages["ppo"], stages["dpo"]
    out: list[Block] = [("h2", "Supervised fine-tuning")]
    out += [("img", "sft_loss", plots["sft_loss"]),
            figures_table(sft.result, ("steps", "train_loss", "eval_loss", "perplexity", "tokens_per_s"))] \
        if sft.ran else not_run(sft)
    out.append(("h2", "Reward models (judges)"))
    if reward.ran or stages["eval"].ran:
        out.append(("img", "reward_accuracy", plots["reward_accuracy"]))
        keys = ("train_split", "steps", "train_pairs", "truncated_train_pairs", "dropped_train_pairs", "pairs",
                "accuracy", "longer_wins_accuracy", "mean_margin", "pairs_per_s")
        rows = {role: {**(st.result or {}), **((st.result or {}).get("eval") or {})}
                for role, st in (("training judge", reward), ("second judge", judge)) if st.result}
        out.append(("table", ["figure", *rows], [[k.replace("_", " "), *[fmt(r.get(k)) for r in rows.values()]]
                                                 for k in keys if any(k in r for r in rows.values())]))
        out.append(("p", "The training judge is the reward model PPO optimises; the second judge is trained the same "
                         "way on another split's pairs (no question shared), and neither PPO nor DPO saw it."
                    if judge.result else "No second judge was trained (reward stage without judge_split)."))
    else:
        out += not_run(reward)
    out.append(("h2", "PPO"))
    if ppo.ran:
        out.append(("img", "ppo_curves", plots["ppo_curves"]))
        last = {k: series(ppo.metrics, k)[1] for k in ("env/reward_mean", "objective/kl", "objective/kl_coef",
                                                         "objective/entropy", "ppo/policy/clipfrac", "perf/tokens_per_s")}
        out.append(("table", ["metric", "first step", "last step"],
                    [[k, fmt(v[0]), fmt(v[-1])] for k, v in last.items() if v]))
    else:
        out += not_run(ppo, method)
    out.append(("h2", "DPO"))
    if dpo.ran:
        out.append(("img", "dpo_curves", plots["dpo_curves"]))
        r = dpo.result or {}
        out.append(figures_table({**r, **{f"held-out {k}": v for k, v in (r.get("eval") or {}).items()}},
                                 ("steps", "train_pairs", "truncated_train_pairs", "train_loss", "eval_pairs",
                                  "held-out loss", "held-out reward_accuracy", "held-out reward_margin", "pairs_per_s")))
    else:
        out += not_run(dpo, method)
    return out


def eval_section(st: Stage, samples: list[dict[str, Any]], plots: dict[str, bytes | None]) -> list[Block]:
    out: list[Block] = [("h2", "Evaluation on held-out questions")]
    r = st.result
    if not r:
        return out + not_run(st)
    s = {k: v for k, v in (r.get("sampling") or {}).items() if k != "seeds"}
    k = r.get("answers_per_question", 1)
    judges = list(r.get("judges") or {"training": {}})
    out.append(("p", f"{r.get('questions', '?')} questions of the evaluation split, {k} answer(s) to each; every "
                     f"model sampled with the same settings ({', '.join(f'{n} {v}' for n, v in s.items())}) and "
                     f"seeds of its own; answers scored by the {' and the '.join(j + ' judge' for j in judges)}. "
                     "A question's score is the mean over its answers; comparisons count questions."))
    models = r.get("models") or {}
    out.append(("table", ["model", *[f"mean reward ({j} judge)" for j in judges], "answer length (tokens)",
                          "repeated 4-grams", "path"],
                [[m, *[fmt(((v.get("reward") or {}).get(j) or {}).get("mean", v.get("reward_mean") if j == "training" else None))
                       for j in judges], fmt(v.get("length_mean"), 1), fmt(v.get("rep4")), str(v.get("path", ""))]
                 for m, v in models.items()]))
    rows = []
    for name, per_judge in (r.get("comparisons") or {}).items():
        for j, c in per_judge.items():
            rows.append([name.replace("_", " "), j, f"{c['wins']} / {c['ties']} / {c['losses']}", f"{c['rate']:.2f}",
                         f"{c['ci_low']:.2f} – {c['ci_high']:.2f}", f"{c['sign_p']:.2g}", f"{c['mean_diff']:+.3f}",
                         f"{fmt(c['similar_rate'], 2)} ({fmt(c['similar_ci_low'], 2)} – {fmt(c['similar_ci_high'], 2)}; "
                         f"{c['similar_pairs']} of {c['answer_pairs']} pairs)"])
    out.append(("table", ["comparison", "judge", "questions won / tied / lost", "win rate", "paired 95% CI",
                          "sign test p", "mean reward difference", "similar-length answers: win rate (95% CI)"], rows))
    out.append(("p", "Win rate: share of questions where the first model's mean reward is higher (ties half); the "
                     "interval resamples questions (percentile bootstrap). Similar-length answers: answer pairs whose "
                     "token lengths are within 20% of each other, where length alone cannot decide."))
    kl = r.get("kl") or {}
    for m, v in ({"ppo": kl} if "per_answer" in kl else kl).items():
        out.append(("p", f"KL of {m.upper()} to its reference ({v.get('reference', '?')}) on its own answers: "
                         f"{fmt(v.get('per_token'))} nats per token, {fmt(v.get('per_answer'), 2)} per answer "
                         "(mean over answers of the sum over tokens of log π − log π_ref)."))
    for j, v in (r.get("judges") or {}).items():
        p = v.get("pairs") or {}
        if p.get("pairs"):
            out.append(("p", f"{j.capitalize()} judge on {p['pairs']} evaluation pairs: accuracy {p['accuracy']:.3f}, "
                             f"longer-answer baseline {p['longer_wins_accuracy']:.3f}, mean margin {fmt(p.get('mean_margin'))}."))
    out.append(("img", "reward_hist", plots["reward_hist"]))
    out.append(("h3", "Sample answers"))
    shown = [m for m in MODELS if m in models] or list(MODELS)
    first = [x for x in samples if x.get("answer", 0) == 0][:SAMPLES_SHOWN]
    rows = [[_clip(x.get("question", "")), *[f"[{fmt(x.get(f'reward_{m}'), 2)}] {_clip(x.get(m, ''))}" for m in shown]]
            for x in first]
    out.append(("table", ["question", *[f"{m} [training judge's reward]" for m in shown]], rows))
    return out


def _clip(text: str, n: int = 500) -> str:
    text = str(text).strip()
    return text if len(text) <= n else text[:n] + " …"


def config_section(stages: dict[str, Stage], method: str = "") -> list[Block]:
    out: list[Block] = [("h2", "Resolved configs")]
    for st in stages.values():
        if st.config_text:
            out.append(("pre", f"{st.name}/{CONFIG_FILE}", st.config_text))
        else:
            (_, text), = not_run(st, method)
            out.append(("p", f"{st.name}: no config. {text}"))
    return out


@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    plots: dict[str, bool]
    """Which plots had data (True) and were drawn."""


def build_report(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> ReportResult:
    """Render RUN into RUN/report/ (or `out`): report.html, report.md, plots/*.png; atomic. An
    existing report folder is replaced only when camelid wrote it or `overwrite` is set."""
    from camelid.utils import atomic_dir, check_replaceable

    run = Path(run_dir)
    if not run.is_dir():
        raise CamelidError(f"run folder {run} does not exist; give the --out folder of `camelid pipeline`")
    final = Path(out) if out else run / REPORT_DIR
    check_replaceable(final, overwrite)
    stages = {name: load_stage(run, name) for name in STAGES}
    if not any(st.ran for st in stages.values()):
        raise CamelidError(f"{run} holds no stage output ({', '.join(STAGES)}); is it a `camelid pipeline` run folder?")
    judge = load_stage(run, JUDGE_STAGE)
    samples = read_jsonl(stages["eval"].path / SAMPLES_FILE)
    plots = {"sft_loss": plot_sft(stages["sft"]),
             "reward_accuracy": plot_reward(stages["reward"], judge_figures(stages["reward"], judge, stages["eval"])),
             "ppo_curves": plot_ppo(stages["ppo"]), "dpo_curves": plot_dpo(stages["dpo"]),
             "reward_hist": plot_reward_hist(stages["ppo"], samples)}
    bar, disagree = quality_bar(stages, judge)
    blocks: list[Block] = [("p", f"Run folder {run.resolve()}; report made {time.strftime('%Y-%m-%d %H:%M')}."),
                           ("h2", "Quality bar"),
                           ("table", ["criterion", "measured", "verdict"], bar) if bar
                           else ("p", "Not measured: the evaluation stage has not run."),
                           *[("p", line) for line in disagree],
                           ("h2", "Stages: time and peak memory"), overview(stages),
                           ("p", "Peak memory: the stage's peak resident memory (CPU) or peak allocated GPU memory, "
                                 "measured by the pipeline around the stage's function.")]
    method = run_method(run)
    blocks += data_section(stages["data"]) + training_sections(stages, judge, plots, method)
    blocks += eval_section(stages["eval"], samples, plots) + config_section(stages, method)
    title = f"camelid run report: {run.name}"
    with atomic_dir(final, overwrite) as tmp:
        (tmp / PLOTS_DIR).mkdir()
        for name, png in plots.items():
            if png is not None:
                (tmp / PLOTS_DIR / f"{name}.png").write_bytes(png)
        (tmp / REPORT_HTML).write_text(to_html(title, blocks), encoding="utf-8")
        (tmp / REPORT_MD).write_text(to_markdown(title, blocks), encoding="utf-8")
    return ReportResult(final / REPORT_HTML, final / REPORT_MD, {k: v is not None for k, v in plots.items()})


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="render a run folder into an HTML + Markdown report",
                       description="One self-contained HTML file (plots embedded) + a Markdown summary of a pipeline run.")
    p.add_argument("run_dir", metavar="RUN", help="the run folder (`camelid pipeline --out`)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/report)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when camelid did not write it (a folder camelid wrote is always replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = build_report(args.run_dir, args.out, args.overwrite)
    missing = [k for k, ok in res.plots.items() if not ok]
    print(f"report: {res.html}\nsummary: {res.markdown}" + (f"\n(no data yet for: {', '.join(missing)})" if missing else ""))
    return 0
