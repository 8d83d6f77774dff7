"""`camelid data import`: existing preference data -> the same split dataset folder as a dump.

Layouts, detected from the first record's keys (or forced with --layout):

- paired:  `question, response_j, response_k` (lvwerra/stack-exchange-paired, StackLLaMA's data);
           `qid, date, score_j, score_k` are kept when present.
- prompt:  `prompt, chosen, rejected` (TRL's preference format); chosen/rejected may also be
           conversations (lists of {role, content}); the last message is the response.
- hh:      `chosen, rejected` only, each a whole transcript of `\\n\\nHuman: ...\\n\\nAssistant: ...`
           turns (Anthropic/hh-rlhf); the shared prefix up to the last `Assistant:` is the prompt.

Files: .jsonl, .json, .parquet, .csv, each optionally .gz, or a folder of them. jsonl, parquet
and csv are streamed; a .json file (one array) is read whole. Rows are split by prompt, so the
same prompt never lands in two splits.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa

from camelid.data import dump, ondisk
from camelid.data.output import SPLITS, DatasetWriter, data_card, inline_counts, progress_bar
from camelid.data.scoring import split_bounds, stable_u64
from camelid.data.stackexchange import DataResult
from camelid.errors import CamelidError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
NORMAL_SCHEMA = pa.schema([
    ("row", pa.int64()), ("qid", pa.int64()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.string()), ("date", pa.string()), ("score_j", pa.int64()), ("score_k", pa.int64()),
])


@dataclass(frozen=True)
class ImportConfig:
    input: str = ""
    """a .jsonl/.json/.parquet/.csv file (optionally .gz) or a folder of them"""
    out: str = "data/imported"
    """output dataset folder (written to a temporary folder and renamed when complete)"""
    layout: Literal["auto", "paired", "prompt", "hh"] = "auto"
    """input layout: paired (question,response_j,response_k), prompt (prompt,chosen,rejected), hh (Anthropic transcripts)"""
    seed: int = 42
    """seed for the split assignment"""
    splits: tuple[float, ...] = (0.3, 0.3, 0.3, 0.1)
    """fractions of prompts for finetune, reward, rl, evaluation"""
    progress: bool = True
    """show progress bars"""
    overwrite: bool = False
    """replace --out even when camelid did not write it (a folder camelid wrote is always replaced)"""

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input (a file or folder of preference data) is required")
        if len(self.splits) != len(SPLITS) or any(f < 0 for f in self.splits) or sum(self.splits) <= 0:
            raise ValueError(f"splits must be {len(SPLITS)} non-negative fractions ({'/'.join(SPLITS)}), got {self.splits}")


def input_files(path: Path) -> list[Path]:
    def ok(p: Path) -> bool:
        name = p.name.lower().removesuffix(".gz")
        return p.is_file() and name.endswith(SUFFIXES)

    if not path.exists():
        raise CamelidError(f"{path} does not exist; give a .jsonl/.json/.parquet/.csv file or a folder of them")
    files = sorted(p for p in path.rglob("*") if ok(p)) if path.is_dir() else [path] if ok(path) else []
    if not files:
        raise CamelidError(f"{path}: no .jsonl, .json, .parquet or .csv file (optionally .gz) to import")
    return files


def read_records(path: Path) -> Iterator[list[dict[str, Any]]]:
    """Batches of records (dicts) from one file, streamed except for a plain .json array."""
    name = path.name.lower().removesuffix(".gz")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
                yield batch.to_pylist()
        elif name.endswith(".csv"):
            from pyarrow import csv

            # Every column as text: type inference would make a column of digits int64 (a prompt
            # "42" is still text) and fail the read when a later block holds a word in it.
            with pa.input_stream(str(path), compression="detect") as stream:
                reader = csv.open_csv(stream, parse_options=csv.ParseOptions(newlines_in_values=True),
                                      convert_options=csv.ConvertOptions(default_column_type=pa.string()))
                for batch in reader:
                    yield batch.to_pylist()
        elif name.endswith(".jsonl"):
            with opener(path, "rt", encoding="utf-8") as f:
                batch = []
                for line in f:
                    if line.strip():
                        batch.append(_json_line(line))
                    if len(batch) >= 2048:
                        yield batch
                        batch = []
                yield batch
        else:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if isinstance(data, dict):  # columnar: {"prompt": [...], "chosen": [...], ...}
                data = [dict(zip(data, vals)) for vals in zip(*data.values())]
            if not isinstance(data, list):
                raise CamelidError(f"{path}: a .json file must hold a list of records")
            yield data
    except (json.JSONDecodeError, UnicodeDecodeError, pa.ArrowInvalid, OSError, EOFError) as e:
        raise CamelidError(f"{path} could not be read as {name.rsplit('.', 1)[-1]}: {str(e).splitlines()[0]}") from None


@dataclass(frozen=True)
class Unreadable:
    """A record that could not be parsed: counted under `reason` and skipped, not fatal."""

    reason: str


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return Unreadable("bad_json_line")


def detect_layout(record: dict[str, Any], path: Path) -> str:
    keys = set(record)
    if {"question", "response_j", "response_k"} <= keys:
        return "paired"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "prompt"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    raise CamelidError(f"{path}: columns {', '.join(sorted(keys))} match no known layout; need question/response_j/"
                       "response_k, prompt/chosen/rejected, or chosen/rejected transcripts (Anthropic HH)")


def _messages_text(value: Any) -> str | None:
    """A string, or a conversation [{role, content}, ...] as text (one message: just its content).

    None when the value is neither (a number, an object, a message whose content is not a
    string): the record is then skipped as `field_not_text`.
    """
    if isinstance(value, str) or value is None:
        return value or ""
    if not isinstance(value, list) or not all(_is_message(m) for m in value):
        return None
    if len(value) == 1:
        return value[0].get("content") or ""
    return "\n\n".join(f"{str(m.get('role', '')).capitalize()}: {m.get('content') or ''}" for m in value)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("content"), (str, type(None)))


def _response_text(value: Any) -> str | None:
    """A response: a string, or a conversation whose last message is the response."""
    if isinstance(value, list) and value:
        return (value[-1].get("content") or "") if _is_message(value[-1]) else None
    return _messages_text(value)


def _int_field(value: Any) -> int | None | Literal[False]:
    """An optional integer column: None when absent (null, empty CSV cell, NaN), False when
    present but not an integer that fits int64 (the record is skipped, not the build)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    n = dump.to_int64(value)
    return False if n is None else n


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen reply, rejected reply) from two HH transcripts, or None without a shared prompt.

    The prompt is the shared prefix cut at its last `\\n\\nAssistant:`; a prompt that is a single
    Human turn becomes that turn's text, longer ones stay a `Human: ... Assistant: ...` transcript.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        return None
    prompt = chosen[:cut]
    good, bad = chosen[cut + len(HH_ASSISTANT):].strip(), rejected[cut + len(HH_ASSISTANT):].strip()
    if prompt.count(HH_HUMAN) == 1 and HH_ASSISTANT not in prompt and prompt.startswith(HH_HUMAN):
        prompt = prompt[len(HH_HUMAN):]
    return prompt.strip(), good, bad


