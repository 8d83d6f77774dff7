"""`camelid reward train` / `camelid reward score`: the pairwise reward model (StackLLaMA stage 2).

A sequence classifier with one output, started from the SFT model, scores
`Question: <q>\\n\\nAnswer: <a>` + EOS. Trained with TRL's RewardTrainer on (response_j, response_k)
pairs of the reward split; its loss (trl/trainer/reward_trainer.py, `compute_loss`, checked
in tests/test_reward.py) is the Bradley-Terry pairwise loss of InstructGPT (Ouyang et al. 2022,
eq. 1): mean over pairs of -log sigmoid(r_j - r_k). LoRA (peft task SEQ_CLS) with the new
`score` head trained in full. Pairs longer than `max_length` tokens are cut to fit, both answers
to the same budget (camelid.train.pairs); a run with too few pairs left refuses to start.

Second judge (`judge_split`): a reward model trained the same way on another split's pairs, whose
questions the training judge (and DPO, which trains on the reward split) never saw, written to
OUT/judge. PPO optimises against the training judge; `camelid eval` scores with both, so a policy
that only learnt the training judge's quirks shows as a disagreement between them.

Evaluation on the evaluation split: accuracy (share of pairs with r_j > r_k), mean margin
r_j - r_k, and the accuracy of the "longer answer wins" baseline on the same pairs, because
answer length alone predicts Stack Exchange votes well; a reward model should beat it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from camelid.errors import CamelidError
from camelid.qa import qa_text
from camelid.runfiles import JUDGE_DIR
from camelid.train.pairs import PairResult, PairSettings


@dataclass(frozen=True)
class RewardConfig(PairSettings):
    """Reward-model settings (defaults: start from the SFT run in runs/sft, a short CPU run)."""

    model: str = "runs/sft"
    """Model to start from: the SFT run folder (its merged model/), a model folder or a bundled name."""
    out: str = "runs/reward"
    """Run folder: checkpoints, metrics, adapter/ and the merged model/ go here."""
    learning_rate: float = 2e-5
    """Peak learning rate (AdamW)."""
    eval_split: str = "evaluation"
    """Split for accuracy, margin and the longer-answer baseline."""
    judge_split: str = ""
    """Also train a second judge on this split's pairs (questions disjoint from train_split) into OUT/judge ('' = none)."""
    judge_steps: int = 0
    """The second judge's optimizer steps (0: max_steps). It only has to rank answers, not give PPO a margin to climb."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.judge_steps < 0:
            raise ValueError(f"judge_steps must be >= 0, got {self.judge_steps}")
        if self.judge_split and self.judge_split in (self.train_split, self.eval_split):
            raise ValueError(f"judge_split must differ from train_split and eval_split, got {self.judge_split!r}")


@dataclass(frozen=True)
class PairEval:
    """Reward-model figures on a set of pairs."""

    pairs: int
    accuracy: float
    mean_margin: float
    loss: float
    longer_wins_accuracy: float


@dataclass(frozen=True)
class RewardResult(PairResult):
    dropped_eval_pairs: int
    eval: PairEval | None
    train_split: str = "reward"


def pairwise_loss(r_j: Any, r_k: Any) -> Any:
    """-log sigmoid(r_j - r_k), averaged over pairs. r_j, r_k: float tensors of shape (pairs,).

    logsigmoid, not log(sigmoid()): finite for any margin (InstructGPT eq. 1; TRL RewardTrainer)."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_j - r_k).mean()


def score_ids(model: Any, tok: Any, ids: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """The model's scalar reward for each token list (right-padded batches, no gradient)."""
    import torch

    device = next(model.parameters()).device
    # Batches of similar lengths (little padding to compute); scores return in the given order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            batch = [ids[i] for i in rows]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, x in enumerate(batch):
                input_ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = _scores(model, input_ids.to(device), mask.to(device))
            for i, score in zip(rows, logits[:, 0].float().cpu().tolist()):
                out[i] = score
    model.train(was_training)
    return out


def _scores(model: Any, input_ids: Any, mask: Any) -> Any:
    """The score head's output (B, 1) for right-padded rows: the model's forward, or on a CPU the
    training pass's decoder (`camelid.cpu.decoder_hidden`, which needs no padding mask for
    right-padded rows) at the token transformers' sequence classifier pools, the rightmost one
    that is not the padding id, and the head there (the same numbers, in fewer operations)."""
    import torch

    from camelid import cpu
    from camelid.models.lora import unwrap

    inner = unwrap(model)
    pad = getattr(inner.config, "pad_token_id", None)
    hidden = None
    if pad is not None and hasattr(inner, "score"):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * (input_ids != pad)).argmax(-1)
        hidden = cpu.decoder_hidden(model, input_ids, last[:, None])  # (B, 1, H); the last layer at that row alone
    if hidden is None:
        return model(input_ids=input_ids, attention_mask=mask).logits
    return inner.score(hidden[:, 0])


