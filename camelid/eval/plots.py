"""The report's plots: matplotlib figures (headless) as PNG bytes; None where a stage logged nothing to draw."""

from __future__ import annotations

import io
from typing import Any

from camelid.eval.stages import Stage, series
from camelid.runfiles import SAMPLES_FILE, read_jsonl

MODELS = ("base", "sft", "ppo", "dpo")


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


def plot_reward(reward: Stage, judges: dict[str, dict[str, float]]) -> bytes | None:
    """Each judge's held-out pair accuracy beside the longer-answer baseline; the training judge's loss."""
    loss = series(reward.metrics, "reward/loss")
    if not judges and not loss[0]:
        return None
    fig, (ax1, ax2) = _figure(2)
    if judges:
        names = [f"{role} judge" for role in judges] + ["longer answer wins"]
        first = next(iter(judges.values()))
        bars = ax1.bar(names, [j["accuracy"] for j in judges.values()] + [first["baseline"]],
                       color=["tab:blue", "tab:green"][: len(judges)] + ["tab:gray"])
        ax1.bar_label(bars, fmt="%.2f")
        ax1.axhline(0.5, color="k", lw=0.8, ls=":")
        ax1.set(ylim=(0, 1), title=f"pair accuracy ({first['pairs']} evaluation pairs)", ylabel="accuracy")
    if loss[0]:
        ax2.plot(*loss)
        ax2.set(title="training judge's loss", xlabel="optimizer step", ylabel="-log sigmoid(r_j - r_k)")
    return _png(fig)


def plot_dpo(st: Stage) -> bytes | None:
    """DPO's loss, preference accuracy and margin β(ρ_c − ρ_r) on its training batches."""
    keys = (("dpo/loss", "DPO loss"), ("dpo/rewards/accuracies", "preference accuracy (batch)"),
            ("dpo/rewards/margins", "margin β(ρ_chosen − ρ_rejected)"))
    if not any(series(st.metrics, k)[0] for k, _ in keys):
        return None
    fig, axes = _figure(3)
    for ax, (key, title) in zip(axes, keys):
        xs, ys = series(st.metrics, key)
        ax.set(title=title, xlabel="optimizer step")
        if xs:
            ax.plot(xs, ys)
        else:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", transform=ax.transAxes)
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
    rollouts = read_jsonl(ppo.path / SAMPLES_FILE)
    steps = sorted({r["step"] for r in rollouts if "step" in r and "score" in r})
    if not samples and not steps:
        return None
    fig, (ax1, ax2) = _figure(2)
    if samples:
        groups = {m: [r[f"reward_{m}"] for r in samples if isinstance(r.get(f"reward_{m}"), (int, float))] for m in MODELS}
        _histograms(ax1, {f"{m} (mean {sum(v) / len(v):+.2f})": v for m, v in groups.items() if v})
        ax1.set(title="held-out answers: training judge's score", xlabel="reward", ylabel="answers")
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