def normalize(rec: dict[str, Any], layout: str) -> tuple[str, str, str, dict[str, Any]] | str:
    """One record -> (prompt, chosen, rejected, extras), or the reason it is skipped."""
    extras: dict[str, Any] = {}
    if layout == "paired":
        prompt, good, bad = (_messages_text(rec.get(k)) for k in ("question", "response_j", "response_k"))
        for key in ("qid", "score_j", "score_k"):
            extras[key] = _int_field(rec.get(key))
            if extras[key] is False:
                return f"bad_{key}"
        extras["date"] = str(rec["date"]) if rec.get("date") is not None else None
    elif layout == "prompt":
        prompt = _messages_text(rec.get("prompt"))
        good, bad = (_response_text(rec.get(k)) for k in ("chosen", "rejected"))
    else:
        if not isinstance(rec.get("chosen"), str) or not isinstance(rec.get("rejected"), str):
            return "hh_not_text"
        parts = split_hh(rec["chosen"], rec["rejected"])
        if parts is None:
            return "hh_no_shared_prompt"
        prompt, good, bad = parts
    if prompt is None or good is None or bad is None:
        return "field_not_text"
    if not (prompt.strip() and good.strip() and bad.strip()):
        return "empty_field"
    if good.strip() == bad.strip():
        return "identical_responses"
    return prompt, good, bad, extras


def _ingest(cfg: ImportConfig, files: list[Path], work: Path) -> tuple[Counter, str]:
    """Pass 1: every file -> work/pairs.parquet, normalised; returns (counts, layout used)."""
    w = dump.ChunkWriter(work / "pairs.parquet", NORMAL_SCHEMA)
    counts: Counter = Counter()
    layout = cfg.layout
    with progress_bar(None, "records", "rec", cfg.progress) as bar:
        for path in files:
            for batch in read_records(path):
                for rec in batch:
                    counts["records_read"] += 1
                    if not isinstance(rec, dict):
                        counts[rec.reason if isinstance(rec, Unreadable) else "not_an_object"] += 1
                        continue
                    layout = detect_layout(rec, path) if layout == "auto" else layout
                    got = normalize(rec, layout)
                    if isinstance(got, str):
                        counts[got] += 1
                        continue
                    prompt, good, bad, ex = got
                    qid = ex.get("qid")
                    qid = qid if qid is not None else stable_u64(0, prompt)
                    w.add((counts["records_read"], qid, prompt, good, bad, ex.get("date"),
                           ex.get("score_j"), ex.get("score_k")), len(prompt) + len(good) + len(bad))
                bar.update(len(batch))
    w.close()
    return counts, layout


