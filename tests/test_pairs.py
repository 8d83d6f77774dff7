"""The length strategy for preference pairs (camelid.train.pairs): answers cut, not pairs dropped;
both answers to one budget; a long question cut at its end; the minimum a stage needs; and a real
Stack Exchange dump at the tiny preset's lengths."""

from __future__ import annotations

import pytest

from camelid.errors import CamelidError
from camelid.qa import qa_text
from camelid.train.pairs import MIN_KEPT_SHARE, PairTokens, check_enough, tokenize_pairs


@pytest.fixture(scope="module")
def tok(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


def test_long_answers_cut_to_one_budget_question_whole(tok):
    q = "How do I keep bread fresh?"
    long_j, long_k = "Wrap it in cloth and keep it dry. " * 20, "Freeze it in slices, then toast. " * 30
    pairs = tokenize_pairs([q, q], [long_j, "Short."], [long_k, "Shorter."], tok, max_length=64)
    assert len(pairs) == 2 and pairs.dropped == 0 and pairs.truncated == 1 and pairs.questions_cut == 0
    full_j, full_k = (tok(qa_text(q, a))["input_ids"] for a in (long_j, long_k))
    head = tok(qa_text(q))["input_ids"]
    p = len(pairs.prompt[0])
    assert pairs.prompt[0] == head[:p] and p >= len(head) - 1  # the whole prompt (its last space joins the answer)
    # Both answers cut to the same budget: the full texts' first max_length - 1 tokens, EOS after.
    assert len(pairs.chosen[0]) == len(pairs.rejected[0]) == 64 - p - 1
    j, k = pairs.reward_ids(eos=tok.eos_token_id)
    assert j[0] == full_j[:63] + [tok.eos_token_id] and k[0] == full_k[:63] + [tok.eos_token_id]
    # The short pair is whole and exactly the full text's tokens.
    assert j[1] == tok(qa_text(q, "Short."))["input_ids"] + [tok.eos_token_id]
    assert (pairs.chosen_whole, pairs.rejected_whole) == ([False, True], [False, True])
    # DPO: EOS ends the whole answers only.
    rows = pairs.dpo_rows(eos=tok.eos_token_id)
    assert rows["chosen_ids"][0] == pairs.chosen[0] and rows["chosen_ids"][1] == pairs.chosen[1] + [tok.eos_token_id]


def test_long_question_cut_at_its_end_template_kept(tok):
    q = "Why does my sourdough starter smell of acetone after feeding " + "and then rise and fall " * 40
    pairs = tokenize_pairs([q], ["Feed it more often."], ["Throw it away."], tok, max_length=64, max_prompt=24)
    prompt = tok.decode(pairs.prompt[0])
    assert len(pairs.prompt[0]) <= 24 and pairs.questions_cut == 1
    assert prompt.startswith("Question: Why does my sourdough") and prompt.endswith("\n\nAnswer:")
    assert tok.decode(pairs.chosen[0]).strip() == "Feed it more often." and pairs.chosen_whole == [True]
    with pytest.raises(CamelidError, match="prompt template alone"):
        tokenize_pairs([q], ["a"], ["b"], tok, max_length=8, max_prompt=4)


def test_identical_after_the_cut_is_dropped(tok):
    same = "Knead for ten minutes, then rest the dough. " * 20
    pairs = tokenize_pairs(["q?", "q?"], [same + "Yes.", "A"], [same + "No.", "B"], tok, max_length=48)
    assert (len(pairs), pairs.dropped, pairs.inputs) == (1, 1, 2)


def test_too_little_left_is_refused_with_the_flag_to_change():
    def made(kept: int, inputs: int) -> PairTokens:
        return PairTokens(prompt=[[1]] * kept, inputs=inputs, dropped=inputs - kept)

    check_enough(made(50, 60), "reward", 50, 256)
    with pytest.raises(CamelidError, match=r"only 49 reward pairs .*min_pairs=50.*--min-pairs"):
        check_enough(made(49, 49), "reward", 50, 256)
    kept = int(MIN_KEPT_SHARE * 200) - 1
    with pytest.raises(CamelidError, match=rf"only {kept} of 200 reward pairs .*max_length=256.*--max-length"):
        check_enough(made(kept, 200), "reward", 50, 256)


def test_real_dump_keeps_most_pairs_at_the_tiny_presets_length(evaldata, tok, tmp_path):
    """se-cardano through the data stage, then the reward stage's pairs at the tiny preset's
    max_length: dropping over-long pairs kept few; cutting keeps nearly all, and the stage's
    minimum is met."""
    from dataclasses import replace

    from camelid.config import build, load_preset
    from camelid.data.stackexchange import StackExchangeConfig
    from camelid.data.stackexchange import run as build_data
    from camelid.train.pairs import read_pairs
    from camelid.train.reward import RewardConfig

    data = build_data(build(StackExchangeConfig, {**load_preset("tiny")["data"], "input": str(evaldata / "se-cardano"),
                                                  "out": str(tmp_path / "data"), "progress": False, "workers": 1}))
    cfg = replace(build(RewardConfig, load_preset("tiny")["reward"]), data=str(data.out))
    pairs = read_pairs(cfg.data, cfg.train_split, tok, cfg.max_length, cfg.max_prompt_length)
    inputs = pairs.inputs
    assert inputs == data.stats["splits"]["reward"]["pairs"] > 100
    j, k = pairs.reward_ids(tok.eos_token_id)
    assert len(pairs) >= 0.95 * inputs and max(map(len, j + k)) <= cfg.max_length
    assert pairs.truncated > inputs / 4  # real answers are long: many were cut, none lost for it
    whole = sum(len(tok(qa_text(q, a))["input_ids"]) + 1 <= cfg.max_length and
                len(tok(qa_text(q, b))["input_ids"]) + 1 <= cfg.max_length for q, a, b in zip(*_texts(data.out)))
    assert whole < MIN_KEPT_SHARE * inputs  # what dropping over-long pairs would have kept
    check_enough(pairs, cfg.train_split, cfg.min_pairs, cfg.max_length)


def _texts(data_dir):
    from camelid.qa import load_split

    ds = load_split(str(data_dir), "reward", ("question", "response_j", "response_k"))
    return ds["question"], ds["response_j"], ds["response_k"]