def score_texts(model: Any, tok: Any, texts: Sequence[str], batch_size: int = 8) -> list[float]:
    """Rewards for full texts (`Question: ...\\n\\nAnswer: ...`); EOS is appended as in training."""
    ids = [x + [tok.eos_token_id] for x in tok(list(texts))["input_ids"]]
    return score_ids(model, tok, ids, batch_size)


def evaluate_pairs(model: Any, tok: Any, ids_j: list[list[int]], ids_k: list[list[int]], batch_size: int = 8) -> PairEval:
    """Accuracy, mean margin and loss of the model on the pairs, beside the longer-answer baseline
    (token length; a tie counts half, as a coin flip would)."""
    import torch

    r_j = torch.tensor(score_ids(model, tok, ids_j, batch_size))
    r_k = torch.tensor(score_ids(model, tok, ids_k, batch_size))
    longer = [1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0 for a, b in zip(ids_j, ids_k)]
    return PairEval(
        pairs=len(ids_j),
        accuracy=float((r_j > r_k).float().mean()),
        mean_margin=float((r_j - r_k).mean()),
        loss=float(pairwise_loss(r_j, r_k)),
        longer_wins_accuracy=sum(longer) / len(longer),
    )


def load_reward_model(name: str, dtype: str = "auto", load_8bit: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained reward model, in eval mode, on the training device.

    `name`: a reward run folder (its merged model/), a merged model folder, or an adapter/ folder
    (merged on load, so not in 8 bits). On a CPU in 16 bits, attention runs in float32, as PPO's
    policy has it: the scoring path (score_ids) then runs the CPU pass, and the model's own
    forward computes the same (`camelid.cpu.prepare_for_scoring`)."""
    from camelid.models.merge import load_merged
    from camelid.models.resolve import is_adapter_dir, is_hf_dir
    from camelid.models.train_load import load_base, resolve_trained

    path = resolve_trained(name)
    if is_adapter_dir(path) and not is_hf_dir(path):
        if load_8bit:
            raise CamelidError(f"{path} is a LoRA adapter; an 8-bit reward model loads from a merged one: `camelid merge {path} --out DIR`")
        model, tok = load_merged(path, dtype)
    else:
        model, tok, _ = load_base(path, task="seq_cls", dtype=dtype, load_8bit=load_8bit)
        archs = getattr(model.config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise CamelidError(f"{path} is not a reward model (it has no trained score head); give the output of `camelid reward train`")
    from camelid import cpu

    return cpu.prepare_for_scoring(model).eval(), tok


def build_trainer(cfg: RewardConfig, run: Any, model: Any, tok: Any, train_ds: Any, eval_ds: Any, callbacks: list) -> Any:
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from camelid.logs import quiet_datasets
    from camelid.train.common import keep_trainable_dtype, quiet_trainer, seal_trainer_checkpoints, trainer_arguments

    # disable_dropout=False: TRL's default would zero the LoRA dropout our settings ask for.
    args = trainer_arguments(cfg, TRLRewardConfig, run, max_length=cfg.max_length, center_rewards_coefficient=None,
                             disable_dropout=False)
    with quiet_datasets():
        trainer = _bucketed(RewardTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                           processing_class=tok, callbacks=callbacks)
    return seal_trainer_checkpoints(quiet_trainer(keep_trainable_dtype(trainer, cfg.dtype)))


LENGTH_BUCKETS = 2
"""Forward passes per reward batch, each over rows of similar length (see `_bucketed`)."""


def _bucketed(trainer_cls: type) -> type:
    """`trainer_cls` whose model forward runs the batch's chosen + rejected rows in LENGTH_BUCKETS
    passes of similar lengths, each padded only to its own longest row.

    TRL pads all 2 x batch rows to the longest one; on the sample's pairs that is 58% real
    tokens, and 78% with two buckets. Right padding and causal attention make a row's reward
    independent of its padding, so the logits (returned in TRL's row order) are the same.
    Single process only: under DDP a second forward before backward would trip its reducer.
    """
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    class Bucketed(trainer_cls):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) or inputs["input_ids"].shape[0] < 2 * LENGTH_BUCKETS:
                return super().compute_loss(model, inputs, *args, **kwargs)

            def forward(input_ids, attention_mask, **rest):
                lengths = attention_mask.sum(1)
                order = lengths.argsort(stable=True)
                logits = []
                for idx in order.chunk(LENGTH_BUCKETS):
                    width = int(lengths[idx].max())
                    out = model(input_ids=input_ids[idx, :width], attention_mask=attention_mask[idx, :width], **rest)
                    logits.append(out.logits)
                return SequenceClassifierOutputWithPast(logits=torch.cat(logits)[order.argsort()])

            return super().compute_loss(forward, inputs, *args, **kwargs)

    Bucketed.__name__ = Bucketed.__qualname__ = trainer_cls.__name__
    return Bucketed


def train_model(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False) -> RewardResult:
    """Train one reward model, evaluate it, save adapter (+ merged model); see the module docstring."""
    import datasets

    from camelid.train.stage import open_run, train_stage, write_result
    from camelid.train.pairs import pair_counts, stage_pairs
    from camelid.utils import status, write_json

    path, run, tok = open_run(cfg, "seq_cls", cfg.max_length, resume=resume, overwrite=overwrite)
    train_pairs, eval_pairs = stage_pairs(cfg, tok)
    if not len(eval_pairs):  # the stage reports its accuracy on them
        raise CamelidError(f"every {cfg.eval_split} pair has the same two answers once cut to max_length={cfg.max_length} "
                           "tokens; raise --max-length")
    (tj, tk), (ej, ek) = train_pairs.reward_ids(tok.eos_token_id), eval_pairs.reward_ids(tok.eos_token_id)
    t_drop, e_drop = train_pairs.dropped, eval_pairs.dropped
    status(f"reward: {len(tj)} {cfg.train_split} pairs ({train_pairs.truncated} cut to {cfg.max_length} tokens, "
           f"{t_drop} dropped), {len(ej)} eval pairs ({eval_pairs.truncated} cut, {e_drop} dropped)")
    train_ds = datasets.Dataset.from_dict({"chosen_ids": tj, "rejected_ids": tk})
    eval_ds = datasets.Dataset.from_dict({"chosen_ids": ej, "rejected_ids": ek}) if cfg.eval_steps else None

    def evaluate(trainer: Any, tracker: Any, tok: Any) -> PairEval | None:
        """Accuracy and margin on the evaluation pairs (main process), logged with the pair counts."""
        result_eval = None
        if trainer.accelerator.is_main_process:
            result_eval = evaluate_pairs(trainer.accelerator.unwrap_model(trainer.model), tok, ej, ek, cfg.batch_size)
            tracker.log({f"reward/eval_{k}": v for k, v in result_eval.__dict__.items()} |
                        {"reward/dropped_train_pairs": t_drop, "reward/dropped_eval_pairs": e_drop,
                         "reward/truncated_train_pairs": train_pairs.truncated},
                        trainer.state.global_step)
        trainer.accelerator.wait_for_everyone()
        return result_eval

    t = train_stage(cfg, "reward", path, run, build_trainer, train_ds, eval_ds, task="seq_cls", seq_length=cfg.max_length,
                    unit="pairs", evaluate=evaluate)
    result = RewardResult(**t.outcome(run), **pair_counts(train_pairs, eval_pairs, t.rate), dropped_eval_pairs=e_drop,
                          eval=t.held_out, train_split=cfg.train_split)
    write_result(t, run, {**result.__dict__, "eval": getattr(t.held_out, "__dict__", None)})
    if t.trainer.accelerator.is_main_process:
        write_json(run.run_dir / TRAIN_QUESTIONS, {"split": cfg.train_split, "qids": sorted(set(train_pairs.qids))})
    return result


TRAIN_QUESTIONS = "train_questions.json"
"""The question ids a reward model trained on (which questions a judge has seen)."""


def judge_config(cfg: RewardConfig) -> RewardConfig:
    """The second judge's settings: the training judge's, on `judge_split`, into OUT/judge, for
    `judge_steps` steps when set (checkpoints no further apart than in the training judge's run)."""
    from dataclasses import replace

    steps = cfg.judge_steps or cfg.max_steps
    return replace(cfg, train_split=cfg.judge_split, judge_split="", judge_steps=0, max_steps=steps,
                   save_steps=min(cfg.save_steps, steps) if steps else cfg.save_steps, out=str(Path(cfg.out) / JUDGE_DIR))


def check_disjoint(data: str, split_a: str, split_b: str) -> None:
    """A one-line error when two splits share a question id: a judge must not have seen the other's questions."""
    from camelid.qa import load_split

    a, b = (set(load_split(data, s, ("qid",))["qid"]) for s in (split_a, split_b))
    shared = a & b
    if shared:
        raise CamelidError(f"the {split_a} and {split_b} splits share {len(shared)} question(s) (qid {min(shared)}, ...); "
                           "the second judge must train on questions the training judge never saw: choose another "
                           "--judge-split or rebuild the dataset")


def run(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False) -> RewardResult:
    """The reward stage: the training judge (`train_model`) and, with `judge_split`, the second
    judge in OUT/judge; returns the training judge's result (the second judge's is in
    OUT/judge/result.json)."""
    if cfg.judge_split:
        check_disjoint(cfg.data, cfg.train_split, cfg.judge_split)
    result = train_model(cfg, resume=resume, overwrite=overwrite)
    if cfg.judge_split:
        train_model(judge_config(cfg), resume=resume, overwrite=overwrite)
    return result


def read_score_inputs(text: str | None, file: str | None) -> list[dict[str, Any]]:
    """Rows to score: one text, or a jsonl file of {"text"} or {"question", "answer"} objects."""
    if (text is None) == (file is None):
        raise CamelidError("give either a TEXT or --file FILE.jsonl")
    if text is not None:
        return [{"text": text.replace("\\n", "\n")}]
    path = Path(file)
    if not path.is_file():
        raise CamelidError(f"{path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise CamelidError(f"{path}:{n} is not valid JSON") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            rows.append(row)
        elif isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
            rows.append({**row, "text": qa_text(row["question"], row["answer"])})
        else:
            raise CamelidError(f'{path}:{n}: each line needs "text", or "question" and "answer"')
    if not rows:
        raise CamelidError(f"{path} holds no rows")
    return rows


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.train.stage import add_run_args

    p = sub.add_parser(name, help="train or apply a pairwise reward model")
    rsub = p.add_subparsers(dest="reward_command", metavar="{train,score}")
    t = rsub.add_parser("train", help="train a reward model on preference pairs (LoRA, pairwise loss)",
                        description="Train a one-output sequence classifier on (better, worse) answer pairs with "
                                    "loss -log sigmoid(r_j - r_k). Data parallel: the same command under "
                                    "`accelerate launch --num_processes N` or torchrun.")
    add_run_args(t, RewardConfig, "reward")
    t.set_defaults(func=_cli_train)
    s = rsub.add_parser("score", help="print reward scores for a text or a jsonl file")
    s.add_argument("text", nargs="?", help='a full text, e.g. "Question: ...\\n\\nAnswer: ..." (\\n is unescaped)')
    s.add_argument("--model", required=True, help="reward run folder, its model/ or adapter/ folder")
    s.add_argument("--file", help='jsonl with {"text": ...} or {"question": ..., "answer": ...} per line')
    s.add_argument("--batch-size", type=int, default=8)
    s.set_defaults(func=_cli_score)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _cli_train(args: argparse.Namespace) -> int:
    from camelid.config import from_args
    from camelid.utils import print0

    cfg = from_args(RewardConfig, args, "reward")
    r = run(cfg, resume=args.resume, overwrite=args.overwrite)
    print0(f"reward: {r.steps} steps, train loss {r.train_loss:.4f}, {r.pairs_per_s:.2f} pairs/s")
    if r.eval is not None:
        print0(f"eval on {r.eval.pairs} pairs: accuracy {r.eval.accuracy:.3f}, mean margin {r.eval.mean_margin:.3f}, "
               f"loss {r.eval.loss:.4f}; longer-answer-wins baseline {r.eval.longer_wins_accuracy:.3f}")
    print0(r.saved(chat=False))
    if cfg.judge_split:
        print0(f"second judge (trained on the {cfg.judge_split} split): {judge_config(cfg).out}")
    return 0


def _cli_score(args: argparse.Namespace) -> int:
    rows = read_score_inputs(args.text, args.file)
    model, tok = load_reward_model(args.model)
    scores = score_texts(model, tok, [r["text"] for r in rows], args.batch_size)
    if args.file is None:
        print(f"{scores[0]:.4f}")
    else:
        for row, sc in zip(rows, scores):
            sys.stdout.write(json.dumps({**row, "score": round(sc, 6)}, ensure_ascii=False) + "\n")
    return 0
