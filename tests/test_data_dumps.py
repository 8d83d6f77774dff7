"""Real dumps (../shared/evaldata), format variants, malformed rows, archives and bad inputs.

The expected counts are computed here from the XML with ElementTree, independently of the
stage's streaming parser and DuckDB grouping.
"""

from __future__ import annotations

import itertools
import json
import math
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from camelid.cli import main
from camelid.data import SPLITS, sample_dump_path, split_path
from camelid.data.stackexchange import StackExchangeConfig, run
from camelid.errors import CamelidError


def independent_counts(folder: Path, cap: int = 10) -> dict[str, int]:
    posts = [r.attrib for r in ET.parse(folder / "Posts.xml").getroot()]
    up: Counter = Counter()
    if (folder / "Votes.xml").exists():
        up.update(r.get("PostId") for r in ET.parse(folder / "Votes.xml").getroot() if r.get("VoteTypeId") == "2")
    questions = {p["Id"]: p for p in posts if p["PostTypeId"] == "1"}
    answers = defaultdict(list)
    for p in posts:
        if p["PostTypeId"] == "2" and p["ParentId"] in questions:
            answers[p["ParentId"]].append(p)

    def score(a, accepted):
        if int(a["Score"]) < 0:
            return -1
        ups = up[a["Id"]] if up else max(int(a["Score"]), 0)
        return round(math.log2(1 + ups)) + (a["Id"] == accepted)

    kept = {q: a for q, a in answers.items() if len(a) >= 2}
    pairs = 0
    for q, ans in kept.items():
        s = [score(a, questions[q].get("AcceptedAnswerId")) for a in ans]
        pairs += min(cap, sum(x != y for x, y in itertools.combinations(s, 2)))
    return {"questions_read": len(questions), "answers_read": sum(p["PostTypeId"] == "2" for p in posts),
            "questions_kept": len(kept), "answers_kept": sum(map(len, kept.values())), "pairs": pairs}


@pytest.mark.parametrize("name, upvotes", [("se-cardano", "votes"), ("se-datascience-meta-2024", "score")])
def test_real_dump_counts_match_independent_count(evaldata, tmp_path, name, upvotes):
    folder = evaldata / name
    result = run(StackExchangeConfig(input=str(folder), out=str(tmp_path / name), progress=False, workers=1))
    expected = independent_counts(folder)
    assert {k: result.stats[k] for k in expected} == expected
    assert result.stats["upvote_source"] == upvotes
    assert result.stats["skipped"]["orphan_answer"] == 0
    rows = pq.read_table(split_path(result.out, "finetune")).to_pylist()
    assert all(r["metadata"]["tags"] for r in rows)  # both `<a><b>` and `|a|b|` tags parsed
    assert result.stats["site"].endswith("stackexchange.com")


def test_cardano_score_only_mode_matches_stackllama_counting(evaldata, tmp_path):
    folder = evaldata / "se-cardano"
    result = run(StackExchangeConfig(input=str(folder), out=str(tmp_path / "o"), upvotes="score", progress=False, workers=1))
    votes_hidden = tmp_path / "posts-only"
    votes_hidden.mkdir()
    (votes_hidden / "Posts.xml").symlink_to(folder / "Posts.xml")
    assert result.stats["pairs"] == independent_counts(votes_hidden)["pairs"]


ROWS = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="20" PostTypeId="2" ParentId="10" Score="5" Body="&lt;p&gt;Best &amp;amp; right&lt;/p&gt;" CreationDate="2024-01-02T00:00:00.000" />
  <row Id="21" PostTypeId="2" ParentId="10" Score="-2" Body="&lt;p&gt;Wrong&lt;/p&gt;" />
  <row Id="22" PostTypeId="2" ParentId="99" Score="1" Body="&lt;p&gt;orphan&lt;/p&gt;" />
  <row Id="23" PostTypeId="2" Score="1" Body="&lt;p&gt;no parent&lt;/p&gt;" />
  <row Id="x" PostTypeId="1" Score="1" Title="bad id" Body="&lt;p&gt;q&lt;/p&gt;" />
  <row Id="24" PostTypeId="2" ParentId="10" Score="1" Body="" />
  <row Id="25" PostTypeId="2" ParentId="10" Score="many" Body="&lt;p&gt;bad score&lt;/p&gt;" />
  <row Id="10" PostTypeId="1" AcceptedAnswerId="20" Score="3" Title="Why &amp; how?" Tags="|alpha|beta|" Body="&lt;p&gt;Question body $x$&lt;/p&gt;" CreationDate="2024-01-01T00:00:00.000" />
  <row Id="11" PostTypeId="1" Score="3" Body="&lt;p&gt;no title&lt;/p&gt;" />
  <row Id="30" PostTypeId="4" Body="&lt;p&gt;wiki&lt;/p&gt;" />
  <row Id="10" PostTypeId="1" Score="3" Title="dup" Body="&lt;p&gt;dup&lt;/p&gt;" />
