"""Stack Exchange data stage: score formula, pairs, splits, HTML->Markdown, output layout, bad input."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from camelid.data import SPLITS, sample_dump_path, split_path
from camelid.data.markdown import html_to_markdown
from camelid.data.scoring import answer_score, make_pairs, split_bounds
from camelid.data.stackexchange import StackExchangeConfig, run
from camelid.errors import CamelidError
from camelid.qa import load_split

SAMPLE_TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_sample"
"""The sample-dump generator: a build tool beside the package, not part of it."""


@pytest.fixture(scope="module")
def make_sample():
    """tools/make_sample/make_sample.py as a module (its tables are imported from beside it)."""
    sys.path.insert(0, str(SAMPLE_TOOL))
    try:
        return importlib.import_module("make_sample")
    finally:
        sys.path.remove(str(SAMPLE_TOOL))


@pytest.mark.parametrize(
    "upvotes, accepted, vote_score, expected",
    [
        (0, False, 0, 0),      # no votes: log2(1) = 0
        (0, True, 0, 1),       # accepted adds 1
        (1, False, 1, 1),      # log2(2) = 1
        (2, False, 2, 2),      # log2(3) = 1.58 -> 2
        (5, False, 5, 3),      # log2(6) = 2.58 -> 3
        (10, False, 10, 3),    # log2(11) = 3.46 -> 3
        (11, False, 11, 4),    # log2(12) = 3.58 -> 4
        (100, True, 100, 8),   # log2(101) = 6.66 -> 7, + 1 accepted
        (7, False, 3, 3),      # upvotes (from Votes.xml) drive the value, not the net score
        (5, False, -1, -1),    # net score negative -> -1 ...
        (5, True, -2, -1),     # ... even when accepted
        (0, False, -1, -1),
    ],
)
def test_answer_score_table(upvotes, accepted, vote_score, expected):
    assert answer_score(upvotes, accepted, vote_score) == expected


def test_pairs_all_different_scores_better_first_ties_dropped():
    scores = [3, 1, 3, 0]
    pairs = make_pairs(scores, cap=10, seed=0, qid=1)
    # 6 unordered pairs, one tie (0, 2) dropped
    assert sorted(pairs) == [(0, 1), (0, 3), (1, 3), (2, 1), (2, 3)]
    assert all(scores[j] > scores[k] for j, k in pairs)


def test_pair_cap_is_a_seeded_sample_without_replacement():
    scores = [5, 4, 3, 2, 1, 0]  # 15 pairs
    full = set(make_pairs(scores, cap=100, seed=0, qid=7))
    assert len(full) == 15
    a = make_pairs(scores, cap=10, seed=42, qid=7)
    assert len(a) == len(set(a)) == 10 and set(a) <= full
    assert a == make_pairs(scores, cap=10, seed=42, qid=7)  # deterministic
    others = {tuple(make_pairs(scores, cap=10, seed=s, qid=7)) for s in range(20)}
    assert len(others) > 1  # the seed matters


def test_split_bounds_exact_and_complete():
    assert split_bounds(200, (0.3, 0.3, 0.3, 0.1)) == [60, 120, 180, 200]
    assert split_bounds(7, (0.3, 0.3, 0.3, 0.1))[-1] == 7
    assert split_bounds(3, (1, 0, 0, 0)) == [3, 3, 3, 3]


@pytest.mark.parametrize(
    "html, expected",
    [
        ('<pre><code class="lang-python">if a &lt; b:\n    print(&quot;x&quot;)\n</code></pre>',
         '```python\nif a < b:\n    print("x")\n```'),
        ('<pre class="lang-haskell prettyprint-override"><code>main = print $ 1\n</code></pre>',
         "```haskell\nmain = print $ 1\n```"),
        ("<!-- language: lang-js -->\n<pre><code>var x = 1;\n</code></pre>", "```js\nvar x = 1;\n```"),
        ("<pre><code>plain\n</code></pre>", "```\nplain\n```"),
        ("<ul>\n<li>one</li>\n<li>two\n<ul>\n<li>inner</li>\n</ul>\n</li>\n</ul>", "- one\n- two\n  - inner"),
        ('<p>See <a href="https://example.org/a_b">the docs</a>.</p>', "See [the docs](https://example.org/a_b)."),
        ("<p>Fish &amp; chips &quot;now&quot; &#39;ok&#39; &gt; 3</p>", "Fish & chips \"now\" 'ok' > 3"),
        ("<p>Euler: $e^{i\\pi} + 1 = 0$ and $x_1 * x_2$ in my_var</p>", "Euler: $e^{i\\pi} + 1 = 0$ and $x_1 * x_2$ in my_var"),
        ("<p>a</p>\n\n\n\n<p></p><p></p>\n\n<p>b</p>", "a\n\nb"),
        ("<pre><code>keep\n\n\n\nblank lines\n</code></pre>", "```\nkeep\n\n\n\nblank lines\n```"),
    ],
)
def test_html_to_markdown(html, expected):
    assert html_to_markdown(html) == expected


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("se") / "sample"
    return run(StackExchangeConfig(out=str(out), progress=False, workers=1))


def _qids(path):
    return set(pq.read_table(path, columns=["qid"]).column("qid").to_pylist())


def test_sample_layout_loads_with_datasets(sample_out):
    import datasets

    d = datasets.load_dataset("parquet", data_dir=str(sample_out.out))
    assert sorted(d) == sorted(SPLITS)
    assert d["reward"].column_names == ["qid", "question", "date", "metadata", "response_j", "response_k", "score_j", "score_k"]
    assert sum(d[s].num_rows for s in SPLITS) == sample_out.stats["pairs"] > 0
    answers = load_split(sample_out.out, "answers")
    assert answers.num_rows == sample_out.stats["answers_kept"]
    assert (sample_out.out / "README.md").read_text().count("## Splits") == 1
    assert not list(sample_out.out.parent.glob("sample.tmp-*"))  # the temporary folder was renamed


def test_no_question_in_two_splits_and_fractions(sample_out):
    seen = {s: _qids(split_path(sample_out.out, s)) for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not seen[a] & seen[b]
    answers = pq.read_table(split_path(sample_out.out, "answers")).to_pylist()
    by_split = {r["qid"]: r["split"] for r in answers}
    for s in SPLITS:
        assert all(by_split[q] == s for q in seen[s])
    n = sample_out.stats["questions_kept"]
    counts = [sample_out.stats["splits"][s]["questions"] for s in SPLITS]
    assert counts == [b - a for a, b in zip([0, *split_bounds(n, (0.3, 0.3, 0.3, 0.1))], split_bounds(n, (0.3, 0.3, 0.3, 0.1)))]


def test_pairs_respect_cap_and_scores(sample_out, tmp_path):
    rows = [r for s in SPLITS for r in pq.read_table(split_path(sample_out.out, s)).to_pylist()]
    assert all(r["score_j"] > r["score_k"] for r in rows)
    capped = run(StackExchangeConfig(out=str(tmp_path / "cap2"), pairs_per_question=2, progress=False, workers=1))
    per_q = {}
    for s in SPLITS:
        for q in pq.read_table(split_path(capped.out, s), columns=["qid"]).column("qid").to_pylist():
            per_q[q] = per_q.get(q, 0) + 1
    assert max(per_q.values()) == 2


def test_rerun_is_byte_identical_and_workers_do_not_matter(sample_out, tmp_path):
    again = run(StackExchangeConfig(out=str(tmp_path / "again"), progress=False, workers=2))
    for s in (*SPLITS, "answers"):
        assert split_path(again.out, s).read_bytes() == split_path(sample_out.out, s).read_bytes()
    other = run(StackExchangeConfig(out=str(tmp_path / "seed7"), seed=7, progress=False, workers=1))
    assert _qids(split_path(other.out, "evaluation")) != _qids(split_path(sample_out.out, "evaluation"))


def test_sample_quality_signal_is_not_length_only(sample_out, make_sample):
    rows = [r for s in SPLITS for r in pq.read_table(split_path(sample_out.out, s)).to_pylist()]
    longer_wins = sum(len(r["response_j"]) > len(r["response_k"]) for r in rows) / len(rows)
    assert 0.5 < longer_wins < 0.7, longer_wins  # length alone is a weak baseline
    rude = tuple(make_sample.RUDE_OPEN)
    # Rude answers are net-negative (score -1, the minimum), so they are never the preferred one.
    assert not any(r["response_j"].startswith(rude) for r in rows)
    assert any(r["response_k"].startswith(rude) for r in rows)
    assert any("```python" in r["response_j"] for r in rows)


def test_sample_regenerates_identical_bytes(tmp_path, make_sample):
    """The generator run as its usage line says, from another folder, rebuilds the packaged sample."""
    script = SAMPLE_TOOL / "make_sample.py"
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "again")], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    for name in ("Posts.xml", "Votes.xml"):
        assert (tmp_path / "again" / name).read_bytes() == (sample_dump_path() / name).read_bytes(), name
    assert make_sample.SAMPLE_DIR == sample_dump_path()
    assert 150 <= len(make_sample.questions()) <= 250
    size = sum((sample_dump_path() / n).stat().st_size for n in ("Posts.xml", "Votes.xml"))
    assert size < 2_000_000
    assert (sample_dump_path() / "Posts.xml").read_bytes().startswith(b"\xef\xbb\xbf<?xml")


def test_load_split_errors(sample_out, tmp_path):
    with pytest.raises(CamelidError, match="no rl split"):
        load_split(tmp_path, "rl")
    with pytest.raises(CamelidError, match="unknown split"):
        load_split(sample_out.out, "train")
    bad = tmp_path / "bad"
    split_path(bad, "rl").parent.mkdir(parents=True)
    pq.write_table(pq.read_table(split_path(sample_out.out, "rl")).drop(["response_k"]), split_path(bad, "rl"))
    with pytest.raises(CamelidError, match="lacks column"):
        load_split(bad, "rl")
    assert math.isclose(load_split(sample_out.out, "rl").num_rows, sample_out.stats["splits"]["rl"]["pairs"])
