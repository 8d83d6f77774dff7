"""`camelid eval`: base vs SFT vs PPO (and DPO) answers to held-out questions, scored by two judges.

For each question of the dataset's evaluation split (no question there was trained on: the data
stage splits by question), each model answers the prompt `Question: <q>\\n\\nAnswer: `
`answers_per_question` times with the same sampling settings, through the one generation engine;
each model draws its own seeds (answer j of question i from model number m: seed
`seed + SEED_STRIDE·m + i + j·questions`), so its answers are samples of its own. Two reward
models score `Question: <q>\\n\\nAnswer: <a>` (+ EOS, as in their training): the training judge
(the reward model PPO optimised) and a second judge trained on pairs the first never saw
(`camelid reward train --judge-split`), which PPO never saw. Comparisons are paired per question
(camelid.eval.compare). Output:

    OUT/result.json     per model: mean reward under each judge, answer length and repetition;
                        per comparison and judge: per-question win rate with a paired bootstrap
                        interval, sign test, mean reward difference, length-controlled win rate;
                        the verdicts (PPO / DPO vs SFT); KL of PPO and DPO to their reference;
                        each judge's pair accuracy beside the longer-answer baseline
    OUT/samples.jsonl   one line per answer: the models' answers side by side with both judges' scores
    OUT/config.yaml     the resolved config

KL (PPO and DPO): the mean over the model's own answers of Σ_t (log π(a_t|·) − log π_ref(a_t|·)),
teacher-forced through both models at temperature 1, and the same divided by the answer's
tokens. It is the quantity PPO's penalty controls (Ziegler et al. 2019, eq. 2). It is an unbiased estimate of KL(π‖π_ref)
only when answers are sampled from π itself (temperature 1, no top-k/top-p); with other sampling
settings read it as the log-ratio on the answers the user would actually get.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.runfiles import ADAPTER_DIR, CONFIG_FILE, MODEL_DIR, RESULT_FILE, SAMPLES_FILE

MODELS = ("base", "sft", "ppo", "dpo")
ALIGNED = ("ppo", "dpo")
"""Models compared with SFT in the verdict, with a KL to their reference."""
SEED_STRIDE = 1_000_000
"""Seeds of one model's answers lie in [seed + SEED_STRIDE·m, seed + SEED_STRIDE·(m+1)): no two models share one."""
COMPARISONS = (("ppo", "sft"), ("dpo", "sft"), ("sft", "base"), ("ppo", "base"), ("dpo", "base"), ("dpo", "ppo"))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings (defaults: the folders `camelid pipeline` writes under runs/)."""

    data: str = "runs/data"
    """Dataset folder from `camelid data` (its evaluation split holds the held-out questions)."""
    base_model: str = "smollm2-135m"
    """The model before any training: bundled name or model folder."""
    include_base: bool = True
    """Answer with the base model too (the SFT-vs-base view); off, the evaluation costs a third less."""
    sft_model: str = "runs/sft"
    """The SFT model: a `camelid sft` run folder or model folder ('' to skip)."""
    ppo_model: str = "runs/ppo"
    """The PPO model: a `camelid ppo` run folder or model folder ('' to skip)."""
    dpo_model: str = ""
    """The DPO model: a `camelid dpo` run folder or model folder ('' to skip)."""
    reward_model: str = "runs/reward"
    """The training judge: the reward model PPO optimised (a `camelid reward train` run folder or a one-logit classifier)."""
    judge_model: str = ""
    """The second judge: a reward model trained on pairs the training judge never saw, e.g. runs/reward/judge ('' = none: the bar cannot pass)."""
    reference_model: str = ""
    """Reference for the KL of PPO and DPO ('' = the SFT model, their own reference)."""
    out: str = "runs/eval"
    """Output folder: result.json, samples.jsonl, config.yaml."""
    overwrite: bool = False
    """Replace --out even when camelid did not write it (a folder camelid wrote is always replaced)."""
    split: str = "evaluation"
    """Split of held-out questions (and pairs for the judges' accuracy)."""
    max_questions: int = 32
    """Evaluate at most this many distinct questions (0: all)."""
    answers_per_question: int = 4
    """Answers each model gives to each question, each with a seed of its own; a question's score is
    the mean over them (more answers: a steadier per-question score)."""
    bootstrap_resamples: int = 2000
    """Resamples of the questions for the paired win-rate intervals."""
    max_pairs: int = 200
    """Score at most this many pairs for each judge's accuracy (0: all)."""
    max_length: int = 512
    """Longest text a judge reads, in tokens: pair sides for its accuracy are cut to it as in
    training, and a held-out question is cut at its end so that its prompt and an answer of
    max_new_tokens fit it."""
    max_new_tokens: int = 96
    """Longest answer, in tokens."""
    temperature: float = 0.7
    """Sampling temperature, the same for every model (0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling threshold, the same for every model."""
    top_k: int = 0
    """Top-k filter (0: off), the same for every model."""
    seed: int = 0
    """First sampling seed (and the bootstrap's); see the module docstring for each answer's seed."""
    batch_size: int = 8
    """Questions generated (and scored) together."""
    dtype: str = "auto"
    """Model dtype: auto (bfloat16 on GPUs that support it and on CPUs with AMX, else float32), float32, bfloat16."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    num_threads: int = 0
    """torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_pairs", "top_k", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_new_tokens", "batch_size", "max_length", "answers_per_question", "bootstrap_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")
        if not self.reward_model:
            raise ValueError("reward_model is required: the scores come from it")

    def models(self) -> dict[str, str]:
        """The models to compare, by role, skipping the empty ones."""
        return {m: getattr(self, f"{m}_model") for m in MODELS
                if getattr(self, f"{m}_model") and (m != "base" or self.include_base)}

    def judges(self) -> dict[str, str]:
        return {k: v for k, v in (("training", self.reward_model), ("second", self.judge_model)) if v}


