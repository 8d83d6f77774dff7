"""`camelid report RUN`: a pipeline run folder -> one self-contained HTML file + a Markdown summary.

    RUN/report/report.html   plots embedded as base64 PNG, inline CSS: opens offline, mails as one file
    RUN/report/report.md     the same tables, plots linked from RUN/report/plots/*.png

Sections: the quality bar, time and peak memory per stage, data counts, the SFT loss curve, the
reward model's accuracy beside the longer-answer baseline, PPO's reward / KL / KL coefficient /
entropy curves, reward histograms before and after PPO, the evaluation table with side-by-side
samples, and every stage's resolved config. A stage that did not run says so; the report never
fails on a partial run. The run folder layout is camelid.pipeline's contract.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.eval.render import Block, to_html, to_markdown
from camelid.pipeline import CONFIG_FILE, REPORT_DIR, RESULT_FILE, STAGES, read_done
from camelid.train.tracking import read_metrics

PLOTS = ("sft_loss", "reward_accuracy", "ppo_curves", "reward_hist")
SAMPLES_SHOWN = 8
MODELS = ("base", "sft", "ppo")


@dataclass
class Stage:
    """What one stage folder holds (any part may be missing)."""

    name: str
    path: Path
    done: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    config_text: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.done is not None or self.result is not None or bool(self.metrics)

    def status(self) -> str:
        if self.done is not None:
            return "done"
        return "incomplete (no done marker)" if self.ran else "not run"


def load_stage(run: Path, name: str) -> Stage:
    path = run / name
    st = Stage(name, path, done=read_done(path), metrics=read_metrics(path))
    try:
        st.result = json.loads((path / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        st.result = (st.done or {}).get("result")
    if (path / CONFIG_FILE).is_file():
        st.config_text = (path / CONFIG_FILE).read_text()
    elif st.done and st.done.get("config"):
        st.config_text = json.dumps(st.done["config"], indent=2)
    return st


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric key, skipping records without it and non-finite values."""
    xs, ys = [], []
    for rec in metrics:
        v = rec.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(float(rec.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# -- plots ------------------------------------------------------------------------------------

def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _figure(ncols: int, nrows: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the report must build on a headless server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    return fig, axes.ravel()


def plot_sft(st: Stage) -> bytes | None:
    train, evl = series(st.metrics, "sft/loss"), series(st.metrics, "sft/eval_loss")
    if not train[0] and not evl[0]:
        return None
    fig, (ax,) = _figure(1)
    if train[0]:
        ax.plot(*train, label="train loss")
    if evl[0]:
        ax.plot(*evl, "o-", label="evaluation loss")
    ax.set(title="SFT loss", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    return _png(fig)


def reward_figures(reward: Stage, ev: Stage) -> dict[str, float]:
    """The reward model's pair accuracy and the longer-answer baseline (eval stage's, else reward's)."""
    if ev.result and ev.result.get("rm_pairs"):
        p = ev.result["rm_pairs"]
        return {"accuracy": p["accuracy"], "baseline": p["longer_wins_accuracy"], "pairs": p["pairs"]}
    r = (reward.result or {}).get("eval") or {}
    if "accuracy" in r:
        return {"accuracy": r["accuracy"], "baseline": r["longer_wins_accuracy"], "pairs": r.get("pairs", 0)}
    return {}


def plot_reward(reward: Stage, ev: Stage) -> bytes | None:
    figs = reward_figures(reward, ev)
    loss = series(reward.metrics, "reward/loss")
    if not figs and not loss[0]:
        return None
    fig, (ax1, ax2) = _figure(2)
    if figs:
        bars = ax1.bar(["reward model", "longer answer wins"], [figs["accuracy"], figs["baseline"]],
                       color=["tab:blue", "tab:gray"])
        ax1.bar_label(bars, fmt="%.2f")
        ax1.axhline(0.5, color="k", lw=0.8, ls=":")
        ax1.set(ylim=(0, 1), title=f"pair accuracy ({figs['pairs']} evaluation pairs)", ylabel="accuracy")
    if loss[0]:
        ax2.plot(*loss)
        ax2.set(title="reward-model training loss", xlabel="optimizer step", ylabel="-log sigmoid(r_j - r_k)")
    return _png(fig)


def plot_ppo(st: Stage) -> bytes | None:
    keys = (("env/reward_mean", "reward (mean, ±std)"), ("objective/kl", "KL to reference (nats/answer)"),
            ("objective/kl_coef", "KL coefficient β"), ("objective/entropy", "entropy (nats/answer)"))
    if not any(series(st.metrics, k)[0] for k, _ in keys):
        return None
    fig, axes = _figure(2, 2)
    for ax, (key, title) in zip(axes, keys):
        xs, ys = series(st.metrics, key)
        ax.set(title=title, xlabel="PPO step")
        if not xs:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", transform=ax.transAxes)
            continue
        ax.plot(xs, ys)
        if key == "env/reward_mean":
            sx, sd = series(st.metrics, "env/reward_std")
            if sx == xs:
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
    return _png(fig)


def plot_reward_hist(ppo: Stage, samples: list[dict[str, Any]]) -> bytes | None:
    """Held-out answers' rewards per model (eval) and PPO rollouts' scores at its first vs last sampled step."""
    rollouts = read_jsonl(ppo.path / "samples.jsonl")
    steps = sorted({r["step"] for r in rollouts if "step" in r and "score" in r})
    if not samples and not steps:
        return None
    fig, (ax1, ax2) = _figure(2)
    if samples:
        groups = {m: [r[f"reward_{m}"] for r in samples if isinstance(r.get(f"reward_{m}"), (int, float))] for m in MODELS}
        _histograms(ax1, {f"{m} (mean {sum(v) / len(v):+.2f})": v for m, v in groups.items() if v})
        ax1.set(title="held-out answers: reward-model score", xlabel="reward", ylabel="answers")
    if steps:
        _histograms(ax2, {f"step {s} ({label})": [r["score"] for r in rollouts if r.get("step") == s]
                          for s, label in ((steps[0], "first"), (steps[-1], "last"))})
        ax2.set(title="PPO rollouts: score before / after", xlabel="reward", ylabel="responses")
    return _png(fig)


def _histograms(ax: Any, groups: dict[str, list[float]], bins: int = 15) -> None:
    """Overlaid histograms on shared bin edges, so the groups compare bar by bar."""
    values = [v for vals in groups.values() for v in vals]
    lo, hi = min(values), max(values)
    edges = [lo + (hi - lo + 1e-9) * i / bins for i in range(bins + 1)]
    for label, vals in groups.items():
        ax.hist(vals, bins=edges, alpha=0.5, label=label)
    ax.legend()


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


def quality_bar(stages: dict[str, Stage]) -> list[list[str]]:
    """The issue's bar: RM above the length baseline; PPO beats SFT ≥ 60%; KL bounded; fluent."""
    rows: list[list[str]] = []
    figs = reward_figures(stages["reward"], stages["eval"])
    if figs:
        rows.append(["reward-model accuracy above the longer-answer baseline",
                     f"{figs['accuracy']:.3f} vs {figs['baseline']:.3f}", _pass(figs["accuracy"] > figs["baseline"])])
    ev = stages["eval"].result or {}
    wr = (ev.get("win_rates") or {}).get("ppo_vs_sft")
    if wr:
        rows.append(["PPO beats SFT in reward-model win rate (≥ 60%, held-out questions)",
                     f"{wr['rate']:.1%} (95% CI {wr['ci_low']:.1%}–{wr['ci_high']:.1%}, n={wr['n']})",
                     _pass(wr["rate"] >= 0.6)])
    kl = (ev.get("kl") or {}).get("per_answer")
    if isinstance(kl, (int, float)):
        target = float(_config_value(stages["ppo"], "kl_target") or 6.0)
        rows.append([f"KL to the reference bounded (≤ 2 × PPO's KL target {target:g} nats per answer)",
                     f"{kl:.2f} nats per answer ({ev['kl'].get('per_token', float('nan')):.3f} per token)",
                     _pass(math.isfinite(kl) and kl <= 2 * target)])
    models = ev.get("models") or {}
    if "ppo" in models and "sft" in models:
        rp, rs = models["ppo"].get("rep4"), models["sft"].get("rep4")
        if isinstance(rp, (int, float)) and isinstance(rs, (int, float)):
            rows.append(["answers stay fluent: PPO's repeated 4-gram share ≤ SFT's + 0.10 (samples below)",
                         f"{rp:.3f} vs {rs:.3f}", _pass(rp <= rs + 0.10)])
    return rows


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _config_value(st: Stage, key: str) -> Any:
    cfg = (st.done or {}).get("config")
    if cfg is None and st.config_text:
        import yaml

        try:
            cfg = yaml.safe_load(st.config_text)
        except yaml.YAMLError:
            cfg = None
    return (cfg or {}).get(key) if isinstance(cfg, dict) else None


def headline(st: Stage) -> str:
    r = st.result or {}
    if st.name == "data" and r.get("stats"):
        s = r["stats"]
        return f"{s.get('questions_kept', '?')} questions, {s.get('pairs', '?')} pairs"
    if st.name == "sft" and r:
        return f"eval loss {fmt(r.get('eval_loss'))}, perplexity {fmt(r.get('perplexity'), 2)}"
    if st.name == "reward" and r.get("eval"):
        e = r["eval"]
        return f"accuracy {fmt(e.get('accuracy'))} (longer wins {fmt(e.get('longer_wins_accuracy'))})"
    if st.name == "ppo":
        last = {k: series(st.metrics, k)[1] for k in ("env/reward_mean", "objective/kl")}
        if last["env/reward_mean"]:
            kl = last["objective/kl"][-1] if last["objective/kl"] else float("nan")
            return f"last reward {last['env/reward_mean'][-1]:+.3f}, KL {kl:.3f}"
    if st.name == "eval" and (r.get("win_rates") or {}).get("ppo_vs_sft"):
        return f"PPO vs SFT win rate {r['win_rates']['ppo_vs_sft']['rate']:.1%}"
    return ""


def overview(stages: dict[str, Stage]) -> Block:
    rows = []
    for st in stages.values():
        d = st.done or {}
        rows.append([st.name, st.status(), _duration(d.get("seconds")), _mb(d.get("peak_mb")), headline(st)])
    return ("table", ["stage", "status", "time", "peak memory", "result"], rows)


def not_run(st: Stage) -> list[Block]:
    return [("p", f"Stage not run ({st.path} has no output)." if not st.ran
             else f"Stage {st.status()}: showing what it wrote.")]


def data_section(st: Stage) -> list[Block]:
    out: list[Block] = [("h2", "Data")]
    stats = (st.result or {}).get("stats") or _json(st.path / "stats.json")
    if not stats:
        return out + not_run(st)
    out.append(("p", f"{stats.get('questions_kept', '?')} questions, {stats.get('answers_kept', '?')} answers, "
                     f"{stats.get('pairs', '?')} preference pairs."))
    splits = stats.get("splits") or {}
    out.append(("table", ["split", "questions", "pairs"],
                [[k, fmt(v.get("questions")), fmt(v.get("pairs"))] for k, v in splits.items()]))
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def figures_table(result: dict[str, Any], keys: tuple[str, ...]) -> Block:
    return ("table", ["figure", "value"], [[k.replace("_", " "), fmt(result.get(k))] for k in keys if k in result])


def training_sections(stages: dict[str, Stage], plots: dict[str, bytes | None]) -> list[Block]:
    sft, reward, ppo = stages["sft"], stages["reward"], stages["ppo"]
    out: list[Block] = [("h2", "Supervised fine-tuning")]
    out += [("img", "sft_loss", plots["sft_loss"]),
            figures_table(sft.result, ("steps", "train_loss", "eval_loss", "perplexity", "tokens_per_s"))] \
        if sft.ran else not_run(sft)
    out.append(("h2", "Reward model"))
    if reward.ran or stages["eval"].ran:
        out.append(("img", "reward_accuracy", plots["reward_accuracy"]))
        ev = (reward.result or {}).get("eval") or {}
        out.append(figures_table({**(reward.result or {}), **ev},
                                 ("steps", "train_pairs", "dropped_train_pairs", "pairs", "accuracy",
                                  "longer_wins_accuracy", "mean_margin", "pairs_per_s")))
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
        out += not_run(ppo)
    return out


def eval_section(st: Stage, samples: list[dict[str, Any]], plots: dict[str, bytes | None]) -> list[Block]:
    out: list[Block] = [("h2", "Evaluation on held-out questions")]
    r = st.result
    if not r:
        return out + not_run(st)
    s = r.get("sampling") or {}
    k = r.get("answers_per_question", 1)
    out.append(("p", f"{r.get('questions', '?')} questions of the evaluation split"
                     f"{f', {k} answers to each' if k > 1 else ''}; every model sampled with "
                     f"the same settings and seeds ({', '.join(f'{k} {v}' for k, v in s.items())}); "
                     "answers scored by the reward model."))
    models = r.get("models") or {}
    out.append(("table", ["model", "mean reward", "reward std", "answer length (tokens)", "repeated 4-grams", "path"],
                [[m, fmt(v.get("reward_mean")), fmt(v.get("reward_std")), fmt(v.get("length_mean"), 1),
                  fmt(v.get("rep4")), str(v.get("path", ""))] for m, v in models.items()]))
    wins = r.get("win_rates") or {}
    out.append(("table", ["comparison", "wins / ties / losses", "win rate", "95% CI (Wilson)"],
                [[k.replace("_", " "), f"{w['wins']} / {w['ties']} / {w['losses']}", f"{w['rate']:.1%}",
                  f"{w['ci_low']:.1%} – {w['ci_high']:.1%}"] for k, w in wins.items()]))
    kl = r.get("kl") or {}
    if kl:
        out.append(("p", f"KL of PPO to its reference ({kl.get('reference', '?')}) on PPO's own answers: "
                         f"{fmt(kl.get('per_token'))} nats per token, {fmt(kl.get('per_answer'), 2)} per answer "
                         "(mean over answers of the sum over tokens of log π − log π_ref)."))
    p = r.get("rm_pairs")
    if p:
        out.append(("p", f"Reward model on {p['pairs']} evaluation pairs: accuracy {p['accuracy']:.3f}, "
                         f"longer-answer baseline {p['longer_wins_accuracy']:.3f}, mean margin {fmt(p.get('mean_margin'))}."))
    out.append(("img", "reward_hist", plots["reward_hist"]))
    out.append(("h3", "Sample answers"))
    rows = [[_clip(x.get("question", "")), *[f"[{fmt(x.get(f'reward_{m}'), 2)}] {_clip(x.get(m, ''))}" for m in MODELS]]
            for x in samples[:SAMPLES_SHOWN]]
    out.append(("table", ["question", *[f"{m} [reward]" for m in MODELS]], rows))
    return out


def _clip(text: str, n: int = 500) -> str:
    text = str(text).strip()
    return text if len(text) <= n else text[:n] + " …"


def config_section(stages: dict[str, Stage]) -> list[Block]:
    out: list[Block] = [("h2", "Resolved configs")]
    for st in stages.values():
        out.append(("pre", f"{st.name}/{CONFIG_FILE}", st.config_text) if st.config_text
                   else ("p", f"{st.name}: no config (stage not run)."))
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
    samples = read_jsonl(stages["eval"].path / "samples.jsonl")
    plots = {"sft_loss": plot_sft(stages["sft"]), "reward_accuracy": plot_reward(stages["reward"], stages["eval"]),
             "ppo_curves": plot_ppo(stages["ppo"]), "reward_hist": plot_reward_hist(stages["ppo"], samples)}
    bar = quality_bar(stages)
    blocks: list[Block] = [("p", f"Run folder {run.resolve()}; report made {time.strftime('%Y-%m-%d %H:%M')}."),
                           ("h2", "Quality bar"),
                           ("table", ["criterion", "measured", "verdict"], bar) if bar
                           else ("p", "Not measured: the evaluation stage has not run."),
                           ("h2", "Stages: time and peak memory"), overview(stages),
                           ("p", "Peak memory: the stage's peak resident memory (CPU) or peak allocated GPU memory, "
                                 "measured by the pipeline around the stage's function.")]
    blocks += data_section(stages["data"]) + training_sections(stages, plots)
    blocks += eval_section(stages["eval"], samples, plots) + config_section(stages)
    title = f"camelid run report: {run.name}"
    with atomic_dir(final, overwrite) as tmp:
        (tmp / "plots").mkdir()
        for name, png in plots.items():
            if png is not None:
                (tmp / "plots" / f"{name}.png").write_bytes(png)
        (tmp / "report.html").write_text(to_html(title, blocks), encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown(title, blocks), encoding="utf-8")
    return ReportResult(final / "report.html", final / "report.md", {k: v is not None for k, v in plots.items()})


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
