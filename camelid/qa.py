"""The question-answer data every RLHF stage reads: its text format and its dataset splits.

Text: `Question: <q>\\n\\nAnswer: <a>` (StackLLaMA's format). SFT trains on it, the reward
model scores it (+ EOS), PPO, DPO and eval prompt with it (the answer left empty), and the
`stackllama` conversation template (camelid.templates) renders a chat in it.

Splits: `load_split` reads one split of a dataset folder that `camelid data` wrote (layout in
camelid.data.output), memory-mapped, with a one-line error for whatever is missing.

Light on import (pyarrow and datasets load inside `load_split`): the chat path imports this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camelid.errors import CamelidError

QUESTION = "Question: "
ANSWER = "\n\nAnswer: "
TURN_SEP = "\n\n"
"""What ends an answer before the next question, in a conversation of several turns."""
NEXT_QUESTION = TURN_SEP + QUESTION.rstrip()
"""The stop string of the format: a model that starts asking the next question has answered."""


def qa_text(question: str, answer: str = "") -> str:
    """`Question: <q>\\n\\nAnswer: <a>`; with no answer, the prompt the model answers."""
    return f"{QUESTION}{question}{ANSWER}{answer}"


def load_split(data_dir: str | Path, split: str, columns: tuple[str, ...] = (), limit: int = 0, seed: int = 0) -> Any:
    """A split of a dataset folder as a `datasets.Dataset` (memory-mapped, not read into RAM).

    `split` is one of finetune / reward / rl / evaluation (preference pairs) or "answers" (the
    unpaired answers table). `columns`: the ones the caller reads (default: the split's whole
    schema). `limit` > 0 keeps that many rows, shuffled with `seed`. A missing folder, split or
    column, or an empty split, raises a one-line CamelidError.
    """
    import datasets
    import pyarrow.parquet as pq

    from camelid.data.output import ANSWER_COLUMNS, PAIR_COLUMNS, SPLITS, split_path
    from camelid.logs import quiet_datasets

    if split not in (*SPLITS, "answers"):
        raise CamelidError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or answers")
    if not Path(data_dir).is_dir():
        raise CamelidError(f"dataset folder {data_dir} does not exist; build it with `camelid data stackexchange` or pass --data")
    path = split_path(data_dir, split)
    if not path.is_file():
        raise CamelidError(f"{data_dir} has no {split} split ({path} is missing); "
                           "build it with `camelid data stackexchange` or `camelid data import`")
    want = columns or (ANSWER_COLUMNS if split == "answers" else PAIR_COLUMNS)
    meta = pq.read_metadata(path)
    missing = [c for c in want if c not in meta.schema.to_arrow_schema().names]
    if missing:
        raise CamelidError(f"{path} lacks column(s) {', '.join(missing)}; rebuild the dataset with `camelid data`")
    if meta.num_rows == 0:
        raise CamelidError(f"the {split} split of {data_dir} is empty; build a bigger dataset or choose another split")
    with quiet_datasets():
        ds = datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
    if limit and len(ds) > limit:
        ds = ds.shuffle(seed=seed).select(range(limit))
    return ds