@dataclass(frozen=True)
class EvalResult:
    out: Path
    result: dict[str, Any]
    """What result.json holds."""


def held_out_questions(cfg: EvalConfig) -> list[str]:
    """The distinct questions of the evaluation split, in the split's order (deterministic)."""
    from camelid.qa import load_split

    ds = load_split(cfg.data, cfg.split, ("question",))
    questions = list(dict.fromkeys(ds["question"]))
    return questions[: cfg.max_questions] if cfg.max_questions else questions


def fit_questions(questions: list[str], cfg: EvalConfig, model: str | Path) -> tuple[list[str], int]:
    """The questions, each cut at its end (as the pair stages cut them) so that its prompt leaves
    room for `max_new_tokens` within `max_length`; and how many were cut. Real questions run to
    thousands of tokens: uncut, one would widen every batch it lands in and give the judges texts
    far longer than any they were trained on. `model`: whose tokenizer counts (a name or folder)."""
    from camelid.models.train_load import load_tokenizer
    from camelid.train.pairs import fit_question

    room = cfg.max_length - cfg.max_new_tokens
    if room < 1:
        raise CamelidError(f"max_length {cfg.max_length} leaves no room for a question beside max_new_tokens "
                           f"{cfg.max_new_tokens}; raise --max-length")
    tok = load_tokenizer(resolve(model))
    fitted = [fit_question(tok, q, room) for q in questions]
    return fitted, sum(f != q for f, q in zip(fitted, questions))


def resolve(name: str) -> Path:
    """A run folder (its merged model/, else its adapter/), a model folder or a bundled name, as a
    local path (an adapter is merged into its base when loaded)."""
    from camelid.models.resolve import is_adapter_dir, is_hf_dir
    from camelid.models.train_load import resolve_trained

    p = Path(name).expanduser()
    if p.is_dir() and not is_hf_dir(p) and not is_hf_dir(p / MODEL_DIR) and is_adapter_dir(p / ADAPTER_DIR):
        return p / ADAPTER_DIR
    return resolve_trained(name)


