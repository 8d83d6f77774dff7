"""`camelid ppo`: PPO with a KL penalty against a frozen reference (the StackLLaMA RL stage).

Each step reads as its phases (cleanrl's layout):

    rollout     prompts of the rl split -> responses sampled by camelid's engine
    score       reward model (or a Python function) on query + response, minus a baseline
    experience  log pi, log pi_ref and values; rewards = -beta*KL per token + score at the last;
                GAE advantages whitened over the batch of all processes
    optimise    PPO epochs over shuffled mini-batches (clipped policy and value losses)
    log         metrics.jsonl (+ TensorBoard / W&B / trackio), samples.jsonl, progress bar

The math lives in camelid/train/rl.py, the policy and its reference in ppo_policy.py (value head
ppo_value.py, rows and log-probabilities ppo_batch.py, scorers ppo_scorers.py), the settings in
ppo_config.py, checkpoints in ppo_state.py. Under `accelerate launch --num_processes N` every
process rolls out its own prompts; whitening, the KL controller and the logged figures use
statistics summed over all processes.

Determinism: everything random in step s (data order, lengths, sampling seeds, mini-batch order,
dropout) is a function of (seed, s) — and the process rank where it must differ — so a resumed
run repeats the uninterrupted one, and N processes sample what one process with N× the batch does.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.config import from_args
from camelid.errors import CamelidError, UsageError
from camelid.train.ppo_config import PPOConfig
from camelid.utils import print0, status


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.train.stage import add_run_args

    p = sub.add_parser(
        name,
        help="PPO with a KL penalty against a frozen reference",
        description="Optimise a policy (SFT model + LoRA + value head) against a reward model with PPO "
        "and a per-token KL penalty to the SFT model. Works under `accelerate launch --num_processes N`.",
    )
    add_run_args(p, PPOConfig, "ppo")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = from_args(PPOConfig, args, "ppo")
    if not cfg.reward_model:
        raise UsageError("--reward-model is required: a `camelid reward train` output folder")
    result = run(cfg, resume=args.resume, overwrite=args.overwrite)
    print0(f"ppo: {result.steps} steps, reward {result.reward_mean:+.3f}, KL {result.kl:.3f}; "
           f"adapter in {result.adapter_dir}" + (f", merged model in {result.model_dir}" if result.model_dir else ""))
    return 0


@dataclass
class PPOResult:
    run_dir: Path
    adapter_dir: Path
    model_dir: Path | None
    steps: int
    reward_mean: float
    kl: float
    prompts_dropped: int
    policy: Any = field(default=None, repr=False)
    """The trained PolicyWithValue, in memory (for callers that evaluate it in-process)."""


# --- prompts -------------------------------------------------------------------------------------


def read_questions(cfg: PPOConfig) -> list[str]:
    """The distinct questions of the rl split (it repeats a question once per answer pair)."""
    from camelid.qa import load_split

    questions = list(dict.fromkeys(load_split(cfg.data, "rl", ("question",))["question"]))
    return questions[: cfg.max_prompts] if cfg.max_prompts else questions


class PromptSet:
    """The distinct questions of the rl split as `Question: <q>\\n\\nAnswer: ` prompts.

    Prompts over max_prompt_tokens are dropped (and counted). Position p of the run's prompt
    stream is question order_e[p mod N] with e = p div N and order_e a permutation seeded by
    (seed, e): the batch of any step, on any process, follows from the step alone.
    """

    def __init__(self, questions: list[str], tokenizer: Any, cfg: PPOConfig) -> None:
        from camelid.qa import qa_text

        texts = [qa_text(q) for q in questions]
        ids = tokenizer(texts)["input_ids"]
        keep = [i for i, x in enumerate(ids) if 0 < len(x) <= cfg.max_prompt_tokens]
        self.dropped = len(texts) - len(keep)
        if not keep:
            raise CamelidError(f"all {len(texts)} prompts are longer than max_prompt_tokens={cfg.max_prompt_tokens}; raise it")
        self.texts = [texts[i] for i in keep]
        self.ids = [list(ids[i]) for i in keep]
        self.seed = cfg.seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def _order(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()}
        return self._orders[epoch]

    def positions(self, step: int, rank: int, world: int, batch_size: int) -> list[int]:
        """Global stream positions of this process's prompts in `step` (1-based)."""
        start = (step - 1) * world * batch_size + rank * batch_size
        return list(range(start, start + batch_size))

    def get(self, position: int) -> tuple[str, list[int]]:
        epoch, i = divmod(position, len(self))
        j = self._order(epoch)[i]
        return self.texts[j], self.ids[j]


