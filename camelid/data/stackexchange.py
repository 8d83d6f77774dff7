"""`camelid data stackexchange`: a Stack Exchange dump -> scored answers, preference pairs, splits.

StackLLaMA's data step (https://huggingface.co/blog/stackllama), at the scale of real dumps:

1. stream Posts.xml (and Votes.xml when the dump has it) into parquet chunks  (dump.py)
2. group answers by question on disk with DuckDB; assign each kept question a split by a
   seeded md5 order, so splits are exact fractions and no question is in two of them
3. walk questions and their answers in qid order (a merge of two sorted files): HTML ->
   Markdown, score each answer (scoring.py), pair them, write each split's parquet file

A bad row never fails the build: it is skipped and counted by reason in stats.json.

Memory depends on the largest question, not on the dump: nothing holds all posts at once.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow.parquet as pq

from camelid.data import dump, ondisk
from camelid.data.markdown import html_to_markdown
from camelid.data.output import SPLITS, DatasetWriter, data_card, inline_counts, progress_bar
from camelid.data.scoring import answer_score, make_pairs, split_bounds
from camelid.errors import CamelidError


@dataclass(frozen=True)
class StackExchangeConfig:
    input: str = "sample"
    """dump folder (with Posts.xml), a Posts.xml file, or a site .7z archive; `sample` = the bundled sample dump"""
    out: str = "data/stackexchange"
    """output dataset folder (written to a temporary folder and renamed when complete)"""
    pairs_per_question: int = 10
    """at most this many preference pairs per question, sampled without replacement (StackLLaMA: 10)"""
    seed: int = 42
    """seed for pair sampling and the split assignment (same seed, same output)"""
    splits: tuple[float, ...] = (0.3, 0.3, 0.3, 0.1)
    """fractions of questions for finetune, reward, rl, evaluation"""
    min_answers: int = 2
    """keep questions with at least this many answers (pairs need 2)"""
    max_questions: int = 0
    """keep at most this many questions, a seeded random sample (0 = all); the dump is still read fully"""
    upvotes: Literal["auto", "votes", "score"] = "auto"
    """upvote count for the score formula: votes = Votes.xml up-votes, score = the net Score, auto = votes when Votes.xml exists"""
    site: str = ""
    """site host name for links (e.g. cardano.stackexchange.com); empty = from the input's name or its links"""
    workers: int = 0
    """processes converting HTML to Markdown, the slow step (0 = one per CPU core); output is identical for any value"""
    max_extract_gb: float = dump.MAX_EXTRACT_GB
    """a .7z input may unpack to at most this many GB (checked in its headers before extracting)"""
    memory_limit: str = "1GB"
    """DuckDB memory limit for the on-disk group-by; it spills to disk above this"""
    progress: bool = True
    """show progress bars"""
    overwrite: bool = False
    """replace --out even when camelid did not write it (a folder camelid wrote is always replaced)"""

    def __post_init__(self) -> None:
        if len(self.splits) != len(SPLITS) or any(f < 0 for f in self.splits) or sum(self.splits) <= 0:
            raise ValueError(f"splits must be {len(SPLITS)} non-negative fractions ({'/'.join(SPLITS)}), got {self.splits}")
        if self.pairs_per_question < 1:
            raise ValueError("pairs_per_question must be at least 1")
        if self.min_answers < 1:
            raise ValueError("min_answers must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 (one per core) or positive")
        if self.max_questions < 0:
            raise ValueError("max_questions must be 0 (all) or positive")
        if not self.out:
            raise ValueError("out (the output folder) is required")
        if not self.max_extract_gb > 0:
            raise ValueError(f"max_extract_gb must be > 0, got {self.max_extract_gb}")
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", self.memory_limit):
            raise ValueError(f"memory_limit must look like 512MB or 8GB, got {self.memory_limit!r}")


@dataclass
class DataResult:
    out: Path
    stats: dict[str, Any]


