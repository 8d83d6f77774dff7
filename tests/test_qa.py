"""camelid.qa: the question-answer text of every stage and the one reader of dataset splits."""

from __future__ import annotations

import pytest
from train_data import write_dataset

from camelid.errors import CamelidError
from camelid.qa import NEXT_QUESTION, load_split, qa_text
from camelid.templates import TEMPLATES


def test_qa_text_is_stackllamas_format():
    assert qa_text("Why?", "Because.") == "Question: Why?\n\nAnswer: Because."
    assert qa_text("Why?") == "Question: Why?\n\nAnswer: "


def test_stackllama_template_renders_qa_text_and_stops_at_the_next_question():
    conv = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}]
    text = TEMPLATES["stackllama"].render(conv)
    assert text == qa_text("a?", "b") + "\n\n" + qa_text("c?")
    assert TEMPLATES["stackllama"].stop == (NEXT_QUESTION,)
    assert text[len(qa_text("a?", "b")):].startswith(NEXT_QUESTION)


def test_load_split_checks_only_the_columns_asked_for(tmp_path):
    data = write_dataset(tmp_path / "d", n_pairs=12, drop_columns=("score_k",))
    ds = load_split(data, "reward", ("question", "response_j"))
    assert ds.num_rows == 12
    with pytest.raises(CamelidError, match="lacks column.*score_k"):
        load_split(data, "reward")  # no columns named: the split's whole schema


def test_load_split_limit_is_a_seeded_sample(tmp_path):
    data = write_dataset(tmp_path / "d", n_pairs=30)
    a, b = (load_split(data, "rl", ("qid",), limit=7, seed=3)["qid"] for _ in range(2))
    assert a == b and len(a) == len(set(a)) == 7
    assert load_split(data, "rl", ("qid",), limit=7, seed=4)["qid"] != a
    assert load_split(data, "rl", ("qid",), limit=100).num_rows == 30


def test_load_split_refuses_missing_folders_and_empty_splits(tmp_path):
    with pytest.raises(CamelidError, match="does not exist"):
        load_split(tmp_path / "nowhere", "rl")
    with pytest.raises(CamelidError, match="is empty"):
        load_split(write_dataset(tmp_path / "empty", n_pairs=0), "evaluation", ("question",))