def generate_answers(model: str, questions: list[str], cfg: EvalConfig, desc: str, logprobs: bool = False) -> list[dict[str, Any]]:
    """Each prompt n answered by `model` with the shared sampling settings and the model's seed
    `cfg.seed + SEED_STRIDE · MODELS.index(desc) + n`. With `logprobs`, each answer also carries
    "logprob": Σ_t log π(a_t | prompt, a_<t) at temperature 1, from the hidden states its tokens
    were sampled from (the LM head again, not another forward pass)."""
    import torch
    from tqdm.auto import tqdm

    from camelid.engine import Engine, SamplingParams
    from camelid.logs import bars_off
    from camelid.qa import qa_text
    from camelid.train.ppo_batch import head_logprobs

    first = cfg.seed + SEED_STRIDE * MODELS.index(desc)
    engine = Engine.load(str(resolve(model)), device=cfg.device, dtype=model_dtype(cfg.dtype))
    tok = engine.tokenizer
    prompts = [list(tok(qa_text(q))["input_ids"]) for q in questions]  # as PPO's rollouts tokenize them
    # The answers to one question go in the same batch, where the engine prefills its prompt once,
    # and questions of similar length together (a batch is as wide as its longest prompt); each
    # answer keeps its own seed, and `out` its place.
    first_seen = {q: n for n, q in reversed(list(enumerate(questions)))}
    order = sorted(range(len(prompts)), key=lambda n: (len(prompts[n]), first_seen[questions[n]], n))
    out: list[dict[str, Any]] = [{}] * len(prompts)
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=f"eval: {desc} answers", unit="batch", disable=bars_off(),
                      dynamic_ncols=True):
        chunk = order[start : start + cfg.batch_size]
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 max_new_tokens=cfg.max_new_tokens, seed=first + n, return_hidden=logprobs) for n in chunk]
        for n, c in zip(chunk, engine.generate([prompts[n] for n in chunk], params)):
            ids = [t for t in c.token_ids if t not in engine.eos_ids]
            out[n] = {"prompt_ids": prompts[n], "ids": ids, "response_ids": list(c.token_ids),
                      "text": tok.decode(ids, skip_special_tokens=True).strip(), "finish": c.finish_reason}
            if logprobs:
                with torch.no_grad():
                    lp = head_logprobs(engine.model, c.hidden[None], torch.tensor([c.token_ids], device=c.hidden.device))[0]
                out[n]["logprob"] = float(lp.sum())
    del engine
    gc.collect()
    return out


def model_dtype(name: str) -> str:
    """The dtype the evaluated models run in: "auto" as PPO's (bfloat16 on a GPU that supports it
    and on a CPU that multiplies bfloat16 in hardware, else float32). Evaluation decodes wide
    batches, whose products are compute-bound: on a CPU without AMX float32 runs them faster
    than bfloat16 (chat's batch of one is bandwidth-bound, hence its own rule)."""
    from camelid.models.train_load import training_dtype

    return str(training_dtype(name, cpu_bf16=True)).removeprefix("torch.")


def answer_logprobs(model_name: str, answers: list[dict[str, Any]], cfg: EvalConfig) -> list[float]:
    """Σ_t log π(a_t | prompt, a_<t) per answer, teacher-forced at temperature 1 (no gradient);
    each distinct prompt runs once per batch (`train.prefix`)."""
    from camelid.train.prefix import logprobs_shared
    from camelid.models.load import load_for_inference

    lm, tok, _ = load_for_inference(str(resolve(model_name)), device=cfg.device, dtype=model_dtype(cfg.dtype))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    sums = logprobs_shared(lm, [a["prompt_ids"] for a in answers], [a["response_ids"] or [tok.eos_token_id] for a in answers],
                           pad, cfg.batch_size, desc=f"eval: log-probs under {Path(model_name).name}")
    del lm
    gc.collect()
    return sums