</posts>
"""


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    (tmp_path / "Posts.xml").write_text(ROWS, encoding="utf-8")
    r = run(StackExchangeConfig(input=str(tmp_path / "Posts.xml"), out=str(tmp_path / "o"), site="x.stackexchange.com",
                                progress=False, workers=1))
    assert r.stats["skipped"] == {
        "answer_without_parent": 1, "bad_id": 1, "bad_score": 1, "duplicate_answer": 0, "duplicate_question": 1,
        "empty_body": 1, "orphan_answer": 1, "other_post_type": 1, "question_without_title": 1,
    }
    assert (r.stats["questions_kept"], r.stats["answers_kept"], r.stats["pairs"]) == (1, 2, 1)
    (pair,) = [row for s in SPLITS for row in pq.read_table(split_path(r.out, s)).to_pylist()]
    assert pair["question"] == "Why & how?\n\nQuestion body $x$"
    assert (pair["response_j"], pair["score_j"], pair["score_k"]) == ("Best & right", 4, -1)  # 5 up + accepted
    assert pair["metadata"]["tags"] == ["alpha", "beta"]
    assert pair["metadata"]["answer_j_url"] == "https://x.stackexchange.com/a/20"


def _sample_7z(path: Path, names=("Posts.xml", "Votes.xml")) -> Path:
    import py7zr

    with py7zr.SevenZipFile(path, "w") as z:
        for n in names:
            z.write(sample_dump_path() / n, arcname=n)
    return path


def test_7z_archive_gives_the_same_dataset(tmp_path):
    archive = _sample_7z(tmp_path / "sample.stackexchange.com.7z")
    a = run(StackExchangeConfig(input=str(archive), out=str(tmp_path / "a"), progress=False, workers=1))
    b = run(StackExchangeConfig(input=str(sample_dump_path()), out=str(tmp_path / "b"), progress=False, workers=1))
    assert a.stats["site"] == "sample.stackexchange.com" and a.stats["upvote_source"] == "votes"
    assert split_path(a.out, "rl").read_bytes().count(b"response_j") >= 1
    assert pq.read_table(split_path(a.out, "rl")).drop(["metadata"]) == pq.read_table(split_path(b.out, "rl")).drop(["metadata"])


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    not_xml = tmp_path / "notxml" / "Posts.xml"
    not_xml.parent.mkdir()
    not_xml.write_text("Id,Body\n1,hello\n")
    truncated = tmp_path / "trunc" / "Posts.xml"
    truncated.parent.mkdir()
    data = (sample_dump_path() / "Posts.xml").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    only_q = tmp_path / "onlyq" / "Posts.xml"
    only_q.parent.mkdir()
    only_q.write_text('<?xml version="1.0"?><posts><row Id="1" PostTypeId="1" Score="0" Title="t" Body="b" /></posts>')
    votes_as_posts = tmp_path / "votes" / "Posts.xml"
    votes_as_posts.parent.mkdir()
    votes_as_posts.write_bytes((sample_dump_path() / "Votes.xml").read_bytes())
    return {
        "not xml": (not_xml, "not XML"),
        "truncated": (truncated, "truncated"),
        "archive without Posts.xml": (_sample_7z(tmp_path / "x.7z", ("Votes.xml",)), "has no Posts.xml"),
        "empty result": (only_q, "no question has 2\\+ answers"),
        "wrong file": (votes_as_posts, "root element is <votes>"),
        "missing": (tmp_path / "nope", "does not exist"),
    }


@pytest.mark.parametrize("case", ["not xml", "truncated", "archive without Posts.xml", "empty result", "wrong file", "missing"])
def test_bad_inputs_are_one_line_errors(tmp_path, case):
    path, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(CamelidError, match=message) as e:
        run(StackExchangeConfig(input=str(path), out=str(tmp_path / "out"), progress=False, workers=1))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))  # nothing half-written


def test_cli_bad_dump_exits_1_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.7z"
    bad.write_bytes(b"not an archive")
    assert main(["data", "stackexchange", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    *status, err = capsys.readouterr().err.strip().splitlines()
    assert status == [f"reading {bad}"] and err.startswith("camelid: error:") and "7z" in err


def test_cli_builds_sample(tmp_path, capsys):
    assert main(["data", "stackexchange", "--out", str(tmp_path / "o"), "--no-progress", "--max-questions", "40",
                 "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "40 questions" in out and (tmp_path / "o" / "stats.json").is_file()


def _posts_xml(rows: list[str]) -> str:
    return '\ufeff<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows) + "\n</posts>\n"


def _row(pid, ptype, body, **attrs) -> str:
    from xml.sax.saxutils import quoteattr

    extra = " ".join(f"{k}={quoteattr(str(v))}" for k, v in attrs.items())
    return f'  <row Id="{pid}" PostTypeId="{ptype}" Body={quoteattr(body)} {extra} />'


def test_deeply_nested_html_skips_its_post_not_the_build(tmp_path):
    deep = "<div>" * 2000 + "<p>deep</p>" + "</div>" * 2000  # beyond markdownify's recursion
    rows = [
        _row(10, 1, "<p>fine question</p>", Title="Q10", Score=1),
        _row(20, 2, "<p>good</p>", ParentId=10, Score=5), _row(21, 2, "<p>bad</p>", ParentId=10, Score=0),
        _row(22, 2, deep, ParentId=10, Score=1),
        _row(11, 1, deep, Title="Q11", Score=1),  # the question itself: skipped with its answers
        _row(23, 2, "<p>a</p>", ParentId=11, Score=5), _row(24, 2, "<p>b</p>", ParentId=11, Score=0),
        _row(12, 1, "<p>q12</p>", Title="Q12", Score=1),  # one answer left: below min_answers
        _row(25, 2, "<p>c</p>", ParentId=12, Score=5), _row(26, 2, deep, ParentId=12, Score=0),
    ]
    (tmp_path / "Posts.xml").write_text(_posts_xml(rows), encoding="utf-8")
    r = run(StackExchangeConfig(input=str(tmp_path / "Posts.xml"), out=str(tmp_path / "o"), progress=False, workers=1))
    assert r.stats["skipped"]["html_too_deeply_nested"] == 3
    assert r.stats["skipped"]["question_too_few_convertible_answers"] == 1
    assert (r.stats["questions_kept"], r.stats["answers_kept"], r.stats["pairs"]) == (1, 2, 1)
    assert json.loads((r.out / "stats.json").read_text())["skipped"]["html_too_deeply_nested"] == 3
    (pair,) = [row for s in SPLITS for row in pq.read_table(split_path(r.out, s)).to_pylist()]
    assert (pair["question"], pair["response_j"], pair["response_k"]) == ("Q10\n\nfine question", "good", "bad")


def test_ids_and_scores_beyond_int64_are_skipped_and_counted(tmp_path):
    huge = "9" * 20
    rows = [
        _row(10, 1, "<p>q</p>", Title="Q", Score=1, AcceptedAnswerId=huge),
        _row(20, 2, "<p>good</p>", ParentId=10, Score=5), _row(21, 2, "<p>bad</p>", ParentId=10, Score=0),
        _row(huge, 2, "<p>huge id</p>", ParentId=10, Score=1),
        _row(22, 2, "<p>huge score</p>", ParentId=10, Score=huge),
        _row(23, 2, "<p>huge parent</p>", ParentId=huge, Score=1),
    ]
    (tmp_path / "Posts.xml").write_text(_posts_xml(rows), encoding="utf-8")
    (tmp_path / "Votes.xml").write_text('<?xml version="1.0"?>\n<votes>\n  <row Id="1" PostId="20" VoteTypeId="2" />\n'
                                        f'  <row Id="2" PostId="{huge}" VoteTypeId="2" />\n</votes>\n')
    r = run(StackExchangeConfig(input=str(tmp_path), out=str(tmp_path / "o"), progress=False, workers=1))
    skipped = r.stats["skipped"]
    assert (skipped["bad_id"], skipped["bad_score"], skipped["answer_without_parent"]) == (1, 1, 1)
    assert (r.stats["answers_kept"], r.stats["pairs"]) == (2, 1)


def test_single_quotes_in_input_and_output_paths(tmp_path):
    src = tmp_path / "it's a dump"
    src.mkdir()
    for name in ("Posts.xml", "Votes.xml"):
        (src / name).symlink_to(sample_dump_path() / name)
    r = run(StackExchangeConfig(input=str(src), out=str(tmp_path / "o'ut" / "data'set"), progress=False, workers=1,
                                max_questions=30))
    assert r.out.name == "data'set" and r.stats["questions_kept"] == 30
    assert sum(pq.read_table(split_path(r.out, s)).num_rows for s in SPLITS) == r.stats["pairs"] > 0


def test_7z_over_the_extraction_cap_is_refused_before_extracting(tmp_path):
    archive = _sample_7z(tmp_path / "site.stackexchange.com.7z")
    posts_kb = (sample_dump_path() / "Posts.xml").stat().st_size / 1e3
    for cap_kb, needle in [(posts_kb / 2, r"Posts.xml unpacks to .* GB, alone over"),
                           (posts_kb * 2.5, r"Votes.xml unpacks to .* with the .* already extracted")]:
        with pytest.raises(CamelidError, match=needle + r".*raise the cap with --max-extract-gb") as e:
            run(StackExchangeConfig(input=str(archive), out=str(tmp_path / "o"), progress=False, workers=1,
                                    max_extract_gb=cap_kb / 1e6))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))
    ok = run(StackExchangeConfig(input=str(archive), out=str(tmp_path / "o"), progress=False, workers=1,
                                 max_extract_gb=posts_kb * 4 / 1e6))
    assert ok.stats["upvote_source"] == "votes"


def test_cli_extraction_cap_flag(tmp_path, capsys):
    archive = _sample_7z(tmp_path / "site.stackexchange.com.7z")
    assert main(["data", "stackexchange", str(archive), "--out", str(tmp_path / "o"), "--no-progress",
                 "--max-extract-gb", "0.0001"]) == 1  # the dump is over the cap: the work fails
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "reading ..." status line
    assert err.startswith("camelid: error:") and "--max-extract-gb" in err
