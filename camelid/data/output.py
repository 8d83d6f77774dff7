"""The dataset folder every data command writes (camelid.qa.load_split reads its splits).

    DIR/
      README.md                               data card (its YAML header names the configs)
      stats.json                              counts, skipped rows by reason, score histogram
      config.yaml                             the resolved config that made it
      data/finetune-00000-of-00001.parquet    preference pairs, one file per split
      data/reward-00000-of-00001.parquet
      data/rl-00000-of-00001.parquet
      data/evaluation-00000-of-00001.parquet
      answers/answers-00000-of-00001.parquet  every kept answer, unpaired, with its split (for SFT)

`datasets` maps `data/<split>-NNNNN-of-NNNNN.parquet` to a split named `<split>` (its
SPLIT_PATTERN_SHARDED), so `load_dataset("parquet", data_dir=DIR)` gives exactly the four pair
splits; the answers table lives outside `data/` because its columns differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


SPLITS = ("finetune", "reward", "rl", "evaluation")
PAIR_COLUMNS = ("qid", "question", "date", "metadata", "response_j", "response_k", "score_j", "score_k")
ANSWER_COLUMNS = ("qid", "aid", "split", "question", "response", "score", "vote_score", "upvotes", "accepted", "date")

METADATA_TYPE = pa.struct([
    ("tags", pa.list_(pa.string())), ("site", pa.string()), ("question_url", pa.string()),
    ("answer_j_url", pa.string()), ("answer_k_url", pa.string()),
    ("answer_j_id", pa.int64()), ("answer_k_id", pa.int64()),
])
PAIR_SCHEMA = pa.schema([
    ("qid", pa.int64()), ("question", pa.string()), ("date", pa.string()), ("metadata", METADATA_TYPE),
    ("response_j", pa.string()), ("response_k", pa.string()), ("score_j", pa.int64()), ("score_k", pa.int64()),
])
ANSWERS_SCHEMA = pa.schema([
    ("qid", pa.int64()), ("aid", pa.int64()), ("split", pa.string()), ("question", pa.string()),
    ("response", pa.string()), ("score", pa.int64()), ("vote_score", pa.int64()), ("upvotes", pa.int64()),
    ("accepted", pa.bool_()), ("date", pa.string()),
])
ROWS_PER_GROUP = 2000


def split_path(dataset_dir: str | Path, split: str) -> Path:
    """The parquet file that holds `split` (one of SPLITS, or "answers") of a dataset folder."""
    d = Path(dataset_dir)
    if split == "answers":
        return d / "answers" / "answers-00000-of-00001.parquet"
    return d / "data" / f"{split}-00000-of-00001.parquet"


class TableWriter:
    """Rows -> one parquet file, written in row groups so a big split never sits in memory."""

    def __init__(self, path: Path, schema: pa.Schema):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= ROWS_PER_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.count += len(self.rows)
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class DatasetWriter:
    """One TableWriter per pair split plus the answers table, under a (temporary) dataset folder."""

    def __init__(self, root: Path):
        self.pairs = {s: TableWriter(split_path(root, s), PAIR_SCHEMA) for s in SPLITS}
        self.answers = TableWriter(split_path(root, "answers"), ANSWERS_SCHEMA)

    def close(self) -> dict[str, int]:
        for w in (*self.pairs.values(), self.answers):
            w.close()
        return {s: w.count for s, w in self.pairs.items()}


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool):
    """A tqdm bar; byte counts scale to KB/MB, and it redraws at most once a second."""
    from tqdm.auto import tqdm

    from camelid.logs import bars_off

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                disable=bars_off(enabled), mininterval=1.0, dynamic_ncols=True)


def inline_counts(d: dict[str, int]) -> str:
    """{"a": 2, "b": 0} -> "a 2" (zero counts left out), or "none"."""
    return ", ".join(f"{k} {v:,}" for k, v in d.items() if v) or "none"


def data_card(title: str, stats: dict[str, Any], body: str) -> str:
    """README.md for a dataset folder: a YAML header that `datasets` reads, then the text."""
    configs = ["configs:", "- config_name: default", "  default: true", "  data_files:"]
    for s in SPLITS:
        configs += [f"  - split: {s}", f"    path: data/{s}-*.parquet"]
    configs += ["- config_name: answers", "  data_files:", "  - split: answers", "    path: answers/*.parquet"]
    split_rows = "\n".join(
        f"| {s} | {stats['splits'][s]['questions']:,} | {stats['splits'][s]['pairs']:,} | {stats['splits'][s]['answers']:,} |"
        for s in SPLITS
    )
    return (
        "---\n" + "\n".join(configs) + "\n---\n\n"
        f"# {title}\n\n{body.strip()}\n\n"
        "## Splits\n\nSplit by question: no question is in two splits.\n\n"
        "| split | questions | pairs | answers |\n|---|---|---|---|\n" + split_rows + "\n\n"
        "## Columns\n\n"
        "Pairs (`data/<split>-*.parquet`): `qid, question, date, metadata, response_j, response_k, score_j, "
        "score_k`; `response_j` is the preferred answer (higher score). `metadata` holds tags, site, the "
        "question and answer links and answer ids.\n\n"
        "Answers (`answers/*.parquet`, for SFT): `qid, aid, split, question, response, score, vote_score, "
        "upvotes, accepted, date`.\n\n"
        "## Load\n\n```python\nimport datasets\n"
        "pairs = datasets.load_dataset(\"parquet\", data_dir=\"DIR\")      # finetune/reward/rl/evaluation\n"
        "from camelid.qa import load_split\nanswers = load_split(\"DIR\", \"answers\")\n```\n\n"
        "`stats.json` has every count, skipped rows by reason and the score histogram.\n"
    )
