"""`camelid sft`: supervised fine-tuning with packing and LoRA (StackLLaMA's first stage).

Texts are `Question: <question>\\n\\nAnswer: <answer>` from the finetune split (`response_j`
of each pair, each distinct answer once) or from the unpaired answers table; they are
shuffled, joined with EOS and cut into blocks of exactly `seq_length` tokens
(camelid.data.packing), then trained with TRL's SFTTrainer on a LoRA model from
camelid.models.train_load. Evaluation: loss and perplexity on the evaluation split, packed
the same way. Output: see camelid.train.common (adapter/, model/, metrics.jsonl, result.json).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from camelid.errors import CamelidError
from camelid.qa import qa_text
from camelid.train.common import TrainSettings
from camelid.train.stage import StageResult

TEXT_SOURCES = ("finetune", "answers")
MAX_LOG_PERPLEXITY = 50.0
"""The eval loss is capped here before exp(): a diverged run reports a huge perplexity, not inf."""


@dataclass(frozen=True)
class SFTConfig(TrainSettings):
    """Supervised fine-tuning settings (defaults: the bundled model, a short CPU run)."""

    out: str = "runs/sft"
    """Run folder: checkpoints, metrics, adapter/ and the merged model/ go here."""
    seq_length: int = 512
    """Tokens per packed block (texts joined with EOS, no padding)."""
    text_source: str = "finetune"
    """Training texts: finetune (the better answer of each finetune pair) or answers (unpaired answers of the finetune split)."""
    answers_min_score: int = 1
    """With text_source=answers: keep answers scored at least this (StackLLaMA score)."""
    eval_split: str = "evaluation"
    """Split for the evaluation loss and perplexity."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_length < 8:
            raise ValueError(f"seq_length must be >= 8, got {self.seq_length}")
        if self.text_source not in TEXT_SOURCES:
            raise ValueError(f"text_source must be one of {', '.join(TEXT_SOURCES)}, got {self.text_source!r}")


@dataclass(frozen=True)
class SFTResult(StageResult):
    train_blocks: int
    eval_blocks: int
    eval_loss: float | None
    perplexity: float | None
    tokens_per_s: float


def sft_texts(cfg: SFTConfig, split: str, limit: int) -> list[str]:
    """The shuffled (seeded) training or evaluation texts; each (question, answer) once."""
    from camelid.qa import load_split

    if cfg.text_source == "answers" and split == "finetune":
        ds = load_split(cfg.data, "answers", ("question", "response", "score", "split"))
        ds = ds.filter(lambda r: r["split"] == "finetune" and r["score"] >= cfg.answers_min_score)
        pairs = zip(ds["question"], ds["response"])
    else:
        ds = load_split(cfg.data, split, ("question", "response_j"))
        pairs = zip(ds["question"], ds["response_j"])
    # A question with n answers gives up to n-1 pairs whose response_j repeats; count each once.
    texts = list(dict.fromkeys(qa_text(q, a) for q, a in pairs))
    if not texts:
        raise CamelidError(f"no {split} texts in {cfg.data} (answers_min_score={cfg.answers_min_score}?)")
    import random

    random.Random(cfg.seed).shuffle(texts)
    return texts[:limit] if limit else texts


def packed_dataset(texts: list[str], tok: Any, seq_length: int) -> Any:
    import datasets

    from camelid.data.packing import pack_texts

    blocks = pack_texts(texts, tok, seq_length)
    return datasets.Dataset.from_dict({"input_ids": blocks.tolist()})


def build_trainer(cfg: SFTConfig, run: Any, model: Any, tok: Any, train_ds: Any, eval_ds: Any, callbacks: list) -> Any:
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from camelid.logs import quiet_datasets
    from camelid.train.common import keep_trainable_dtype, quiet_trainer, seal_trainer_checkpoints, trainer_arguments

    args = trainer_arguments(
        cfg, TRLSFTConfig, run,
        max_length=cfg.seq_length,
        packing=False,  # the blocks are packed already, exactly (camelid.data.packing)
        shuffle_dataset=False,  # the Trainer's seeded sampler shuffles the blocks every epoch
        dataset_num_proc=None,
    )
    with quiet_datasets():
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, callbacks=callbacks)
    return seal_trainer_checkpoints(quiet_trainer(keep_trainable_dtype(trainer, cfg.dtype)))


def run(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False) -> SFTResult:
    """Train, evaluate, save adapter (+ merged model); see the module docstring."""
    from camelid.train.stage import open_run, train_stage, write_result
    from camelid.utils import status

    path, run, tok = open_run(cfg, "causal_lm", cfg.seq_length, resume=resume, overwrite=overwrite)
    train_ds = packed_dataset(sft_texts(cfg, "finetune", cfg.max_train_samples), tok, cfg.seq_length)
    if len(train_ds) == 0:
        raise CamelidError(f"the training texts fill less than one block of {cfg.seq_length} tokens; lower --seq-length or add data")
    eval_ds = packed_dataset(sft_texts(cfg, cfg.eval_split, cfg.max_eval_samples), tok, cfg.seq_length)
    if len(eval_ds) == 0:
        status(f"warning: the {cfg.eval_split} texts fill less than one block; no evaluation")
        eval_ds = None
    status(f"sft: {len(train_ds)} train blocks, {len(eval_ds or [])} eval blocks of {cfg.seq_length} tokens")

    def evaluate(trainer: Any, tracker: Any, tok: Any) -> tuple[float | None, float | None]:
        """(eval loss, perplexity) on the evaluation blocks; the perplexity is logged too."""
        eval_loss = (trainer.evaluate() if eval_ds is not None else {}).get("eval_loss")
        ppl = math.exp(min(eval_loss, MAX_LOG_PERPLEXITY)) if eval_loss is not None else None
        if ppl is not None:
            tracker.log({"sft/eval_perplexity": ppl}, trainer.state.global_step)
        return eval_loss, ppl

    t = train_stage(cfg, "sft", path, run, build_trainer, train_ds, eval_ds, task="causal_lm", seq_length=cfg.seq_length,
                    unit="tokens", units_per_row=cfg.seq_length, evaluate=evaluate)
    eval_loss, ppl = t.held_out
    result = SFTResult(**t.outcome(run), train_blocks=len(train_ds), eval_blocks=len(eval_ds or []), eval_loss=eval_loss,
                       perplexity=ppl, tokens_per_s=t.rate)
    write_result(t, run, result.__dict__)
    return result


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.train.stage import add_run_args

    p = sub.add_parser(name, help="supervised fine-tuning with packing (LoRA)",
                       description="Supervised fine-tuning on `Question: ...\\n\\nAnswer: ...` texts, packed into "
                                   "constant-length blocks, with LoRA on a float or 8-bit base. Data parallel: run "
                                   "the same command under `accelerate launch --num_processes N` or torchrun.")
    add_run_args(p, SFTConfig, "sft")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from camelid.config import from_args
    from camelid.utils import print0

    cfg = from_args(SFTConfig, args, "sft")
    r = run(cfg, resume=args.resume, overwrite=args.overwrite)
    ppl = f", eval loss {r.eval_loss:.4f}, perplexity {r.perplexity:.2f}" if r.eval_loss is not None else ""
    print0(f"sft: {r.steps} steps, train loss {r.train_loss:.4f}{ppl}, {r.tokens_per_s:.0f} tokens/s")
    print0(r.saved())
    return 0