def score_answers(rm: Any, tok: Any, questions: list[str], answers: dict[str, list[dict[str, Any]]],
                  batch_size: int, desc: str | None = None) -> dict[str, list[float]]:
    """The judge's score of every model's answers (`questions[n]` is answer n's question); the
    texts answering one question share their prompt's forward pass (`train.prefix`)."""
    from camelid.train.prefix import score_texts_shared
    from camelid.qa import qa_text

    groups: dict[str, list[tuple[str, int]]] = {}
    for m, ans in answers.items():
        for n in range(len(ans)):
            groups.setdefault(questions[n], []).append((m, n))
    texts = [[qa_text(q, answers[m][n]["text"]) for m, n in members] for q, members in groups.items()]
    out = {m: [0.0] * len(ans) for m, ans in answers.items()}
    for members, scores in zip(groups.values(), score_texts_shared(rm, tok, texts, batch_size, desc)):
        for (m, n), score in zip(members, scores):
            out[m][n] = score
    return out


def pair_accuracy(rm: Any, tok: Any, cfg: EvalConfig, judge: Path | None = None) -> dict[str, Any]:
    """The judge's accuracy on the split's pairs (cut to max_length as in training) beside the
    longer-answer baseline. A judge that `camelid reward train` measured on these very pairs
    (`recorded_accuracy`) is not scored again."""
    from camelid.train.pairs import read_pairs
    from camelid.train.reward import evaluate_pairs

    recorded = recorded_accuracy(judge, cfg) if judge is not None else None
    if recorded is not None:
        return recorded
    pairs = read_pairs(cfg.data, cfg.split, tok, cfg.max_length, limit=cfg.max_pairs, seed=cfg.seed)
    if not len(pairs):
        return {"pairs": 0, "dropped": pairs.dropped}
    ids_j, ids_k = pairs.reward_ids(tok.eos_token_id)
    return {**evaluate_pairs(rm, tok, ids_j, ids_k, cfg.batch_size).__dict__, "dropped": pairs.dropped,
            "truncated": pairs.truncated}


def recorded_accuracy(judge: Path, cfg: EvalConfig) -> dict[str, Any] | None:
    """The held-out accuracy a reward run wrote (its result.json), when it was read on the pairs
    `pair_accuracy` would read: same dataset, split, length, pair count and seed. Else None."""
    import json

    import yaml

    run = judge.parent if judge.name == MODEL_DIR else None
    try:
        trained = yaml.safe_load((run / CONFIG_FILE).read_text()) if run else None
        result = json.loads((run / RESULT_FILE).read_text()) if run else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(trained, dict) or not isinstance(result, dict) or not isinstance(result.get("eval"), dict):
        return None
    trained = trained.get("reward", trained)
    same = (Path(str(trained.get("data", ""))).resolve() == Path(cfg.data).resolve()
            and trained.get("eval_split") == cfg.split and trained.get("max_length") == cfg.max_length
            and trained.get("max_eval_samples") == cfg.max_pairs and trained.get("seed") == cfg.seed
            and not trained.get("max_prompt_length"))
    if not same:
        return None
    return {**result["eval"], "dropped": result.get("dropped_eval_pairs", 0), "from": str(run / RESULT_FILE)}