def _stream_posts(files: dump.DumpFiles, work: Path, progress: bool) -> dump.PostStats:
    """Pass 1: Posts.xml -> work/questions.parquet + work/answers.parquet, counting as it goes."""
    st = dump.PostStats()
    qw = dump.ChunkWriter(work / "questions.parquet", dump.QUESTION_SCHEMA)
    aw = dump.ChunkWriter(work / "answers.parquet", dump.ANSWER_SCHEMA)
    start = time.perf_counter()
    with progress_bar(files.posts.stat().st_size, files.posts.name, "B", progress) as bar:
        for rows in dump.iter_rows(files.posts, "posts", bar.update):
            dump.ingest_post_rows(rows, qw, aw, st)
            bar.set_postfix_str(f"{st.rows / max(time.perf_counter() - start, 1e-9):,.0f} rows/s", refresh=False)
    qw.close()
    aw.close()
    return st


def _stream_votes(path: Path, work: Path, progress: bool) -> int:
    vw = dump.ChunkWriter(work / "upvotes.parquet", dump.UPVOTE_SCHEMA)
    n = 0
    with progress_bar(path.stat().st_size, path.name, "B", progress) as bar:
        for rows in dump.iter_rows(path, "votes", bar.update):
            n += dump.ingest_vote_rows(rows, vw)
    vw.close()
    return n


def _group(cfg: StackExchangeConfig, work: Path, use_votes: bool) -> dict[str, Any]:
    """Pass 2 (DuckDB, on disk): dedupe, count answers, pick and split questions, sort both tables."""
    con = ondisk.connect(work, cfg.memory_limit)
    counts: dict[str, Any] = {}
    for name, key in (("questions", "qid"), ("answers", "aid")):
        ondisk.view_parquet(con, f"{name}_raw", work / f"{name}.parquet")
        total, distinct = con.execute(f"SELECT count(*), count(DISTINCT {key}) FROM {name}_raw").fetchone()
        counts[f"duplicate_{name[:-1]}"] = total - distinct
        view = f"SELECT * FROM {name}_raw" + (f" QUALIFY row_number() OVER (PARTITION BY {key}) = 1" if total > distinct else "")
        con.execute(f"CREATE TEMP VIEW {name[0]} AS {view}")
    con.execute("CREATE TABLE acount AS SELECT parent AS qid, count(*) AS n FROM a GROUP BY parent")
    counts["orphan_answer"] = con.execute("SELECT count(*) FROM a ANTI JOIN q ON a.parent = q.qid").fetchone()[0]
    counts["questions_read"] = con.execute("SELECT count(*) FROM q").fetchone()[0]
    counts["answers_read"] = con.execute("SELECT count(*) FROM a").fetchone()[0]
    limit = f"LIMIT {int(cfg.max_questions)}" if cfg.max_questions else ""
    # md5 of (seed, qid) is a seeded shuffle that DuckDB computes the same on every version.
    con.execute(f"""CREATE TABLE kept AS SELECT q.qid, md5('{int(cfg.seed)}:' || q.qid) AS k FROM q
                    JOIN acount USING (qid) WHERE acount.n >= {int(cfg.min_answers)} ORDER BY k {limit}""")
    n_kept = con.execute("SELECT count(*) FROM kept").fetchone()[0]
    bounds = split_bounds(n_kept, cfg.splits)
    case = " ".join(f"WHEN rk < {b} THEN '{s}'" for s, b in zip(SPLITS, bounds))
    con.execute(f"""CREATE TABLE splits AS SELECT qid, CASE {case} END AS split
                    FROM (SELECT qid, row_number() OVER (ORDER BY k, qid) - 1 AS rk FROM kept)""")
    up = ""
    if use_votes:
        ondisk.view_parquet(con, "upvotes", work / "upvotes.parquet")
        up = "LEFT JOIN (SELECT post_id, sum(n) AS up FROM upvotes GROUP BY post_id) v ON v.post_id = a.aid"
    up_col = "coalesce(v.up, 0)" if use_votes else "greatest(a.score, 0)"
    ondisk.write_parquet(con, """SELECT q.qid, q.title, q.body, q.tags, q.date, q.accepted, s.split
                                 FROM q JOIN splits s USING (qid) ORDER BY q.qid""", work / "q_sorted.parquet")
    ondisk.write_parquet(con, f"""SELECT a.aid, a.parent, a.body, a.score, {up_col} AS up, a.date FROM a
                                  JOIN splits s ON a.parent = s.qid {up} ORDER BY a.parent, a.aid""",
                         work / "a_sorted.parquet")
    con.close()
    counts["questions_kept"] = n_kept
    return counts


