"""Function calling: `tools`, `tool_choice`, tool turns in the conversation, `tool_calls` out.

Rendering. A model whose own chat template has a tools section (its Jinja text mentions
`tools`) gets the tools and the tool turns through that template, as its training saw them.
Any other template gets GENERIC_PROMPT as (part of) the system message: the functions as JSON
and the instruction to answer `{"name": ..., "arguments": {...}}` to call one; an assistant
turn's earlier calls are rendered in that same form and a tool's answer as a user turn that says
which call it answers, so the conversation reads sensibly to a model that never saw tools.

Choosing. "none" renders no tools and reads the answer as text. "auto" lets the model choose:
an answer that starts as a call (`{"name": <a tool>, "arguments"` or `"parameters"`, optionally
inside <tool_call> tags as Hermes-style templates write it) is a call, anything else is content.
"required" and a named function constrain decoding with a grammar (engine.grammar) to one call
`{"name": ..., "arguments": ...}` whose arguments validate against that function's parameters.

Reading. `CallReader` reads the answer as it streams: it holds back text only while it may still
become a call, emits the call's id and name once the name is complete, then the arguments as
they come (OpenAI's delta.tool_calls), and stops at the end of the arguments' JSON value.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import regex

from camelid.serve import protocol as P
from camelid.serve.structured import ANY_OBJECT, check_schema, schema_grammar

GENERIC_PROMPT = (
    "You can call these functions:\n{functions}\n"
    "To call one, answer with only a JSON object: "
    '{{"name": <function name>, "arguments": <object of arguments>}}. Otherwise answer normally.'
)
_NAME = r'"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
CALL_START = regex.compile(r"\s*(?:<tool_call>\s*)?\{\s*" + _NAME)
"""The start of a call, up to its arguments."""
NEXT_CALL = regex.compile(r"(?:\s|\}|\]|,|</tool_call>)*(?:<tool_call>\s*)?\{\s*" + _NAME)
"""After a call's arguments: the rest of that call and the start of another."""


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# ---- the request ------------------------------------------------------------------------------
def check_tools(req: P.ChatRequest) -> None:
    """Tools and tool_choice that cannot be served: 400 naming the field."""
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise P.APIError(400, "tools: function names must be unique", param="tools")
    for i, t in enumerate(req.tools or []):
        if not regex.fullmatch(r"[A-Za-z0-9_.-]{1,64}", t.function.name):
            raise P.APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -", param=f"tools.{i}.function.name")
        if t.function.parameters is not None:
            check_schema(t.function.parameters, f"tools.{i}.function.parameters")
    choice = req.tool_choice
    if choice is not None and choice != "none" and not req.tools:
        raise P.APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, P.NamedToolChoice) and choice.function.name not in names:
        raise P.APIError(400, f"tool_choice names {choice.function.name[:64]!r}, which is not in tools", param="tool_choice")
    if active_tools(req) and req.response_format is not None and req.response_format.type != "text":
        raise P.APIError(400, "response_format json goes with tool_choice none (a call has its own JSON form)",
                         param="response_format")


def active_tools(req: P.ChatRequest) -> list[P.Tool]:
    """The tools the model is shown and may call (none with tool_choice "none")."""
    return [] if req.tool_choice == "none" else list(req.tools or [])


def forced(req: P.ChatRequest) -> list[P.Tool] | None:
    """The tools one of which must be called ("required" or a named function), else None."""
    if not active_tools(req):
        return None
    if req.tool_choice == "required":
        return list(req.tools)
    if isinstance(req.tool_choice, P.NamedToolChoice):
        return [t for t in req.tools if t.function.name == req.tool_choice.function.name]
    return None


def call_grammar(engine: Any, tools: list[P.Tool]) -> str:
    """A grammar for one call `{"name": ..., "arguments": ...}` to one of `tools`, its arguments
    valid against that function's parameters."""
    shapes = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                "arguments": t.function.parameters or ANY_OBJECT},
               "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return schema_grammar(engine, shapes[0] if len(shapes) == 1 else {"anyOf": shapes}, "tools")


def tool_dicts(tools: list[P.Tool]) -> list[dict]:
    """The tools as OpenAI writes them (what chat templates with a tools section expect)."""
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True, by_alias=True)} for t in tools]


