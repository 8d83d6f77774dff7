"""Preference pairs as token ids for the reward model and DPO: the length strategy and the
minimum of data a training stage needs.

Length strategy. Stack Exchange answers are long: dropping every pair with a side over
`max_length` tokens left 3 of 171 pairs of a real dump at 256 tokens. Instead each pair is cut
to fit, both sides alike:

- the prompt `Question: <q>\\n\\nAnswer:` is kept whole up to `max_prompt` tokens; a longer
  question loses its end (the template around it stays);
- each answer is cut to the budget left, `max_length - prompt - 1` tokens (one for EOS), the same
  budget for both answers, so a pair compares the two answers over the same prompt;
- a pair whose two answers are the same after the cut carries no preference and is dropped
  (counted).

The prompt ids are the tokens the prompt shares with the tokenized full text (as TRL's DPO
tokenizer takes them), so `prompt + answer` is exactly the full text's tokenization, cut at the
end: the reward model trains on the ids `score_texts` gives a whole answer at evaluation.

Minimum. A stage refuses, with a one-line error naming the flag to change, when fewer than
`min_pairs` pairs (MIN_PAIRS by default) or less than MIN_KEPT_SHARE of its input are left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from camelid.errors import CamelidError
from camelid.train.common import TrainSettings
from camelid.train.stage import StageResult
from camelid.utils import shared_start

MIN_PAIRS = 50
"""Fewest training pairs a reward model or DPO run may learn from (their `min_pairs` default)."""
MIN_KEPT_SHARE = 0.5
"""Least share of the input pairs that must be left after the length strategy."""
QUESTION_CUT_TRIES = 8
"""Re-tokenizations allowed to fit a long question under the prompt cap (one or two suffice)."""


MIN_LENGTH = 8
"""Shortest max_length a pair stage accepts: room for the template, a little question and answer."""


@dataclass(frozen=True)
class PairSettings(TrainSettings):
    """Settings of a stage that trains on preference pairs (reward model, DPO)."""

    max_length: int = 512
    """Longest prompt + answer, in tokens; longer answers are cut to fit (both to the same budget)."""
    max_prompt_length: int = 0
    """Longest prompt (question + template), in tokens; a longer question loses its end (0: half of max_length)."""
    min_pairs: int = MIN_PAIRS
    """Refuse to train on fewer pairs than this (too little to learn from)."""
    train_split: str = "reward"
    """Split of preference pairs to train on."""
    eval_split: str = "evaluation"
    """Held-out split of pairs the stage reports its figures on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < MIN_LENGTH or self.min_pairs < 1 or self.max_prompt_length < 0:
            raise ValueError(f"need max_length >= {MIN_LENGTH}, min_pairs >= 1 and max_prompt_length >= 0")


@dataclass(frozen=True)
class PairResult(StageResult):
    """A pair stage's result: the run's outcome and its pair counts."""

    train_pairs: int
    dropped_train_pairs: int
    truncated_train_pairs: int
    eval_pairs: int
    pairs_per_s: float


def pair_counts(train: PairTokens, held_out: PairTokens, pairs_per_s: float) -> dict[str, Any]:
    """PairResult's counts of a run on these pairs."""
    return {"train_pairs": len(train), "dropped_train_pairs": train.dropped, "truncated_train_pairs": train.truncated,
            "eval_pairs": len(held_out), "pairs_per_s": pairs_per_s}


def default_max_prompt(max_length: int) -> int:
    """The prompt cap when none is given: half the length, leaving the other half to the answers."""
    return max_length // 2


@dataclass
class PairTokens:
    """Pairs as token ids: prompt, and each answer cut to the shared budget (no EOS appended)."""

    prompt: list[list[int]] = field(default_factory=list)
    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)
    chosen_whole: list[bool] = field(default_factory=list)
    """The chosen answer fit its budget uncut."""
    rejected_whole: list[bool] = field(default_factory=list)
    qids: list[Any] = field(default_factory=list)
    """Question id of each kept pair (`qid` column; the question text where there is none)."""
    inputs: int = 0
    """Pairs read (kept + dropped)."""
    dropped: int = 0
    """Pairs whose answers were the same after the cut."""
    truncated: int = 0
    """Kept pairs with at least one answer cut."""
    questions_cut: int = 0
    """Kept pairs whose question was cut to the prompt cap."""

    def __len__(self) -> int:
        return len(self.prompt)

    def reward_ids(self, eos: int) -> tuple[list[list[int]], list[list[int]]]:
        """(chosen, rejected) full sequences for the reward model: prompt + answer + EOS. The score
        is read at the end, so every side ends with EOS, cut or whole, as `score_texts` scores."""
        return ([p + a + [eos] for p, a in zip(self.prompt, self.chosen)],
                [p + a + [eos] for p, a in zip(self.prompt, self.rejected)])

    def dpo_rows(self, eos: int) -> dict[str, list[list[int]]]:
        """Columns for TRL's preference collator. EOS ends a whole answer only: after a cut one
        the text goes on, and teaching the policy to stop there would teach it to stop mid-answer."""
        return {"prompt_ids": self.prompt,
                "chosen_ids": [a + [eos] if w else a for a, w in zip(self.chosen, self.chosen_whole)],
                "rejected_ids": [a + [eos] if w else a for a, w in zip(self.rejected, self.rejected_whole)]}


