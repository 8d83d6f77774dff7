"""Structured output (`response_format`) through the official `openai` client against a live
server: every answer that ends by itself parses and validates against the schema (jsonschema),
streamed or whole, with sampling at temperature 1 on a random model (the grammar alone makes
it JSON); max_tokens too small ends with "length"; rows without a grammar in the same batch are
unaffected; a SentencePiece (byte-fallback) LLaMA tokenizer works as the byte-level one does."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import jsonschema
import pytest
from serve_helpers import CHAT, MODEL, live_server, openai_client, tiny_server

from camelid.engine import Engine, SamplingParams
from camelid.engine import grammar as G

openai = pytest.importorskip("openai")

# Bounded, so that a random model's answer ends well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["llama", "alpaca", "camel"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]},
    },
    "required": ["name", "age", "kind", "tags", "pet"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


running = tiny_server(max_batch_size=16, max_queue=64)


@pytest.fixture(scope="module")
def client(running):
    return openai_client(running.url)


def test_json_schema_answers_validate(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, seed=5, n=6, max_tokens=200,
                                       response_format=FORMAT)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_json_schema_validates(client):
    for seed in (1, 2):
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, seed=seed, max_tokens=200,
                                                response_format=FORMAT, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=300,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    if choice.finish_reason == "stop":  # greedy on a random model may write one long string
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_too_few_tokens_ends_with_length(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, seed=3, max_tokens=3,
                                       response_format=FORMAT)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith('{"')
    assert r.usage.completion_tokens == 3


def test_free_rows_beside_constrained_rows_are_unaffected(client):
    alone = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24).choices[0].message.content

    def free(_):
        return client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24).choices[0].message.content

    def constrained(seed):
        return client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, seed=seed, max_tokens=200,
                                              response_format=FORMAT).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(free, i) for i in range(4)]
        shaped = [pool.submit(constrained, i) for i in range(4)]
        assert [f.result() for f in frees] == [alone] * 4
        for f in shaped:
            jsonschema.validate(json.loads(f.result()), PERSON)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_what_cannot_be_honoured_is_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=body)
    assert e.value.body["param"] == param


def test_fields_that_do_not_change_the_output_are_ignored(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=4, user="u1", store=False,
                                       metadata={"k": "v"}, service_tier="auto", modalities=["text"],
                                       extra_body={"no_such_field": 1})
    assert r.choices[0].message.content


def spm_tokenizer(tmp_path, text: str):
    """A LLaMA-style SentencePiece BPE tokenizer with byte fallback, trained here on `text`."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    return AutoTokenizer.from_pretrained(str(tmp_path))


def test_sentencepiece_tokenizer_is_constrained_too(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    text = Path(__file__).read_text()  # English and JSON: a usable vocabulary
    tok = spm_tokenizer(tmp_path, text * 5 + json.dumps(PERSON) * 20)
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(list(range(len(tok)))))  # byte fallback
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    engine = Engine.load(str(model_dir), device="cpu", dtype="float32")
    g = G.json_schema_grammar(PERSON)
    outs = engine.generate(["Zoë's llama:"] * 4, [SamplingParams(temperature=1.0, seed=s, max_new_tokens=300, grammar=g) for s in range(4)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)


@pytest.mark.slow
def test_bundled_model_fills_a_schema(bundled_dir):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                "country": {"type": "string", "maxLength": 40}, "is_capital": {"type": "boolean"}},
              "required": ["city", "country", "is_capital"], "additionalProperties": False}
    with live_server(bundled_dir, name="smollm2-135m", max_batch_size=4) as (base, _):
        client = openai_client(base, timeout=300)
        r = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
            temperature=0, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}})
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert r.choices[0].finish_reason == "stop"