# --- phases --------------------------------------------------------------------------------------


@dataclass
class Rollout:
    queries: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    """Generated ids cut after the first EOS (kept); what is scored and trained on."""
    responses: list[str]
    generated_tokens: int
    """Tokens the engine produced, including any after EOS (for throughput)."""
    hidden: list[Any] | None = None
    """Per response (len(response_ids[i]), H): the hidden states its tokens were sampled from."""


def rollout(engine: Any, prompts: PromptSet, positions: list[int], lengths: list[int], cfg: PPOConfig) -> Rollout:
    """Sample one response per prompt; each has its drawn length and a seed of its stream position."""
    import torch

    from camelid.engine import SamplingParams
    from camelid.train import rl

    queries, prompt_ids = zip(*(prompts.get(p) for p in positions))
    params = [
        SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=n,
                       seed=cfg.seed * 1_000_003 + p, ignore_eos=not cfg.stop_at_eos, return_hidden=cfg.old_from_rollout)
        for n, p in zip(lengths, positions)
    ]
    done = engine.generate([list(x) for x in prompt_ids], params)
    width = max(len(c.token_ids) for c in done)
    ids = torch.tensor([c.token_ids + [0] * (width - len(c.token_ids)) for c in done])
    n_gen = torch.tensor([len(c.token_ids) for c in done])
    keep = rl.response_mask(ids, n_gen, tuple(sorted(engine.eos_ids))).sum(1).long().tolist()
    response_ids = [c.token_ids[:k] for c, k in zip(done, keep)]
    responses = [engine.tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
    hidden = [c.hidden[:k] for c, k in zip(done, keep)] if cfg.old_from_rollout else None
    return Rollout(list(queries), [list(x) for x in prompt_ids], response_ids, responses, int(n_gen.sum()), hidden)


def shape_scores(raw: Any, state: Any, cfg: PPOConfig, acc: Any) -> Any:
    """Optional running normalisation (with the scores of all processes) and clipping."""
    import torch

    scores = raw
    if cfg.score_scaling:
        state.running.update(acc.gather(raw.to(acc.device)).cpu())
        scores = state.running.normalise(raw, shift_mean=cfg.score_norm)
    if cfg.score_clip:
        scores = torch.clamp(scores, -cfg.score_clip, cfg.score_clip)
    return scores


@dataclass
class Experience:
    batch: Any  # ppo_batch.SeqBatch of the whole local batch
    logprobs: Any
    ref_logprobs: Any
    values: Any
    entropy: Any
    advantages: Any
    returns: Any
    """All (B, T) over the response tokens, zero where masked."""


def make_experience(policy: Any, ref: Any, roll: Rollout, scores: Any, kl_coef: float, cfg: PPOConfig, acc: Any) -> Experience:
    """Old and reference log-probs and values (no grad), KL-shaped rewards, whitened GAE.

    The old policy's log-probs and values come from the hidden states the rollout sampled from
    (`roll.hidden`) when it kept them, else from a forward pass; the reference always runs one."""
    import torch

    from camelid.train import rl
    from camelid.train.ppo_batch import pack, response_logprobs

    sb = pack(roll.prompt_ids, roll.response_ids, policy.lm.config.pad_token_id or 0, acc.device)
    hidden = None
    if roll.hidden is not None:
        hidden = torch.zeros((*sb.mask.shape, roll.hidden[0].shape[-1]), dtype=roll.hidden[0].dtype, device=acc.device)
        for i, h in enumerate(roll.hidden):
            hidden[i, : len(h)] = h
    policy.eval()
    parts = defaultdict(list)
    # Rows in order of length, so each forward chunk pads to nearly its own rows' length; the
    # results are put back in rollout order below.
    order = sb.attention_mask.sum(1).argsort(stable=True)
    with torch.no_grad():
        for idx in order.split(cfg.forward_batch_size):
            part = sb.select(idx)
            h = hidden[idx] if hidden is not None else policy.response_hidden(part.input_ids, part.gather_idx)
            lp, ent, values = policy.experience(h, part.labels)
            parts["logprobs"].append(lp)
            parts["entropy"].append(ent)
            parts["values"].append(values)
            del h
            with policy.as_reference() if ref is None else contextlib.nullcontext(ref) as reference:
                parts["ref"].append(response_logprobs(reference, part))
    back = order.argsort()
    logprobs, entropy, values, ref_lp = (torch.cat(parts[k])[back] * sb.mask for k in ("logprobs", "entropy", "values", "ref"))
    kl = rl.kl_penalty(logprobs, ref_lp, cfg.kl_penalty)
    rewards, _ = rl.per_token_rewards(scores.to(sb.mask.device), kl, sb.mask, kl_coef)
    advantages, returns = rl.gae(values, rewards, sb.mask, cfg.gamma, cfg.lam)
    sums = acc.reduce(rl.masked_sums(advantages, sb.mask), "sum")
    advantages = rl.masked_whiten(advantages, sb.mask, stats=rl.moments_from_sums(sums))
    return Experience(sb, logprobs, ref_lp, values, entropy, advantages, returns)


def ppo_epochs(model: Any, opt: Any, exp: Experience, cfg: PPOConfig, step: int, acc: Any) -> dict[str, float]:
    """cfg.ppo_epochs passes over the batch in shuffled mini-batches; one optimizer step per
    gradient_accumulation_steps mini-batches. Returns mean losses/diagnostics over this process."""
    import torch

    model.train()
    order = torch.Generator().manual_seed(_step_seed(cfg.seed, step, acc.process_index))
    per_opt = cfg.mini_batch_size * cfg.gradient_accumulation_steps
    record: dict[str, list[float]] = defaultdict(list)
    skipped = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(cfg.batch_size, generator=order)
        for start in range(0, cfg.batch_size, per_opt):
            group = perm[start : start + per_opt].split(cfg.mini_batch_size)
            for k, idx in enumerate(group):
                # DDP all-reduces gradients on the last mini-batch of the group only.
                with acc.no_sync(model) if k < len(group) - 1 else contextlib.nullcontext():
                    stats = _minibatch(model, exp, idx.to(exp.batch.mask.device), cfg)
                    acc.backward(stats.pop("loss") / len(group))
                skipped += int(stats.pop("skipped"))
                for key, v in stats.items():
                    record[key].append(v)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cfg.early_stopping and _early_stop(record["policykl"][-len(group):], cfg, acc):
                return {**{k: sum(v) / len(v) for k, v in record.items()}, "skipped": skipped, "early_stopped": 1}
    return {**{k: sum(v) / len(v) for k, v in record.items()}, "skipped": skipped, "early_stopped": 0}


def _minibatch(model: Any, exp: Experience, idx: Any, cfg: PPOConfig) -> dict[str, Any]:
    from camelid.train import rl

    sb = exp.batch.select(idx)
    logits, vpred = model(sb.input_ids, sb.gather_idx, sb.labels)
    logprobs = rl.logprobs_from_logits(logits, sb.labels)
    pg = rl.policy_loss(logprobs, exp.logprobs[idx], exp.advantages[idx], sb.mask, cfg.cliprange)
    vf = rl.value_loss(vpred, exp.values[idx], exp.returns[idx], sb.mask, cfg.cliprange_value)
    loss = pg["loss"] + cfg.vf_coef * vf["loss"]
    # TRL's guard: a mini-batch whose policy ratio exploded contributes no gradient (but still
    # runs backward, so that DDP's all-reduce sees every process).
    skipped = pg["ratio"].item() > cfg.ratio_threshold
    if skipped:
        loss = loss * 0.0
    return {
        "loss": loss, "skipped": skipped, "policy_loss": pg["loss"].item(), "value_loss": vf["loss"].item(),
        "approxkl": pg["approxkl"].item(), "clipfrac": pg["clipfrac"].item(), "policykl": pg["policykl"].item(),
    }


def _early_stop(policykls: list[float], cfg: PPOConfig, acc: Any) -> bool:
    """TRL's early stopping: the policy KL (averaged over processes) above 1.5 x target_kl."""
    import torch

    kl = acc.reduce(torch.tensor(sum(policykls) / len(policykls), device=acc.device), "mean").item()
    return kl > 1.5 * cfg.target_kl


def adam(params: list[Any], lr: float) -> Any:
    """Adam as TRL's PPOTrainer uses it; the fused kernel where the parameters' device has one
    (CPU, CUDA): the same update in one pass per tensor instead of a dozen tensor operations
    (a PPO step runs many optimizer steps over ~120 small LoRA tensors)."""
    import torch

    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


# --- statistics over all processes ---------------------------------------------------------------


def step_metrics(exp: Experience, raw_scores: Any, train: dict[str, float], roll: Rollout, kl_coef: float, acc: Any) -> dict[str, float]:
    """The logged figures, gathered over processes (`objective/kl` and `objective/entropy` are
    per response, summed over its tokens, as TRL logs them)."""
    import torch

    from camelid.train import rl

    mask = exp.batch.mask
    scores = acc.gather(raw_scores.to(acc.device).float())
    per_seq = torch.stack([((exp.logprobs - exp.ref_logprobs) * mask).sum(1), (exp.entropy * mask).sum(1)], 1)
    kl_ent = acc.gather(per_seq).mean(0)
    ret_sums = acc.reduce(rl.masked_sums(exp.returns, mask), "sum")
    err_sums = acc.reduce(rl.masked_sums(exp.returns - exp.values, mask), "sum")
    (_, var_ret), (_, var_err) = rl.moments_from_sums(ret_sums), rl.moments_from_sums(err_sums)
    keys = ("policy_loss", "value_loss", "approxkl", "clipfrac")
    train_t = acc.reduce(torch.tensor([train[k] for k in keys] + [train["skipped"], roll.generated_tokens], device=acc.device, dtype=torch.float64), "sum")
    n = acc.num_processes
    return {
        "env/reward_mean": scores.mean().item(),
        "env/reward_std": scores.std(unbiased=False).item(),
        "objective/kl": kl_ent[0].item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": kl_ent[1].item(),
        "ppo/loss/policy": train_t[0].item() / n,
        "ppo/loss/value": train_t[1].item() / n,
        "ppo/policy/approxkl": train_t[2].item() / n,
        "ppo/policy/clipfrac": train_t[3].item() / n,
        "ppo/val/explained_variance": (1 - var_err / var_ret.clamp_min(1e-12)).item(),
        "ppo/returns/mean": (ret_sums[0] / ret_sums[2].clamp_min(1)).item(),
        "ppo/skipped": int(train_t[4].item()),
        "_generated_tokens": train_t[5].item(),
    }


# --- the loop ------------------------------------------------------------------------------------


def run(cfg: PPOConfig, *, resume: bool = False, overwrite: bool = False, reward_fn: Any = None) -> PPOResult:
    """Run PPO; from Python, `reward_fn(queries, responses, response_ids) -> scores` (ppo_scorers.RewardFn)
    replaces the reward model."""
    import torch
    from accelerate import Accelerator

    from camelid.engine import Engine
    from camelid.models.train_load import training_device
    from camelid.train import ppo_state
    from camelid.train.common import prepare_run
    from camelid.train.ppo_policy import build_policy, load_reference
    from camelid.train.ppo_scorers import FunctionScorer, RewardModelScorer
    from camelid.train.tracking import Tracker

    if reward_fn is None and not cfg.reward_model:
        raise CamelidError("give a reward model (--reward-model) or, from Python, a reward function")
    run = prepare_run(cfg, resume=resume, overwrite=overwrite)
    ppo_state.set_threads(cfg.num_threads)
    acc = Accelerator(cpu=training_device().type == "cpu")  # the policy's device: CUDA, mps or the CPU
    torch.manual_seed(cfg.seed)  # the same fresh adapter and value head on every process
    questions = read_questions(cfg)  # bad data and a bad reward model fail before the policy loads
    scorer = FunctionScorer(reward_fn) if reward_fn is not None else RewardModelScorer(cfg.reward_model, cfg.dtype, cfg.reward_batch_size, cfg.reward_load_8bit)
    policy, tok, _ = build_policy(cfg)
    ref = load_reference(cfg)
    prompts = PromptSet(questions, tok, cfg)
    opt = adam([p for p in policy.parameters() if p.requires_grad], cfg.learning_rate)
    model, opt = acc.prepare(policy, opt)
    state = ppo_state.PPOState.fresh(cfg)
    if run.resume_from is not None:
        ppo_state.load_checkpoint(run.resume_from, policy, opt, state)
    if prompts.dropped:
        status(f"ppo: dropped {prompts.dropped} prompts longer than {cfg.max_prompt_tokens} tokens; {len(prompts)} left")
    from camelid.config import to_dict

    tracker = Tracker(run.run_dir, cfg.report_to, to_dict(cfg), resume_step=run.resume_step)
    samples = ppo_state.SamplesFile(run.run_dir, resume_step=run.resume_step, active=acc.is_main_process)
    engine = Engine(policy.lm, tok)
    last: dict[str, float] = {}
    with ppo_state.progress(cfg.steps, state.step, acc.is_main_process) as bar:
        for step in range(state.step + 1, cfg.steps + 1):
            last = ppo_step(step, cfg, state, engine, prompts, scorer, policy, model, ref, opt, acc, tracker, samples)
            state.step = step
            bar.update(1)
            bar.set_postfix({"reward": f"{last['env/reward_mean']:+.3f}", "kl": f"{last['objective/kl']:.3f}"}, refresh=False)
            if step % cfg.save_steps == 0 and step < cfg.steps:
                ppo_state.save_checkpoint(run.run_dir, cfg, policy, opt, state, acc)
    tracker.close()
    adapter_dir, model_dir = ppo_state.save_final(run.run_dir, cfg, policy, tok, acc, prompts.dropped, last)
    return PPOResult(run.run_dir, adapter_dir, model_dir, state.step, last.get("env/reward_mean", float("nan")),
                     last.get("objective/kl", float("nan")), prompts.dropped, policy)


def ppo_step(step, cfg, state, engine, prompts, scorer, policy, model, ref, opt, acc, tracker, samples) -> dict[str, float]:  # noqa: ANN001
    """One PPO step: rollout -> score -> experience -> PPO epochs -> log."""
    import torch

    torch.manual_seed(_step_seed(cfg.seed, step, acc.process_index))  # dropout of this step
    rank, world, b = acc.process_index, acc.num_processes, cfg.batch_size
    t0 = time.perf_counter()
    positions = prompts.positions(step, rank, world, b)
    lengths = state.lengths.sample(world * b)[rank * b : (rank + 1) * b]  # same draws on every process
    policy.eval()
    roll = rollout(engine, prompts, positions, lengths, cfg)
    t1 = time.perf_counter()
    raw = scorer(roll.queries, roll.responses, roll.response_ids).float() - cfg.reward_baseline
    scores = shape_scores(raw, state, cfg, acc)
    t2 = time.perf_counter()
    kl_coef = state.kl_ctl.value
    exp = make_experience(policy, ref, roll, scores, kl_coef, cfg, acc)
    train_stats = ppo_epochs(model, opt, exp, cfg, step, acc)
    t3 = time.perf_counter()
    metrics = step_metrics(exp, raw, train_stats, roll, kl_coef, acc)
    state.kl_ctl.update(metrics["objective/kl"], world * b)
    tokens = metrics.pop("_generated_tokens")
    metrics.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/optimize": t3 - t2, "perf/tokens_per_s": tokens / (t3 - t0)})
    tracker.log(metrics, step)
    if step % cfg.samples_every == 0 or step == 1:
        kl_seq = ((exp.logprobs - exp.ref_logprobs) * exp.batch.mask).sum(1).tolist()
        samples.write(step, roll.queries, roll.responses, raw.tolist(), kl_seq, acc)
    return metrics