def summarise(questions: list[str], n_questions: int, answers: dict[str, list[dict[str, Any]]],
              rewards: dict[str, dict[str, list[float]]], paths: dict[str, str], cfg: EvalConfig
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-model figures, paired comparisons per judge, verdicts, and the rows of samples.jsonl.
    `rewards[judge][model]`: answer-major scores (answer j to question i at i + j · n_questions)."""
    from camelid.eval.compare import compare, verdict
    from camelid.eval.stats import mean_std, repeated_ngram_share

    lengths = {m: [len(a["ids"]) for a in ans] for m, ans in answers.items()}
    models = {}
    for m, ans in answers.items():
        per_judge = {j: dict(zip(("mean", "std"), mean_std(r[m]))) for j, r in rewards.items()}
        models[m] = {"path": paths[m], "reward_mean": per_judge["training"]["mean"],
                     "reward_std": per_judge["training"]["std"], "reward": per_judge,
                     "length_mean": sum(lengths[m]) / len(ans),
                     "ended_by_eos": sum(a["finish"] == "stop" for a in ans) / len(ans),
                     "rep4": sum(repeated_ngram_share(a["ids"], 4) for a in ans) / len(ans)}
    comparisons = {f"{a}_vs_{b}": {j: compare(r[a], r[b], lengths[a], lengths[b], n_questions,
                                              cfg.bootstrap_resamples, cfg.seed).to_dict() for j, r in rewards.items()}
                   for a, b in COMPARISONS if a in answers and b in answers}
    verdicts = {k: verdict(k.split("_vs_")[0], "sft", c["training"], c.get("second"))
                for k, c in comparisons.items() if k.split("_vs_")[0] in ALIGNED and k.endswith("_vs_sft")}
    rows = []
    for n, q in enumerate(questions):
        row: dict[str, Any] = {"index": n % n_questions, "answer": n // n_questions, "question": q}
        for m in answers:
            row[m], row[f"length_{m}"] = answers[m][n]["text"], lengths[m][n]
            row[f"reward_{m}"] = rewards["training"][m][n]
            if "second" in rewards:
                row[f"judge_{m}"] = rewards["second"][m][n]
        rows.append(row)
    return {"models": models, "comparisons": comparisons, "verdicts": verdicts}, rows


def kl_to_reference(cfg: EvalConfig, model: str, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """KL of a tuned model to its reference on the model's own answers: per answer (sum) and per token."""
    ref = cfg.reference_model or cfg.sft_model
    lp = [a["logprob"] for a in answers] if all("logprob" in a for a in answers) else answer_logprobs(model, answers, cfg)
    lp_ref = answer_logprobs(ref, answers, cfg)
    per_answer = [a - b for a, b in zip(lp, lp_ref)]
    tokens = sum(max(len(a["response_ids"]), 1) for a in answers)
    return {"per_answer": sum(per_answer) / len(per_answer), "per_token": sum(per_answer) / tokens,
            "reference": str(resolve(ref)), "answers": len(per_answer),
            "note": "sum over answer tokens of log pi - log pi_ref, teacher-forced at temperature 1, on the model's own answers"}


def check_reward_model(path: Path) -> None:
    """A one-line error, before any generation, when `path` holds no one-logit classifier."""
    import json

    from camelid.models.resolve import is_adapter_dir, is_hf_dir

    if is_adapter_dir(path) and not is_hf_dir(path):
        ok = json.loads((path / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    else:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        ok = any(a.endswith("ForSequenceClassification") for a in archs)
    if not ok:
        raise CamelidError(f"{path} is not a reward model (no sequence-classification head); "
                           "give the output of `camelid reward train`")


def check_inputs(cfg: EvalConfig) -> dict[str, str]:
    """Resolve every model before any generation: a missing one is a one-line error up front."""
    paths = {m: str(resolve(name)) for m, name in cfg.models().items()}
    if any(m in paths for m in ALIGNED) and not (cfg.reference_model or cfg.sft_model):
        raise CamelidError("the KL of PPO and DPO needs their reference: give --sft-model or --reference-model")
    for judge in cfg.judges().values():
        check_reward_model(resolve(judge))
    if cfg.reference_model:
        resolve(cfg.reference_model)
    return paths


def run(cfg: EvalConfig, *, resume: bool = False, overwrite: bool = False) -> EvalResult:
    """Answer, score, compare; write OUT/result.json, samples.jsonl and config.yaml (atomically).

    The stages' common signature: `overwrite` as `cfg.overwrite`; `resume` changes nothing (the
    folder is written whole or not at all, so a cut-short evaluation starts over)."""
    import json

    from camelid.config import save_config, to_dict
    from camelid.train.common import set_threads
    from camelid.train.reward import load_reward_model
    from camelid.utils import Timer, atomic_dir, check_replaceable, ensure_writable_dir, print0, write_json

    cfg = replace(cfg, overwrite=cfg.overwrite or overwrite)
    set_threads(cfg.num_threads)
    ensure_writable_dir(Path(cfg.out).parent)
    check_replaceable(cfg.out, cfg.overwrite)
    paths = check_inputs(cfg)
    held_out, cut = fit_questions(held_out_questions(cfg), cfg, next(iter(paths.values())))
    # Answer j of question i is prompt i + j * len(held_out): seed `seed + i + j * len(held_out)`.
    questions = held_out * cfg.answers_per_question
    with Timer() as t:
        answers = {m: generate_answers(name, questions, cfg, m, logprobs=m in ALIGNED) for m, name in cfg.models().items()}
        kl = {m: kl_to_reference(cfg, cfg.models()[m], answers[m]) for m in ALIGNED if m in answers}
        rewards, judges = {}, {}
        for role, name in cfg.judges().items():  # one judge in memory at a time
            rm, rm_tok = load_reward_model(str(resolve(name)), cfg.dtype)
            rewards[role] = score_answers(rm, rm_tok, questions, answers, cfg.batch_size, f"eval: {role} judge's scores")
            judges[role] = {"path": str(resolve(name)), "pairs": pair_accuracy(rm, rm_tok, cfg, resolve(name))}
            del rm
            gc.collect()
    figures, rows = summarise(questions, len(held_out), answers, rewards, paths, cfg)
    result = {"questions": len(held_out), "questions_cut": cut, "answers_per_question": cfg.answers_per_question,
              "split": cfg.split, "reward_model": judges["training"]["path"], "judges": judges,
              "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                           "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                           "seeds": f"model m's answer j to question i: seed + {SEED_STRIDE}*m + i + j*questions, "
                                    f"m in {list(MODELS)}"},
              **figures, "kl": kl, "rm_pairs": judges["training"]["pairs"], "seconds": t.seconds}
    with atomic_dir(cfg.out, cfg.overwrite) as tmp:
        write_json(tmp / RESULT_FILE, result)
        (tmp / SAMPLES_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        save_config(cfg, tmp / CONFIG_FILE)
    for line in summary_lines(result):
        print0(line)
    return EvalResult(Path(cfg.out), {**result, "config": to_dict(cfg)})


def summary_lines(result: dict[str, Any]) -> list[str]:
    k = result.get("answers_per_question", 1)
    cut = result.get("questions_cut", 0)
    lines = [f"eval: {result['questions']} held-out questions" + (f" ({cut} cut to fit the judges' length)" if cut else "")
             + (f", {k} answers to each" if k > 1 else "")]
    for m, v in result["models"].items():
        second = (v.get("reward") or {}).get("second")
        lines.append(f"  {m:<5} reward {v['reward_mean']:+.3f} ± {v['reward_std']:.3f}"
                     + (f" (second judge {second['mean']:+.3f})" if second else "")
                     + f"   length {v['length_mean']:.1f} tokens   repeated 4-grams {v['rep4']:.3f}")
    for name, v in (result.get("verdicts") or {}).items():
        lines += [f"  {line}" for line in v["lines"]] + [f"  verdict {name.replace('_', ' ')}: "
                                                          f"{'PASS' if v['passed'] else 'FAIL'} ({v['bar']})"]
    for m, kl in (result.get("kl") or {}).items():
        lines.append(f"  KL({m.upper()} || reference): {kl['per_answer']:.3f} nats per answer, {kl['per_token']:.4f} per token")
    for role, j in (result.get("judges") or {}).items():
        p = j["pairs"]
        if p.get("pairs"):
            lines.append(f"  {role} judge on {p['pairs']} held-out pairs: accuracy {p['accuracy']:.3f} "
                         f"(longer answer wins: {p['longer_wins_accuracy']:.3f})")
    return lines
