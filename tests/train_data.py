"""Small dataset folders in camelid's layout (camelid.data.output) for the SFT and reward tests.

Toy preference a tiny model can learn: the chosen answer (response_j) contains a marker word,
the rejected one does not; answer lengths are random on both sides, so "longer wins" is a
coin flip here and the reward model must learn the marker.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from camelid.data.output import ANSWERS_SCHEMA, PAIR_SCHEMA, SPLITS, split_path

MARKER = "excellent"
WORDS = ("the apple tree grows fast in spring while birds sing near old stone walls and rivers "
         "bend under bridges where children play with red kites on windy days").split()


def _answer(rng: random.Random, marker: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    if marker:
        words.insert(rng.randint(0, len(words)), MARKER)
    return " ".join(words)


def write_dataset(root: Path, n_pairs: int = 40, seed: int = 0, splits: tuple[str, ...] = SPLITS,
                  drop_columns: tuple[str, ...] = ()) -> Path:
    """A dataset folder with `n_pairs` pairs per split (+ the answers table); returns `root`."""
    rng = random.Random(seed)
    answers = []
    for s_i, split in enumerate(splits):
        rows = []
        for i in range(n_pairs):
            qid = s_i * 10_000 + i
            q = f"How do I look after tree number {qid}?"
            j, k = _answer(rng, True), _answer(rng, False)
            meta = {"tags": ["trees"], "site": "toy", "question_url": "", "answer_j_url": "", "answer_k_url": "",
                    "answer_j_id": 2 * qid, "answer_k_id": 2 * qid + 1}
            rows.append({"qid": qid, "question": q, "date": "2024-01-01", "metadata": meta,
                         "response_j": j, "response_k": k, "score_j": 3, "score_k": 0})
            for aid, text, score in ((2 * qid, j, 3), (2 * qid + 1, k, 0)):
                answers.append({"qid": qid, "aid": aid, "split": split, "question": q, "response": text, "score": score,
                                "vote_score": score, "upvotes": score, "accepted": score > 0, "date": "2024-01-01"})
        table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA).drop_columns(list(drop_columns))
        path = split_path(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    path = split_path(root, "answers")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(answers, schema=ANSWERS_SCHEMA), path)
    return root