def fit_question(tok: Any, question: str, max_prompt: int) -> str:
    """`question`, cut at its end so that the prompt `Question: <q>\\n\\nAnswer: ` takes at most
    `max_prompt` tokens (the whole question when it fits)."""
    from camelid.qa import qa_text

    need = len(tok(qa_text(question))["input_ids"])
    if need <= max_prompt:
        return question
    template = len(tok(qa_text(""))["input_ids"])
    if template > max_prompt:
        raise CamelidError(f"the prompt template alone takes {template} tokens, over the prompt cap of {max_prompt}; "
                           "raise --max-length (or --max-prompt-length)")
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    keep = max(len(q_ids) - (need - max_prompt), 0)
    for _ in range(QUESTION_CUT_TRIES):
        cut = tok.decode(q_ids[:keep]).rstrip()
        over = len(tok(qa_text(cut))["input_ids"]) - max_prompt
        if over <= 0:
            return cut
        keep = max(keep - over, 0)
    return ""


def tokenize_pairs(questions: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], tok: Any,
                   max_length: int, max_prompt: int = 0, qids: Sequence[Any] | None = None) -> PairTokens:
    """The pairs cut to `max_length` tokens by the module's length strategy (`max_prompt` 0: half)."""
    from camelid.qa import qa_text

    max_prompt = max_prompt or default_max_prompt(max_length)
    if not 0 < max_prompt < max_length:
        raise CamelidError(f"the prompt cap ({max_prompt}) must be below max_length ({max_length}); "
                           "lower --max-prompt-length or raise --max-length")
    heads = tok([qa_text(q) for q in questions])["input_ids"]
    fitted = list(questions)
    for i in (i for i, h in enumerate(heads) if len(h) > max_prompt):  # few: tokenized again one by one
        fitted[i] = fit_question(tok, questions[i], max_prompt)
        heads[i] = tok(qa_text(fitted[i]))["input_ids"]
    full_j = tok([qa_text(q, a) for q, a in zip(fitted, chosen)])["input_ids"]
    full_k = tok([qa_text(q, a) for q, a in zip(fitted, rejected)])["input_ids"]
    out = PairTokens(inputs=len(questions))
    for i, (head, j, k) in enumerate(zip(heads, full_j, full_k)):
        p = min(shared_start(head, j), shared_start(head, k))
        budget = max_length - p - 1  # one token for EOS
        a_j, a_k = j[p:], k[p:]
        if a_j[:budget] == a_k[:budget]:
            out.dropped += 1
            continue
        out.prompt.append(head[:p])
        out.chosen.append(a_j[:budget])
        out.rejected.append(a_k[:budget])
        out.chosen_whole.append(len(a_j) <= budget)
        out.rejected_whole.append(len(a_k) <= budget)
        out.qids.append(qids[i] if qids is not None else questions[i])
        out.truncated += len(a_j) > budget or len(a_k) > budget
        out.questions_cut += fitted[i] != questions[i]
    return out


def tokenize_split(ds: Any, tok: Any, max_length: int, max_prompt: int = 0) -> PairTokens:
    """`tokenize_pairs` over a split's columns (question, response_j, response_k, and qid if any)."""
    qids = ds["qid"] if "qid" in ds.column_names else None
    return tokenize_pairs(ds["question"], ds["response_j"], ds["response_k"], tok, max_length, max_prompt, qids)


def read_pairs(data: str, split: str, tok: Any, max_length: int, max_prompt: int = 0, limit: int = 0,
               seed: int = 0) -> PairTokens:
    """A split of the dataset folder `data` as pairs of token ids cut by the length strategy;
    `limit` > 0 keeps a seeded sample of that many pairs."""
    from camelid.qa import load_split

    ds = load_split(data, split, ("question", "response_j", "response_k"), limit=limit, seed=seed)
    return tokenize_split(ds, tok, max_length, max_prompt)


def stage_pairs(cfg: PairSettings, tok: Any) -> tuple[PairTokens, PairTokens]:
    """The training and evaluation pairs of a pair stage; too few training pairs is an error
    (`check_enough`), raised before the evaluation split is read."""
    def read(split: str, limit: int) -> PairTokens:
        return read_pairs(cfg.data, split, tok, cfg.max_length, cfg.max_prompt_length, limit, cfg.seed)

    train = read(cfg.train_split, cfg.max_train_samples)
    check_enough(train, cfg.train_split, cfg.min_pairs, cfg.max_length)
    return train, read(cfg.eval_split, cfg.max_eval_samples)


def check_enough(pairs: PairTokens, split: str, min_pairs: int, max_length: int) -> None:
    """A one-line CamelidError when too little is left to learn from (see the module docstring)."""
    kept = len(pairs)
    if kept < MIN_KEPT_SHARE * pairs.inputs:
        raise CamelidError(f"only {kept} of {pairs.inputs} {split} pairs are left at max_length={max_length} tokens "
                           f"({pairs.dropped} had the same answers once cut to fit); raise --max-length")
    if kept < min_pairs:
        raise CamelidError(f"only {kept} {split} pairs to train on, fewer than min_pairs={min_pairs}: too little to "
                           "learn from; build a bigger dataset (or lower --min-pairs)")
