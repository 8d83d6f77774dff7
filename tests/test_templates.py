"""Exact strings for each conversation template, and template selection."""

import json

import pytest

from camelid.errors import CamelidError
from camelid.templates import TEMPLATES, VICUNA_SYSTEM, pick_template

CONV = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "How are you?"},
]


def test_vicuna_v11_matches_fastchat():
    # FastChat ADD_COLON_TWO: system + " ", "USER: m" + " ", "ASSISTANT: m" + "</s>", then "ASSISTANT:".
    expected = VICUNA_SYSTEM + " USER: Hello ASSISTANT: Hi there</s>USER: How are you? ASSISTANT:"
    assert TEMPLATES["vicuna_v1.1"].render(CONV) == expected
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")


def test_stackllama_is_question_answer():
    assert TEMPLATES["stackllama"].render(CONV[:1]) == "Question: Hello\n\nAnswer: "
    assert TEMPLATES["stackllama"].render(CONV) == "Question: Hello\n\nAnswer: Hi there\n\nQuestion: How are you?\n\nAnswer: "


def test_chatml_with_system():
    got = TEMPLATES["chatml"].render(CONV[:1], system="Be brief.")
    assert got == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_system_message_in_messages_wins_over_flag():
    msgs = [{"role": "system", "content": "S1"}] + CONV[:1]
    assert TEMPLATES["vicuna_v1.1"].render(msgs, system="S2") == "S1 USER: Hello ASSISTANT:"


def test_model_template_uses_tokenizer(bundled_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    t = pick_template(None, tok, bundled_dir)
    assert t.name == "model"
    assert t.render(CONV[:1]) == tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)
    assert t.render(CONV[:1]).endswith("<|im_start|>assistant\n")


def test_selection_by_name_and_recorded_template(tmp_path):
    assert pick_template(None, None, "/models/vicuna-7b-v1.5").name == "vicuna_v1.1"
    (tmp_path / "camelid.json").write_text(json.dumps({"conv_template": "stackllama"}))
    assert pick_template(None, None, tmp_path).name == "stackllama"
    assert pick_template("chatml", None, tmp_path).name == "chatml"
    assert pick_template(None, None, None).name == "vicuna_v1.1"


def test_bad_template_and_bad_messages():
    with pytest.raises(CamelidError, match="unknown conversation template"):
        pick_template("alpaca")
    with pytest.raises(CamelidError, match="role"):
        TEMPLATES["chatml"].render([{"role": "robot", "content": "x"}])


def test_a_gguf_chat_template_is_compiled_once():
    """The llama.cpp backend renders the GGUF's template for every request: compiled once, each
    render after that only renders, with the same text."""
    from camelid.export import ollama

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = [{"role": "user", "content": "hi"}]
    first = ollama.render(template, chat)
    misses = ollama._compiled.cache_info().misses
    assert ollama.render(template, chat) == first == "<user>hi<assistant>"
    assert ollama._compiled.cache_info().misses == misses
