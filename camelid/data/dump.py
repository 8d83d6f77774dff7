"""Read a Stack Exchange dump as a stream of rows: input resolution, streaming XML, parquet chunks.

Real dumps (https://archive.org/details/stackexchange) differ by year, and all of this holds:
every file starts with a UTF-8 BOM; bodies are HTML stored XML-escaped; rows are not always in
Id order (2024 dumps put all questions before all answers); tags are `<a><b>` in older dumps and
`|a|b|` in 2024 ones; other post types (tag wikis...) and answers without their question exist.

The parser is expat fed 1 MB at a time and only keeps the attributes of the rows of the current
chunk, so memory does not depend on the file's size (StackOverflow's Posts.xml is ~100 GB).
Rows go straight to parquet files in row groups; grouping happens later, on disk, in DuckDB.
"""

from __future__ import annotations

import re
import shutil
import xml.parsers.expat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from camelid.errors import CamelidError

READ_BYTES = 1 << 20  # expat is fed this much at a time
FLUSH_BYTES = 32 << 20  # a parquet row group is written when its buffered text reaches this
MAX_EXTRACT_GB = 400.0
"""Default cap on what a .7z may unpack to, per member and in total (Posts.xml + Votes.xml).
StackOverflow's Posts.xml is ~100 GB, so real dumps fit; a forged or hostile archive whose
headers promise more is refused before anything is written. `--max-extract-gb` raises it."""
_SITE_NAME = re.compile(r"^([a-z0-9-]+(?:\.[a-z0-9-]+)+?)(?:-posts|-votes)?$", re.I)
_LINK_HOST = re.compile(r"https?://([a-z0-9.-]+\.[a-z]+)/(?:questions|q|a)/\d+", re.I)
_TAG_ANGLE = re.compile(r"<([^<>]+)>")


@dataclass
class DumpFiles:
    """Where a dump's Posts.xml (and Votes.xml, when present) can be read from."""

    posts: Path
    votes: Path | None
    site: str | None
    source: str


def site_from_name(name: str) -> str | None:
    """`cardano.stackexchange.com.7z` / `stackoverflow.com-Posts.7z` -> the site's host name."""
    stem = name[:-3] if name.lower().endswith(".7z") else name
    m = _SITE_NAME.match(stem)
    return m.group(1).lower() if m and not stem.lower().endswith(".xml") else None


def resolve_dump(path: str | Path, workdir: Path, max_extract_gb: float = MAX_EXTRACT_GB) -> DumpFiles:
    """A folder with Posts.xml, a Posts.xml file, or a `*.7z` archive (extracted into `workdir`,
    at most `max_extract_gb` GB unpacked)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CamelidError(f"{p} does not exist; give a dump folder, a Posts.xml file or a site .7z archive")
    if p.is_dir():
        posts = _find_ci(p, "Posts.xml")
        if posts is None:
            archives = sorted(p.glob("*.7z"))
            if len(archives) == 1:
                return resolve_dump(archives[0], workdir, max_extract_gb)
            raise CamelidError(f"{p} has no Posts.xml; give the folder an extracted dump was unpacked into")
        return DumpFiles(posts, _find_ci(p, "Votes.xml"), site_from_name(p.resolve().name), str(p))
    if p.suffix.lower() == ".7z":
        return _extract_7z(p, workdir, ExtractBudget(int(max_extract_gb * 1e9)))
    return DumpFiles(p, _find_ci(p.parent, "Votes.xml") if p.name.lower() == "posts.xml" else None,
                     site_from_name(p.resolve().parent.name), str(p))


def _find_ci(folder: Path, name: str) -> Path | None:
    for child in folder.iterdir():
        if child.name.lower() == name.lower() and child.is_file():
            return child
    return None


@dataclass
class ExtractBudget:
    """Bytes that archive members may still unpack to; checked against each member's header size
    before extraction (py7zr writes exactly the size the header gives), so a zip bomb fails
    with a one-line error instead of filling the disk."""

    cap: int
    used: int = 0

    def take(self, archive: Path, member: str, size: int) -> None:
        if size > self.cap - self.used:
            over = "alone" if size > self.cap else f"with the {self.used / 1e9:.3g} GB already extracted"
            raise CamelidError(f"{archive}: {member} unpacks to {size / 1e9:.3g} GB, {over} over the "
                               f"{self.cap / 1e9:.3g} GB extraction cap; if the archive is trusted, "
                               "raise the cap with --max-extract-gb")
        self.used += size


def _members(z: object, wanted: set[str]) -> dict[str, object]:
    """The archive's file entries whose base name (lower case) is in `wanted`, by that name."""
    return {f.filename.rsplit("/", 1)[-1].lower(): f for f in z.list()
            if not f.is_directory and f.filename.rsplit("/", 1)[-1].lower() in wanted}