def _batches(path: Path) -> Iterator[dict[str, Any]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _by_question(work: Path) -> Iterator[tuple[dict, list[dict]]]:
    """Merge the two qid-sorted files: each question with its answers, one question at a time."""
    answers = _batches(work / "a_sorted.parquet")
    pending = next(answers, None)
    for qrow in _batches(work / "q_sorted.parquet"):
        group = []
        while pending is not None and pending["parent"] == qrow["qid"]:
            group.append(pending)
            pending = next(answers, None)
        yield qrow, group


HTML_TOO_DEEP = "html_too_deeply_nested"
"""Skip reason of a post whose HTML nests deeper than the converter's recursion can follow."""
TOO_FEW_CONVERTED = "question_too_few_convertible_answers"
"""Skip reason of a question left with fewer than min_answers answers once unconvertible ones are dropped."""


def _markdown(html: str) -> str | None:
    """Markdown of one body, or None when its nesting exhausts the recursion limit (markdownify
    walks the tree recursively: a few hundred nested tags are enough), so one post is skipped
    instead of the whole build failing."""
    try:
        return html_to_markdown(html)
    except RecursionError:
        return None


def _convert(item: tuple[str, str, list[str]]) -> tuple[str | None, list[str | None]]:
    """(title, question HTML, answer HTMLs) -> (question Markdown, answer Markdowns); runs in workers.

    None stands for a body that could not be converted (see `_markdown`)."""
    title, body, answers = item
    question = _markdown(body)
    return (None if question is None else f"{title}\n\n{question}".strip()), [_markdown(a) for a in answers]


def _converted(work: Path, workers: int) -> Iterator[tuple[dict, list[dict], str | None, list[str | None]]]:
    """_by_question with Markdown added, converted by `workers` processes, in the same order.

    Work goes out in windows of whole questions so memory stays bounded (Pool.imap would read
    the whole input ahead of slow workers) and the output order never depends on timing.
    """
    groups = _by_question(work)
    item = lambda g: (g[0]["title"], g[0]["body"], [a["body"] for a in g[1]])  # noqa: E731
    if workers <= 1:
        for g in groups:
            yield (*g, *_convert(item(g)))
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        while window := list(itertools.islice(groups, 256 * workers)):
            for g, done in zip(window, pool.map(_convert, [item(g) for g in window], chunksize=32)):
                yield (*g, *done)


def _usable(cfg: StackExchangeConfig, question: str | None, answers: list[dict], texts: list[str | None],
            skipped: Counter) -> tuple[list[dict], list[str]] | None:
    """The question's converted answers (and their rows), or None when the question is skipped;
    every post that could not be converted is counted in `skipped`."""
    kept = [(a, t) for a, t in zip(answers, texts) if t is not None]
    failed = len(answers) - len(kept) + (question is None)
    if failed:
        skipped[HTML_TOO_DEEP] += failed
    if question is None:
        return None
    if len(kept) < cfg.min_answers:
        skipped[TOO_FEW_CONVERTED] += 1
        return None
    return [a for a, _ in kept], [t for _, t in kept]


def _links(site: str, qid: int, aid_j: int | None = None, aid_k: int | None = None) -> dict[str, Any]:
    base = f"https://{site}" if site else None
    return {
        "site": site or None, "question_url": f"{base}/questions/{qid}" if base else None,
        "answer_j_url": f"{base}/a/{aid_j}" if base and aid_j else None,
        "answer_k_url": f"{base}/a/{aid_k}" if base and aid_k else None,
    }


def _write(cfg: StackExchangeConfig, work: Path, root: Path, site: str, n_kept: int) -> dict[str, Any]:
    """Pass 3: convert, score, pair and write each question's rows to its split."""
    out = DatasetWriter(root)
    hist: Counter = Counter()
    skipped: Counter = Counter()
    per_split = {s: Counter() for s in SPLITS}
    with progress_bar(n_kept, "questions", "q", cfg.progress) as bar:
        workers = cfg.workers or os.cpu_count() or 1
        for qrow, answers, question, texts in _converted(work, min(workers, max(1, n_kept // 1000))):
            bar.update(1)
            usable = _usable(cfg, question, answers, texts, skipped)
            if usable is None:
                continue
            answers, texts = usable
            qid, split = qrow["qid"], qrow["split"]
            scores = [answer_score(a["up"], a["aid"] == qrow["accepted"], a["score"]) for a in answers]
            for a, text, sc in zip(answers, texts, scores):
                hist[sc] += 1
                out.answers.add({"qid": qid, "aid": a["aid"], "split": split, "question": question, "response": text,
                                 "score": sc, "vote_score": a["score"], "upvotes": a["up"],
                                 "accepted": a["aid"] == qrow["accepted"], "date": a["date"]})
            pairs = make_pairs(scores, cfg.pairs_per_question, cfg.seed, qid)
            for j, k in pairs:
                meta = {"tags": qrow["tags"], **_links(site, qid, answers[j]["aid"], answers[k]["aid"]),
                        "answer_j_id": answers[j]["aid"], "answer_k_id": answers[k]["aid"]}
                out.pairs[split].add({"qid": qid, "question": question, "date": qrow["date"], "metadata": meta,
                                      "response_j": texts[j], "response_k": texts[k],
                                      "score_j": scores[j], "score_k": scores[k]})
            per_split[split].update(questions=1, answers=len(answers), pairs=len(pairs),
                                    questions_with_pairs=int(bool(pairs)))
    out.close()
    return {"score_histogram": {str(k): hist[k] for k in sorted(hist)}, "skipped": skipped,
            "splits": {s: {k: per_split[s][k] for k in ("questions", "questions_with_pairs", "answers", "pairs")}
                       for s in SPLITS}}


def _guess_site(cfg: StackExchangeConfig, files: dump.DumpFiles, st: dump.PostStats) -> tuple[str, str]:
    if cfg.site:
        return cfg.site, "--site"
    if files.site:
        return files.site, "input name"
    if st.link_hosts:
        return st.link_hosts.most_common(1)[0][0], "most linked host in question bodies (a guess; set --site)"
    return "", "unknown (set --site)"


def _card_text(cfg: StackExchangeConfig, stats: dict[str, Any]) -> str:
    src = stats["upvote_source"]
    how = ("up-votes counted from the dump's Votes.xml (VoteTypeId 2)" if src == "votes"
           else "the net `Score` (upvotes minus downvotes) as the upvote estimate, as StackLLaMA's data did")
    return f"""Preference pairs built by `camelid data stackexchange` from `{stats['input']}`
(site: {stats['site'] or 'unknown'}), following StackLLaMA (https://huggingface.co/blog/stackllama).

**Score** of an answer (Askell et al. 2021, sec. 4.1): `round(log2(1 + upvotes))`, plus 1 if it
is the accepted answer; -1 if its vote score (`Score` in Posts.xml) is negative. Upvotes here:
{how}. Posts.xml only stores `Score` = upvotes - downvotes, so without Votes.xml the true upvote
count is not in the dump.

**Pairs**: every two answers of a question with different scores, the better one as
`response_j`; ties dropped; at most {cfg.pairs_per_question} per question, sampled without
replacement with seed {cfg.seed}. Questions with fewer than {cfg.min_answers} answers are left out.

**Text**: the question is its title, a blank line, then its body; bodies are converted from
HTML to Markdown (code blocks fenced with their language, MathJax left as written).

{stats['questions_kept']:,} questions, {stats['answers_kept']:,} answers, {stats['pairs']:,} pairs from
{stats['posts_read']:,} posts. Skipped rows, by reason: {inline_counts(stats['skipped'])}.

License: Stack Exchange content is CC BY-SA (see each post's `ContentLicense`); attribute the
authors through the question and answer links in `metadata`.
"""


def _resolve_input(name: str) -> str:
    if name == "sample":
        from camelid.data import sample_dump_path

        return str(sample_dump_path())
    return name


def run(cfg: StackExchangeConfig, *, resume: bool = False, overwrite: bool = False) -> DataResult:
    """Build the dataset folder `cfg.out` from the dump `cfg.input`; see the module docstring.

    The stages' common signature: `overwrite` as `cfg.overwrite`; `resume` changes nothing (the
    folder is written whole or not at all, so a cut-short build starts over)."""
    from camelid.config import save_config
    from camelid.utils import atomic_dir, ensure_writable_dir, write_json

    cfg = replace(cfg, overwrite=cfg.overwrite or overwrite)
    start = time.perf_counter()
    out = Path(cfg.out)
    ensure_writable_dir(out.parent if out.parent != Path("") else Path("."))
    with atomic_dir(out, cfg.overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        files = dump.resolve_dump(_resolve_input(cfg.input), work, cfg.max_extract_gb)
        if cfg.upvotes == "votes" and files.votes is None:
            raise CamelidError(f"--upvotes votes needs Votes.xml beside {files.posts}; use --upvotes auto or score")
        use_votes = files.votes is not None and cfg.upvotes != "score"
        st = _stream_posts(files, work, cfg.progress)
        votes_read = _stream_votes(files.votes, work, cfg.progress) if use_votes else 0
        counts = _group(cfg, work, use_votes)
        if counts["questions_kept"] == 0:
            raise CamelidError(f"{files.source}: no question has {cfg.min_answers}+ answers "
                               f"({st.rows:,} posts, {counts['questions_read']:,} questions, "
                               f"{counts['answers_read']:,} answers read); nothing to write")
        site, site_source = _guess_site(cfg, files, st)
        written = _write(cfg, work, tmp, site, counts["questions_kept"])
        splits = written["splits"]
        questions_kept = sum(s["questions"] for s in splits.values())
        if questions_kept == 0:
            raise CamelidError(f"{files.source}: none of the {counts['questions_kept']:,} questions with "
                               f"{cfg.min_answers}+ answers could be converted ({inline_counts(written['skipped'])}); "
                               "nothing to write")
        dump.remove_tree(work)
        skipped = dict(st.skipped)
        skipped.update({k: counts[k] for k in ("orphan_answer", "duplicate_question", "duplicate_answer")})
        skipped.update(written["skipped"])
        stats = {
            "input": files.source, "site": site, "site_source": site_source,
            "upvote_source": "votes" if use_votes else "score", "votes_read": votes_read,
            "posts_read": st.rows, "post_types": dict(sorted(st.post_types.items())),
            "questions_read": counts["questions_read"], "answers_read": counts["answers_read"],
            "questions_kept": questions_kept,
            "questions_too_few_answers": counts["questions_read"] - counts["questions_kept"],
            "answers_kept": sum(s["answers"] for s in splits.values()),
            "pairs": sum(s["pairs"] for s in splits.values()),
            "skipped": dict(sorted(skipped.items())),
            "score_histogram": written["score_histogram"], "splits": splits,
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp / "config.yaml")
        (tmp / "README.md").write_text(data_card(f"Stack Exchange preference pairs: {site or files.source}",
                                                 stats, _card_text(cfg, stats)))
    return DataResult(out, stats)