# ---- the conversation -------------------------------------------------------------------------
def _arguments(text: str) -> Any:
    """A call's arguments as the template gets them: the parsed JSON where it parses."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def generic_messages(req: P.ChatRequest) -> list[dict[str, str]]:
    """The conversation for a template without tools: GENERIC_PROMPT in the system message,
    calls and tool answers as text."""
    names = {c.id: c.function.name for m in req.messages for c in m.tool_calls or []}
    out: list[dict[str, str]] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        if m.tool_calls:
            calls = "\n".join(json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)})
                              for c in m.tool_calls)
            out.append({"role": "assistant", "content": (m.text() + "\n" if m.text() else "") + calls})
        elif role == "tool":
            name = names.get(m.tool_call_id or "", "a function")
            out.append({"role": "user", "content": f"Result of {name} (call {m.tool_call_id}):\n{m.text()}"})
        else:
            out.append({"role": role, "content": m.text()})
    tools = active_tools(req)
    if tools:
        functions = "\n".join(json.dumps(t["function"]) for t in tool_dicts(tools))
        prompt = GENERIC_PROMPT.format(functions=functions)
        systems = [i for i, m in enumerate(out) if m["role"] == "system"]
        if systems:
            out[systems[-1]] = {"role": "system", "content": out[systems[-1]]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_messages(req: P.ChatRequest) -> list[dict]:
    """The conversation in the shape chat templates with a tools section read (Hugging Face's)."""
    names = {c.id: c.function.name for m in req.messages for c in m.tool_calls or []}
    out: list[dict] = []
    for m in req.messages:
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
        if m.role == "tool":
            msg.update(tool_call_id=m.tool_call_id, name=names.get(m.tool_call_id or "", ""))
        out.append(msg)
    return out


def has_tools_section(tokenizer: Any) -> bool:
    """Whether the model's own chat template renders tools (a Hugging Face tokenizer whose Jinja
    template mentions them)."""
    import transformers

    template = getattr(tokenizer, "chat_template", None)
    return isinstance(tokenizer, transformers.PreTrainedTokenizerBase) and isinstance(template, str) and "tools" in template


@dataclass
class ToolTemplate:
    """The model's own template with the tools passed in (`prompting.chat_ids` renders it)."""

    tokenizer: Any
    tools: list[dict]
    stop: tuple[str, ...] = ()

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools or None, tokenize=False, add_generation_prompt=True)


# ---- the answer -------------------------------------------------------------------------------
def _unescape(text: str) -> str | None:
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return None


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallReader:
    """Reads one choice's answer as it arrives; `feed` and `finish` return events:
    ("content", text), ("call", index) when calls[index] got its id and name, ("args", index,
    text). See the module's docstring."""

    names: set[str]
    parallel: bool = True
    calls: list[Call] = field(default_factory=list)
    mode: str = "undecided"  # undecided -> content | call -> after -> call ... | done
    held: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _started: bool = False

    def feed(self, text: str) -> list[tuple]:
        if self.mode == "content":
            return [("content", text)] if text else []
        if self.mode == "call":
            return self._arguments(text)
        if self.mode == "done":
            return []
        self.held += text
        m = (CALL_START if self.mode == "undecided" else NEXT_CALL).match(self.held, partial=True)
        if m is not None and m.partial:
            return []  # may still become a call
        name = _unescape(m["name"]) if m is not None else None
        if name not in self.names or (self.calls and not self.parallel):
            if self.mode == "undecided":
                self.mode, text, self.held = "content", self.held, ""
                return [("content", text)]
            self.mode, self.held = "done", ""  # what follows a call and is no call
            return []
        self.calls.append(Call(call_id(), name))
        self.mode, rest, self.held = "call", self.held[m.end():], ""
        self._depth, self._in_string, self._escaped, self._started = 0, False, False, False
        return [("call", len(self.calls) - 1)] + self._arguments(rest)

    def _arguments(self, text: str) -> list[tuple]:
        """Pass text through to the current call's arguments until its JSON value ends."""
        end = None
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string, self._started = True, True
            elif ch in "{[":
                self._depth, self._started = self._depth + 1, True
            elif ch in "}]":
                self._depth -= 1
            if self._started and self._depth <= 0 and not self._in_string:
                end = i + 1
                break
        taken = text if end is None else text[:end]
        call = self.calls[-1]
        if not call.arguments:
            taken = taken.lstrip()
        call.arguments += taken
        events = [("args", len(self.calls) - 1, taken)] if taken else []
        if end is not None:
            self.mode, rest = "after", text[end:]
            events += self.feed(rest) if rest else []
        return events

    def finish(self) -> list[tuple]:
        """The end of the answer: held text that never became a call is content."""
        held, self.held = self.held, ""
        if self.mode == "undecided" and held:
            self.mode = "content"
            return [("content", held)]
        return []