def _extract_7z(archive: Path, workdir: Path, budget: ExtractBudget) -> DumpFiles:
    """Extract only Posts.xml and Votes.xml, to disk: a big site's Posts.xml is far larger than RAM."""
    import py7zr

    out = workdir / "extracted"
    try:
        with py7zr.SevenZipFile(archive) as z:
            found = _members(z, {"posts.xml", "votes.xml"})
            if "posts.xml" not in found:
                names = z.getnames()
                raise CamelidError(f"{archive} has no Posts.xml (it holds {', '.join(names[:5]) or 'nothing'}); "
                                   "give the site's full archive or its -Posts.7z")
            for f in found.values():
                budget.take(archive, f.filename, f.uncompressed or 0)
            out.mkdir(parents=True, exist_ok=True)
            z.extract(path=out, targets=[f.filename for f in found.values()])
    except (py7zr.exceptions.Bad7zFile, py7zr.exceptions.ArchiveError, EOFError, OSError) as e:
        raise CamelidError(f"{archive} is not a readable 7z archive ({e}); download it again") from None
    posts = out / found["posts.xml"].filename
    votes = out / found["votes.xml"].filename if "votes.xml" in found else None
    if votes is None:  # StackOverflow ships one archive per table: look for its -Votes.7z sibling.
        sibling = archive.with_name(archive.name.replace("-Posts.7z", "-Votes.7z"))
        if sibling != archive and sibling.is_file():
            votes = _extract_7z_member(sibling, "votes.xml", out, budget)
    return DumpFiles(posts, votes, site_from_name(archive.name), str(archive))


def _extract_7z_member(archive: Path, member: str, out: Path, budget: ExtractBudget) -> Path | None:
    import py7zr

    with py7zr.SevenZipFile(archive) as z:
        found = _members(z, {member})
        if not found:
            return None
        (f,) = found.values()
        budget.take(archive, f.filename, f.uncompressed or 0)
        z.extract(path=out, targets=[f.filename])
    return out / f.filename


def iter_rows(path: Path, root: str, on_bytes: Callable[[int], None] | None = None) -> Iterator[list[dict]]:
    """Yield the attribute dicts of `<row>` elements under `<root>`, one list per 1 MB read.

    expat decodes the BOM, the XML entities (`&lt;`, `&#xA;` ...) and the UTF-8 itself. A file
    that is not XML, is cut short, or has another root raises a one-line CamelidError.
    """
    rows: list[dict] = []
    depth = [0]
    seen_root = [False]

    def start(name: str, attrs: dict) -> None:
        if depth[0] == 0:
            if name != root:
                raise CamelidError(f"{path} is not a Stack Exchange {root.capitalize()}.xml (its root element is <{name}>)")
            seen_root[0] = True
        elif depth[0] == 1 and name == "row":
            rows.append(attrs)
        depth[0] += 1

    def end(name: str) -> None:
        depth[0] -= 1

    parser = xml.parsers.expat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    final = False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_BYTES):
                parser.Parse(chunk, False)
                if on_bytes:
                    on_bytes(len(chunk))
                if rows:
                    yield rows
                    rows = []
            final = True
            parser.Parse(b"", True)
    except xml.parsers.expat.ExpatError as e:
        if not seen_root[0]:
            raise CamelidError(f"{path} is empty or not XML; give a Stack Exchange dump's {root.capitalize()}.xml") from None
        what = "is truncated (it ends before its closing tag)" if final else "is not well-formed XML"
        raise CamelidError(f"{path} {what}: {xml.parsers.expat.ErrorString(e.code)} at line {e.lineno}; "
                           "download or extract it again") from None
    if rows:
        yield rows


