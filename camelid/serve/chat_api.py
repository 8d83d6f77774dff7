"""`POST /v1/chat/completions`: the conversation (with tools, see serve/tools.py) rendered by the
model's template, an optional grammar (response_format, or a forced tool call), and the answer
as OpenAI's chat.completion or its chunks: content, or tool_calls with finish_reason
"tool_calls"."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from camelid.errors import CamelidError
from camelid.serve import protocol as P
from camelid.serve import structured, tools
from camelid.serve.openai_api import (Choice, Output, _finish, alternative_strings, check_room, off_loop, parse_body, registry,
                                      respond, sampling_params, submit, token_strings, wants_usage)
from camelid.serve.prompting import chat_ids
from camelid.serve.registry import ServedModel

router = APIRouter()


def check_messages(req: P.ChatRequest) -> None:
    """Tool turns as OpenAI defines them: a tool message answers a call by its id, only an
    assistant message carries calls (400 naming the message)."""
    for i, m in enumerate(req.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise P.APIError(400, f"messages[{i}] (tool) needs the tool_call_id it answers", param=f"messages.{i}.tool_call_id")
        if m.role != "tool" and m.tool_call_id is not None:
            raise P.APIError(400, f"messages[{i}]: only a tool message has a tool_call_id", param=f"messages.{i}.tool_call_id")
        if m.role != "assistant" and m.tool_calls:
            raise P.APIError(400, f"messages[{i}]: only an assistant message has tool_calls", param=f"messages.{i}.tool_calls")


def prompt(served: ServedModel, req: P.ChatRequest) -> tuple[list[int], tuple[str, ...]]:
    """Token ids of the conversation, and the template's stop strings."""
    shown = tools.active_tools(req)
    uses_tools = shown or any(m.tool_calls or m.role == "tool" for m in req.messages)
    if uses_tools and served.template.name == "model" and tools.has_tools_section(served.engine.tokenizer):
        template = tools.ToolTemplate(served.engine.tokenizer, tools.tool_dicts(shown), tuple(served.template.stop))
        return chat_ids(served.engine, template, tools.template_messages(req)), template.stop
    return served.chat_prompt(tools.generic_messages(req))


async def grammar_for(served: ServedModel, req: P.ChatRequest) -> str | None:
    """The grammar the answer must follow: a forced call's, response_format's, or None."""
    must_call = tools.forced(req)
    schema = structured.response_schema(req)
    if must_call is None and schema is None:
        return None
    structured.check_constrained(req)
    if must_call is not None:
        return await run_in_threadpool(tools.call_grammar, served.engine, must_call)
    return await run_in_threadpool(structured.schema_grammar, served.engine, schema, "response_format")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = await parse_body(request, P.ChatRequest)
    P.check_request(req)
    check_messages(req)
    tools.check_tools(req)
    served = registry(request).get(req.model)
    check_room(served, req.n or 1)
    try:
        # tokenising a long prompt takes a while: keep it off the event loop that streams others
        ids, template_stop = await off_loop(request, prompt, served, req)
    except (CamelidError, ValueError, TemplateError) as e:  # the template rejects the conversation
        raise P.APIError(400, str(e), param="messages") from None
    grammar = await grammar_for(served, req)
    # A constrained answer ends where its grammar does; a template stop string could cut it short.
    params = sampling_params(req, served, len(ids), None, () if grammar else template_stop, grammar)
    job = submit(served, [ids] * len(params), params)
    names = {t.function.name for t in tools.active_tools(req)}
    out = ChatOutput(P.new_id("chatcmpl"), served, len(ids), P.logprob_options(req)[0], job.n, wants_usage(req),
                     names, req.parallel_tool_calls is not False)
    return await respond(request, req.stream, job, served, out)


@dataclass
class ChatOutput(Output):
    rid: str
    served: ServedModel
    prompt_tokens: int
    logprobs: bool
    n: int = 1
    include_usage: bool = False
    tool_names: set[str] = field(default_factory=set)
    """The functions the model may call; empty: the answer is content."""
    parallel: bool = True
    created: int = field(default_factory=P.now)

    def __post_init__(self) -> None:
        self.readers = [tools.CallReader(self.tool_names, self.parallel) for _ in range(self.n)]

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return P.chat_chunk(self.rid, self.served.name, self.created, [choice], None, self.include_usage)

    def _lp(self, ids: list[int], lps: list[float] | None, top: list | None) -> dict | None:
        if not self.logprobs:
            return None
        return P.chat_logprobs(token_strings(self.served, ids), lps or [], alternative_strings(self.served, top))

    def _finish(self, index: int, reason: str | None) -> str:
        return "tool_calls" if self.readers[index].calls and reason == "stop" else _finish(reason)

    def _deltas(self, index: int, text: str, last: bool) -> list[dict]:
        """The text of one step as content and tool-call deltas (OpenAI's shapes)."""
        if not self.tool_names:
            return [{"content": text}]
        reader = self.readers[index]
        events = reader.feed(text) + (reader.finish() if last else [])
        out = []
        for e in events:
            if e[0] == "content":
                out.append({"content": e[1]})
            elif e[0] == "call":
                call = reader.calls[e[1]]
                out.append({"tool_calls": [{"index": e[1], "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            else:
                out.append({"tool_calls": [{"index": e[1], "function": {"arguments": e[2]}}]})
        return out

    # Chunks as OpenAI sends them: the role first, content or tool-call deltas, a finish chunk
    # per choice, then (stream_options.include_usage) one chunk with no choices and the usage.
    def start(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)]

    def step(self, deltas: list) -> list[dict]:
        chunks = []
        for d in deltas:
            self.produced += len(d.token_ids)
            lp = self._lp(d.token_ids, d.logprobs, d.top_logprobs) if d.token_ids else None
            parts = self._deltas(d.index, d.text, d.finish_reason is not None) if d.text or d.finish_reason else []
            parts = [p for p in parts if p != {"content": ""}]
            if lp is not None and not parts:
                parts = [{"content": ""}]  # the step's log-probabilities travel with an empty delta
            for j, part in enumerate(parts):
                chunks.append(self._chunk(d.index, part, lp if j == 0 else None))
            if d.finish_reason:
                chunks.append(self._chunk(d.index, {}, None, self._finish(d.index, d.finish_reason)))
        return chunks

    def end(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [P.chat_chunk(self.rid, self.served.name, self.created, [], P.usage(self.prompt_tokens, self.produced), True)]

    def _message(self, index: int, text: str) -> dict:
        if not self.tool_names:
            return {"role": "assistant", "content": text}
        reader = self.readers[index]
        content = "".join(e[1] for e in reader.feed(text) + reader.finish() if e[0] == "content")
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in reader.calls]
        return {"role": "assistant", "content": content or None, **({"tool_calls": calls} if calls else {})}

    def whole(self, choices: list[Choice]) -> dict:
        return {
            "id": self.rid, "object": "chat.completion", "created": self.created, "model": self.served.name,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": self._message(i, "".join(c.text)),
                         "logprobs": self._lp(c.token_ids, c.logprobs, c.top), "finish_reason": self._finish(i, c.finish_reason)}
                        for i, c in enumerate(choices)],
            "usage": P.usage(self.prompt_tokens, sum(len(c.token_ids) for c in choices)),
        }