def _split_sorted(cfg: ImportConfig, work: Path) -> int:
    """Pass 2 (DuckDB): seeded exact split of distinct qids; rows sorted by (qid, input order)."""
    con = ondisk.connect(work)
    ondisk.view_parquet(con, "pairs", work / "pairs.parquet")
    con.execute(f"CREATE TABLE kept AS SELECT DISTINCT qid, md5('{int(cfg.seed)}:' || qid) AS k FROM pairs")
    n = con.execute("SELECT count(*) FROM kept").fetchone()[0]
    case = " ".join(f"WHEN rk < {b} THEN '{s}'" for s, b in zip(SPLITS, split_bounds(n, cfg.splits)))
    con.execute(f"""CREATE TABLE splits AS SELECT qid, CASE {case} END AS split
                    FROM (SELECT qid, row_number() OVER (ORDER BY k, qid) - 1 AS rk FROM kept)""")
    ondisk.write_parquet(con, "SELECT p.*, s.split FROM pairs p JOIN splits s USING (qid) ORDER BY p.qid, p.row",
                         work / "sorted.parquet")
    con.close()
    return n


def _write(cfg: ImportConfig, work: Path, root: Path, source: str, n_prompts: int) -> dict[str, Any]:
    """Pass 3: pairs to their split; each distinct chosen response once into the answers table."""
    import pyarrow.parquet as pq

    out = DatasetWriter(root)
    per_split = {s: Counter() for s in SPLITS}
    last_qid, seen = None, set()
    with progress_bar(n_prompts, "prompts", "q", cfg.progress) as bar:
        for batch in pq.ParquetFile(work / "sorted.parquet").iter_batches(batch_size=1024):
            for r in batch.to_pylist():
                if r["qid"] != last_qid:
                    last_qid, seen = r["qid"], set()
                    per_split[r["split"]]["questions"] += 1
                    bar.update(1)
                meta = {"tags": [], "site": source, "question_url": None, "answer_j_url": None,
                        "answer_k_url": None, "answer_j_id": None, "answer_k_id": None}
                out.pairs[r["split"]].add({"qid": r["qid"], "question": r["prompt"], "date": r["date"], "metadata": meta,
                                           "response_j": r["chosen"], "response_k": r["rejected"],
                                           "score_j": r["score_j"], "score_k": r["score_k"]})
                per_split[r["split"]]["pairs"] += 1
                if r["chosen"] not in seen:
                    seen.add(r["chosen"])
                    per_split[r["split"]]["answers"] += 1
                    out.answers.add({"qid": r["qid"], "aid": None, "split": r["split"], "question": r["prompt"],
                                     "response": r["chosen"], "score": r["score_j"], "vote_score": None,
                                     "upvotes": None, "accepted": None, "date": r["date"]})
    out.close()
    return {s: {k: per_split[s][k] for k in ("questions", "answers", "pairs")} for s in SPLITS}


def run(cfg: ImportConfig) -> DataResult:
    """Normalise the preference data at `cfg.input` into the dataset folder `cfg.out`."""
    from camelid.config import save_config
    from camelid.utils import atomic_dir, write_json

    start = time.perf_counter()
    files = input_files(Path(cfg.input).expanduser())
    with atomic_dir(cfg.out, cfg.overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        counts, layout = _ingest(cfg, files, work)
        n_prompts = _split_sorted(cfg, work) if counts["records_read"] else 0
        if n_prompts == 0:
            raise CamelidError(f"{cfg.input}: no usable preference pair in {counts['records_read']:,} records "
                               f"(skipped: {inline_counts(dict(counts))}); nothing to write")
        splits = _write(cfg, work, tmp, Path(cfg.input).name, n_prompts)
        dump.remove_tree(work)
        skipped = {k: v for k, v in sorted(counts.items()) if k != "records_read"}
        stats = {
            "input": cfg.input, "files": [str(f) for f in files], "layout": layout,
            "records_read": counts["records_read"], "questions_kept": n_prompts,
            "answers_kept": sum(s["answers"] for s in splits.values()),
            "pairs": sum(s["pairs"] for s in splits.values()), "skipped": skipped, "splits": splits,
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp / "config.yaml")
        body = (f"Preference pairs imported by `camelid data import` from `{cfg.input}` ({layout} layout, "
                f"{len(files)} file(s)).\n\n{stats['pairs']:,} pairs over {n_prompts:,} prompts from "
                f"{stats['records_read']:,} records; skipped, by reason: {inline_counts(skipped)}.\n\n"
                "`response_j` is the chosen (preferred) response. Scores are kept where the input had them "
                "(stack-exchange-paired), else null. The answers table holds each distinct chosen response once.")
        (tmp / "README.md").write_text(data_card(f"Imported preference pairs: {Path(cfg.input).name}", stats, body))
    return DataResult(Path(cfg.out), stats)