def parse_tags(raw: str | None) -> list[str]:
    """`<a><b>` (dumps up to 2023) or `|a|b|` (2024 dumps) -> ['a', 'b']."""
    if not raw:
        return []
    if "<" in raw:
        return _TAG_ANGLE.findall(raw)
    return [t for t in raw.split("|") if t]


QUESTION_SCHEMA = pa.schema([
    ("qid", pa.int64()), ("title", pa.string()), ("body", pa.string()), ("tags", pa.list_(pa.string())),
    ("date", pa.string()), ("accepted", pa.int64()), ("score", pa.int64()),
])
ANSWER_SCHEMA = pa.schema([
    ("aid", pa.int64()), ("parent", pa.int64()), ("body", pa.string()), ("score", pa.int64()),
    ("date", pa.string()),
])
UPVOTE_SCHEMA = pa.schema([("post_id", pa.int64()), ("n", pa.int64())])


class ChunkWriter:
    """Append rows to one parquet file in row groups of bounded size (memory stays flat)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.cols: dict[str, list] = {n: [] for n in schema.names}
        self.buffered = 0
        self.rows = 0

    def add(self, row: tuple, nbytes: int = 64) -> None:
        for col, v in zip(self.cols.values(), row):
            col.append(v)
        self.buffered += nbytes
        if self.buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        n = len(next(iter(self.cols.values())))
        if n:
            self.writer.write_table(pa.table(self.cols, schema=self.schema))
            self.rows += n
            self.cols = {k: [] for k in self.cols}
        self.buffered = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # the parquet columns' range


def to_int64(v: object) -> int | None:
    """An integer that fits the int64 columns, or None (missing, not an integer, out of range).

    A 20-digit id would otherwise pass here and fail the whole build when its row group is
    written; None lets the caller skip (and count) just that row.
    """
    if v is None or isinstance(v, bool):
        return None
    try:
        n = int(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        return None
    return n if INT64_MIN <= n <= INT64_MAX else None


@dataclass
class PostStats:
    """What the streaming pass saw, by kind; every skipped row is counted under a reason
    (`bad_id` / `bad_score`: missing, not an integer, or beyond int64)."""

    rows: int = 0
    post_types: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    link_hosts: Counter = field(default_factory=Counter)


def ingest_post_rows(rows: list[dict], qw: ChunkWriter, aw: ChunkWriter, st: PostStats) -> None:
    """Route one batch of Posts.xml rows to the question and answer chunk files."""
    for r in rows:
        st.rows += 1
        pid, ptype, score = to_int64(r.get("Id")), r.get("PostTypeId"), to_int64(r.get("Score", "0"))
        st.post_types[ptype or "missing"] += 1
        if ptype not in ("1", "2"):
            st.skipped["other_post_type"] += 1
            continue
        body = r.get("Body") or ""
        if pid is None:
            st.skipped["bad_id"] += 1
        elif score is None:
            st.skipped["bad_score"] += 1
        elif not body.strip():
            st.skipped["empty_body"] += 1
        elif ptype == "1":
            title = (r.get("Title") or "").strip()
            if not title:
                st.skipped["question_without_title"] += 1
                continue
            for host in _LINK_HOST.findall(body[:20000]):
                st.link_hosts[host.lower()] += 1
            qw.add((pid, title, body, parse_tags(r.get("Tags")), r.get("CreationDate", ""),
                    to_int64(r.get("AcceptedAnswerId")), score), len(body))
        else:
            parent = to_int64(r.get("ParentId"))
            if parent is None:
                st.skipped["answer_without_parent"] += 1
                continue
            aw.add((pid, parent, body, score, r.get("CreationDate", "")), len(body))


def ingest_vote_rows(rows: list[dict], vw: ChunkWriter) -> int:
    """Count up-votes (VoteTypeId 2) per post in one batch; the totals are summed in DuckDB."""
    counts: Counter = Counter()
    for r in rows:
        if r.get("VoteTypeId") == "2":
            pid = to_int64(r.get("PostId"))
            if pid is not None:
                counts[pid] += 1
    for pid, n in counts.items():
        vw.add((pid, n), 16)
    return len(rows)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
