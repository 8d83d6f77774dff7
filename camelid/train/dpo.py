"""`camelid dpo`: direct preference optimisation on the reward model's pairs, beside PPO.

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains the policy on preference pairs directly, with
no reward model and no sampling. With ρ(a) = log π(a|x) − log π_ref(a|x), summed over the
answer's tokens, the loss of a pair (chosen c, rejected r) is

    sigmoid   −log σ(β (ρ(c) − ρ(r)))                        Rafailov et al., eq. 7
    ipo       (h − 1/(2β))²,  h = ρ(c)/|c| − ρ(r)/|r|        Azar et al. 2023 (arXiv:2310.12036), eq. 17,
                                                             averaged per token as TRL does

computed by TRL's DPOTrainer (trl/trainer/dpo_trainer.py, `_compute_loss`; checked against
these formulas in tests/test_dpo.py). The policy is a LoRA on the SFT model (optionally on an
8-bit base, camelid.models.train_load); the reference π_ref is the same model with the adapter
off, so no second copy sits in memory. Pairs: the reward split, prompt `Question: <q>\\n\\nAnswer: `
as in every stage, cut to `max_length` by camelid.train.pairs' length strategy (a whole answer
ends with EOS, a cut one does not). Output as SFT's (camelid.train.common): adapter/, model/,
metrics.jsonl (`dpo/*`: loss, rewards/accuracies, rewards/margins, ...), result.json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from camelid.train.pairs import PairResult, PairSettings, PairTokens

LOSS_TYPES = ("sigmoid", "ipo")
REF_ADAPTER = "ref"
"""The frozen copy of the adapter TRL adds to a peft model given without a reference; removed
here, so the reference is the model with its (fresh) adapter off."""


@dataclass(frozen=True)
class DPOConfig(PairSettings):
    """DPO settings (defaults: start from the SFT run in runs/sft, StackLLaMA 2's DPO rate)."""

    model: str = "runs/sft"
    """Model to start from (and the reference): the SFT run folder (its merged model/), a model folder or a bundled name."""
    out: str = "runs/dpo"
    """Run folder: checkpoints, metrics, adapter/ and the merged model/ go here."""
    learning_rate: float = 5e-4
    """Peak learning rate (AdamW)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (0: the policy's log-probs are those the loss compares with the reference's)."""
    beta: float = 0.1
    """β: how far the policy may move from the reference (larger: less); IPO's regularisation τ."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    train_split: str = "reward"
    """Split of preference pairs to train on (the reward model's)."""
    eval_split: str = "evaluation"
    """Split for the held-out DPO loss and preference accuracy."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass(frozen=True)
class DPOResult(PairResult):
    eval: dict[str, float] | None
    """Held-out figures: loss, reward_accuracy (share of pairs with ρ(c) > ρ(r)), reward_margin (β(ρ(c) − ρ(r)))."""


def _pretokenized(trainer_cls: type) -> type:
    """`trainer_cls` that takes our token ids as they are: TRL's preparation would look for text
    columns and re-tokenize; ours are already cut by the length strategy."""
    columns = {"prompt_ids", "chosen_ids", "rejected_ids"}

    class Pretokenized(trainer_cls):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001 - TRL signature
            if columns <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    Pretokenized.__name__ = Pretokenized.__qualname__ = trainer_cls.__name__
    return Pretokenized


def drop_reference_adapter(model: Any) -> None:
    """Remove the adapter copy TRL adds as the reference: with it gone, TRL computes the
    reference with the adapter off (the SFT model itself), one LoRA pass less per step."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
        model.set_adapter("default")


def build_trainer(cfg: DPOConfig, run: Any, model: Any, tok: Any, train_ds: Any, eval_ds: Any, callbacks: list) -> Any:
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from camelid.logs import quiet_datasets
    from camelid.train.common import keep_trainable_dtype, quiet_trainer, seal_trainer_checkpoints, trainer_arguments

    # disable_dropout=False: our lora_dropout setting decides (0 by default).
    args = trainer_arguments(cfg, TRLDPOConfig, run, max_length=cfg.max_length, beta=cfg.beta,
                             loss_type=[cfg.loss_type], disable_dropout=False, precompute_ref_log_probs=False)
    with quiet_datasets():
        trainer = _pretokenized(DPOTrainer)(model=model, ref_model=None, args=args, train_dataset=train_ds,
                                            eval_dataset=eval_ds, processing_class=tok, callbacks=callbacks)
    drop_reference_adapter(trainer.accelerator.unwrap_model(trainer.model))
    return seal_trainer_checkpoints(quiet_trainer(keep_trainable_dtype(trainer, cfg.dtype)))


def _dataset(pairs: PairTokens, eos: int) -> Any:
    import datasets

    return datasets.Dataset.from_dict(pairs.dpo_rows(eos))


def run(cfg: DPOConfig, *, resume: bool = False, overwrite: bool = False) -> DPOResult:
    """Train, evaluate, save adapter (+ merged model); see the module docstring."""
    from camelid.train.stage import open_run, train_stage, write_result
    from camelid.train.pairs import pair_counts, stage_pairs
    from camelid.utils import status

    path, run, tok = open_run(cfg, "causal_lm", cfg.max_length, resume=resume, overwrite=overwrite)
    train_pairs, eval_pairs = stage_pairs(cfg, tok)
    status(f"dpo: {len(train_pairs)} {cfg.train_split} pairs ({train_pairs.truncated} cut to {cfg.max_length} tokens, "
           f"{train_pairs.dropped} dropped), {len(eval_pairs)} eval pairs; {cfg.loss_type} loss, beta {cfg.beta}")
    eos = tok.eos_token_id
    train_ds = _dataset(train_pairs, eos)
    eval_ds = _dataset(eval_pairs, eos) if len(eval_pairs) else None

    def evaluate(trainer: Any, tracker: Any, tok: Any) -> dict[str, float] | None:
        return held_out_figures(trainer.evaluate()) if eval_ds is not None else None

    t = train_stage(cfg, "dpo", path, run, build_trainer, train_ds, eval_ds, task="causal_lm", seq_length=cfg.max_length,
                    unit="pairs", evaluate=evaluate)
    result = DPOResult(**t.outcome(run), **pair_counts(train_pairs, eval_pairs, t.rate), eval=t.held_out)
    write_result(t, run, result.__dict__)
    return result


def held_out_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation metrics TRL logs, under our names."""
    names = {"eval_loss": "loss", "eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin",
             "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected"}
    return {ours: float(metrics[theirs]) for theirs, ours in names.items() if theirs in metrics}


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.train.stage import add_run_args

    p = sub.add_parser(name, help="direct preference optimisation on preference pairs (LoRA)",
                       description="DPO from the SFT model on (better, worse) answer pairs, the reference being the "
                                   "SFT model itself (the adapter off). Data parallel: the same command under "
                                   "`accelerate launch --num_processes N` or torchrun.")
    add_run_args(p, DPOConfig, "dpo")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from camelid.config import from_args
    from camelid.utils import print0

    r = run(from_args(DPOConfig, args, "dpo"), resume=args.resume, overwrite=args.overwrite)
    print0(f"dpo: {r.steps} steps, train loss {r.train_loss:.4f}, {r.pairs_per_s:.2f} pairs/s")
    if r.eval:
        print0(f"eval on {r.eval_pairs} pairs: loss {r.eval.get('loss', float('nan')):.4f}, "
               f"preference accuracy {r.eval.get('reward_accuracy', float('nan')):.3f}")
    print0(r.saved())
    return 0

