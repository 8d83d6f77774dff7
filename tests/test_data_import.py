"""`camelid data import`: the three layouts, four file formats (+ gzip), splits by prompt, bad input."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camelid.data import SPLITS, split_path
from camelid.qa import load_split
from camelid.data.importer import ImportConfig, run, split_hh
from camelid.errors import CamelidError


def _all_pairs(out):
    return [r for s in SPLITS for r in pq.read_table(split_path(out, s)).to_pylist()]


def _run(tmp_path, path, **kw):
    return run(ImportConfig(input=str(path), out=str(tmp_path / "out"), progress=False, **kw))


def test_split_hh_shared_prefix_is_the_prompt():
    single = split_hh("\n\nHuman: Hi there?\n\nAssistant: Hello! How can I help?",
                      "\n\nHuman: Hi there?\n\nAssistant: Go away.")
    assert single == ("Hi there?", "Hello! How can I help?", "Go away.")
    multi = split_hh("\n\nHuman: A?\n\nAssistant: a.\n\nHuman: B?\n\nAssistant: Good b.",
                     "\n\nHuman: A?\n\nAssistant: a.\n\nHuman: B?\n\nAssistant: Bad.")
    assert multi == ("Human: A?\n\nAssistant: a.\n\nHuman: B?", "Good b.", "Bad.")
    # The replies share a first word: the prefix must still be cut at the last Assistant turn.
    assert split_hh("\n\nHuman: Q\n\nAssistant: Sure, yes", "\n\nHuman: Q\n\nAssistant: Sure, no")[0] == "Q"
    assert split_hh("\n\nHuman: one", "\n\nHuman: two") is None


def test_paired_jsonl_gz_keeps_questions_together(tmp_path):
    rows = [{"qid": q, "question": f"question {q}", "response_j": f"good {q}.{i}", "response_k": f"bad {q}.{i}",
             "score_j": 3, "score_k": 1, "date": "2020/01/01"} for q in range(40) for i in range(3)]
    path = tmp_path / "se-paired.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    r = _run(tmp_path, path)
    assert r.stats["layout"] == "paired" and r.stats["pairs"] == 120 and r.stats["questions_kept"] == 40
    split_of = {}
    for s in SPLITS:
        for row in pq.read_table(split_path(r.out, s)).to_pylist():
            assert split_of.setdefault(row["qid"], s) == s
            assert row["score_j"] == 3 and row["response_j"].startswith("good")
    assert [r.stats["splits"][s]["questions"] for s in SPLITS] == [12, 12, 12, 4]
    assert load_split(r.out, "answers").num_rows == 120  # three distinct chosen answers per question


def test_prompt_chosen_rejected_csv_parquet_json(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"yes,\n{i}", "rejected": f"no {i}"} for i in range(10)]
    from pyarrow import csv as pacsv

    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "prefs.csv")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    (tmp_path / "prefs.json").write_text(json.dumps(rows))
    for name in ("prefs.csv", "prefs.parquet", "prefs.json"):
        r = run(ImportConfig(input=str(tmp_path / name), out=str(tmp_path / name.replace(".", "_")), progress=False))
        pairs = sorted(_all_pairs(r.out), key=lambda x: x["question"])
        assert r.stats["layout"] == "prompt" and len(pairs) == 10, name
        assert (pairs[0]["question"], pairs[0]["response_j"], pairs[0]["response_k"]) == ("p0", "yes,\n0", "no 0")
        assert pairs[0]["score_j"] is None


def test_hh_transcripts_and_conversations(tmp_path):
    hh = [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: Helpful {i}.", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: Rude {i}."}
          for i in range(6)]
    hh.append({"chosen": "\n\nHuman: same", "rejected": "\n\nHuman: same"})  # no Assistant turn: skipped
    (tmp_path / "hh.jsonl").write_text("\n".join(map(json.dumps, hh)))
    r = _run(tmp_path, tmp_path / "hh.jsonl")
    assert r.stats["layout"] == "hh" and r.stats["pairs"] == 6 and r.stats["skipped"] == {"hh_no_shared_prompt": 1}
    assert {p["question"] for p in _all_pairs(r.out)} == {f"Q{i}?" for i in range(6)}
    conv = [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    (tmp_path / "conv.jsonl").write_text(json.dumps(conv[0]))
    r2 = run(ImportConfig(input=str(tmp_path / "conv.jsonl"), out=str(tmp_path / "c"), progress=False))
    (p,) = _all_pairs(r2.out)
    assert (p["question"], p["response_j"], p["response_k"]) == ("Hi?", "Hello.", "No.")


def test_folder_input_and_datasets_load(tmp_path):
    import datasets

    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        rows = [{"prompt": f"p{k}-{i}", "chosen": "c", "rejected": "r"} for i in range(20)]
        (src / f"part{k}.jsonl").write_text("\n".join(map(json.dumps, rows)))
    r = _run(tmp_path, src)
    assert r.stats["pairs"] == 40 and len(r.stats["files"]) == 2
    d = datasets.load_dataset("parquet", data_dir=str(r.out))
    assert sorted(d) == sorted(SPLITS) and sum(d[s].num_rows for s in SPLITS) == 40


def test_import_bad_inputs(tmp_path):
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "x", "label": 1}))
    with pytest.raises(CamelidError, match="match no known layout"):
        _run(tmp_path, tmp_path / "other.jsonl")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(CamelidError, match="could not be read"):
        _run(tmp_path, tmp_path / "broken.json")
    (tmp_path / "same.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}))
    with pytest.raises(CamelidError, match="no usable preference pair.*identical_responses 1"):
        _run(tmp_path, tmp_path / "same.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CamelidError, match="no .jsonl"):
        _run(tmp_path, tmp_path / "notes.txt")
    with pytest.raises(CamelidError, match="does not exist"):
        _run(tmp_path, tmp_path / "missing.jsonl")
    assert not (tmp_path / "out").exists()


def test_bad_records_are_counted_not_fatal(tmp_path):
    good = [{"prompt": f"p{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
    bad = [
        {"prompt": 5, "chosen": "a", "rejected": "b"},  # a number where text belongs
        {"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"},  # an object
        {"prompt": "p", "chosen": [{"role": "assistant", "content": 7}], "rejected": "b"},  # non-text content
        {"prompt": [1, 2], "chosen": "a", "rejected": "b"},  # a list that is not a conversation
    ]
    lines = [json.dumps(r) for r in good[:3] + bad] + ['{"prompt": "torn', "[1, 2]"] + [json.dumps(r) for r in good[3:]]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    r = _run(tmp_path, tmp_path / "mixed.jsonl")
    assert r.stats["pairs"] == 6 and r.stats["records_read"] == 12
    assert r.stats["skipped"] == {"field_not_text": 4, "bad_json_line": 1, "not_an_object": 1}
    assert json.loads((r.out / "stats.json").read_text())["skipped"] == r.stats["skipped"]


def test_ids_and_scores_beyond_int64_skip_their_record(tmp_path):
    huge = 10 ** 20
    rows = [{"qid": q, "question": f"q{q}", "response_j": "good", "response_k": "bad", "score_j": 2, "score_k": 1}
            for q in range(8)]
    rows += [{"qid": huge, "question": "big id", "response_j": "a", "response_k": "b"},
             {"qid": 9, "question": "big score", "response_j": "a", "response_k": "b", "score_j": huge, "score_k": 0},
             {"qid": 10, "question": "no qid", "response_j": "a", "response_k": "b", "score_j": None}]
    (tmp_path / "paired.jsonl").write_text("\n".join(map(json.dumps, rows)))
    r = _run(tmp_path, tmp_path / "paired.jsonl")
    assert r.stats["skipped"] == {"bad_qid": 1, "bad_score_j": 1}
    assert r.stats["pairs"] == 9 and r.stats["questions_kept"] == 9


def test_csv_columns_of_digits_are_text(tmp_path):
    (tmp_path / "digits.csv").write_text("qid,question,response_j,response_k,score_j\n"
                                         + "".join(f"{i},{i * 7},{i * 6},{i},3\n" for i in range(1, 11)))
    r = _run(tmp_path, tmp_path / "digits.csv")
    assert r.stats["pairs"] == 10 and r.stats["skipped"] == {}
    row = next(p for p in _all_pairs(r.out) if p["qid"] == 2)
    assert (row["question"], row["response_j"], row["response_k"], row["score_j"]) == ("14", "12", "2", 3)


def test_single_quotes_in_input_and_output_paths(tmp_path):
    src = tmp_path / "it's here"
    src.mkdir()
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(10)]
    (src / "prefs.jsonl").write_text("\n".join(map(json.dumps, rows)))
    r = run(ImportConfig(input=str(src), out=str(tmp_path / "o'ut"), progress=False))
    assert r.stats["pairs"] == 10 and len(_all_pairs(r.out)) == 10
