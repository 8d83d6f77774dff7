"""Function calling through the official `openai` client against a live server: a forced call
(named or "required") whose arguments validate against the function's schema, streamed as
OpenAI streams it; a full round trip (call -> tool message -> answer); tools rendered by a
model's own template when it has a tools section, else by the generic prompt; and how an
answer is read as a call or as content (`CallReader`, `ChatOutput` on real engine deltas)."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest
from serve_helpers import MODEL, openai_client, tiny_server

from camelid.engine.engine import Delta
from camelid.serve import protocol as P
from camelid.serve.chat_api import ChatOutput, prompt
from camelid.serve.tools import GENERIC_PROMPT, CallReader

openai = pytest.importorskip("openai")

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima", "Oslo"]},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


running = tiny_server(max_batch_size=8, max_queue=32)


@pytest.fixture(scope="module")
def client(running):
    return openai_client(running.url)


def test_named_tool_call_validates(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=3, n=3, max_tokens=100,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_tool_call_picks_a_tool_and_validates(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
                                       seed=1, n=4, max_tokens=100)
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_call_streams_as_openai_does(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=3, max_tokens=100,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    deltas = [c.choices[0] for c in stream]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    head, rest = calls[0], calls[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert len(rest) > 1 and all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    jsonschema.validate(json.loads("".join(c.function.arguments for c in rest)), WEATHER)
    assert deltas[-1].finish_reason == "tool_calls" and not any(d.delta.content for d in deltas)


def test_round_trip_call_tool_answer(client, running):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                           max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    conversation = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, temperature=0, max_tokens=12)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    # the model saw its call and the result, in the generic form (this template has no tools section)
    ids, _ = prompt(running.model, P.ChatRequest.model_validate({"model": MODEL, "messages": conversation, "tools": TOOLS}))
    text = running.model.engine.tokenizer.decode(ids)
    assert f"Result of {call.function.name} (call {call.id}):\n18 degrees and sunny" in text
    assert f'{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}' in text
    assert "To call one, answer with only a JSON object" in text and '"name": "add"' in text


def test_tool_choice_none_shows_no_tools(running):
    served = running.model
    req = {"model": MODEL, "messages": ASK, "tools": TOOLS}
    shown = served.engine.tokenizer.decode(prompt(served, P.ChatRequest.model_validate(req))[0])
    hidden = served.engine.tokenizer.decode(prompt(served, P.ChatRequest.model_validate({**req, "tool_choice": "none"}))[0])
    assert '"get_weather"' in shown and "get_weather" not in hidden


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_with_a_tools_section_renders_them(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "with-tools"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    from camelid.serve.registry import load_model

    served = load_model(str(model_dir), "t", device="cpu", dtype="float32", max_batch_size=1)
    try:
        conversation = ASK + [{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                               "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
        req = P.ChatRequest.model_validate({"model": "t", "messages": conversation, "tools": TOOLS})
        text = served.engine.tokenizer.decode(prompt(served, req)[0])
    finally:
        served.scheduler.close()
    assert text.startswith('<|im_start|>system\nTools:{"type": "function"') and '"name": "get_weather"' in text
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in text
    assert "<|im_start|>tool\n3<|im_end|>" in text and "To call one" not in text


def reader_events(text: str, step: int = 1, parallel: bool = True):
    r = CallReader({"get_weather", "add"}, parallel)
    events = [e for i in range(0, len(text), step) for e in r.feed(text[i : i + step])] + r.finish()
    return r, events


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_reader_tells_calls_from_content(step):
    r, events = reader_events('{"name": "get_weather", "arguments": {"city": "Oslo \\"}\\" x", "days": [1, {"a": 2}]}}', step)
    assert [(c.name, json.loads(c.arguments)) for c in r.calls] == [("get_weather", {"city": 'Oslo "}" x', "days": [1, {"a": 2}]})]
    assert not [e for e in events if e[0] == "content"]
    hermes = ('<tool_call>\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>')
    assert [c.name for c in reader_events(hermes, step)[0].calls] == ["add", "get_weather"]
    assert [c.name for c in reader_events(hermes, step, parallel=False)[0].calls] == ["add"]
    for text in ('Sure! {"name": "add", "arguments": {}}', '{"name": "delete_all", "arguments": {}}', '{"answer": 42}', "{"):
        r, events = reader_events(text, step)
        assert not r.calls and "".join(e[1] for e in events) == text


def test_auto_answer_that_calls_streams_tool_call_deltas(running):
    out = ChatOutput("chatcmpl-x", running.model, 5, False, tool_names={"get_weather"})
    chunks = out.start() + out.step([Delta(0, '{"name": "get_weather", "argu', [1])])
    chunks += out.step([Delta(0, 'ments": {"city": "Pa', [2])]) + out.step([Delta(0, 'ris"}}', [3], None, "stop")])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    head = deltas[1]["tool_calls"][0]
    assert head["function"] == {"name": "get_weather", "arguments": ""} and head["id"].startswith("call_")
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1]) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    text = ChatOutput("chatcmpl-y", running.model, 5, False, tool_names={"get_weather"})
    plain = text.start() + text.step([Delta(0, "It is sunny.", [1], None, "stop")])
    assert plain[1]["choices"][0]["delta"] == {"content": "It is sunny."} and plain[-1]["choices"][0]["finish_reason"] == "stop"


def test_generic_prompt_names_the_answer_form():
    assert '{"name": <function name>, "arguments": <object of arguments>}' in GENERIC_PROMPT.format(functions="")
