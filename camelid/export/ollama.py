"""A ready `Modelfile` for `ollama create`, with the chat template translated to Ollama's Go syntax.

Jinja chat templates cannot be translated in general, so the template is recognised by what it
renders: it is rendered on sentinel messages and compared with the known formats (ChatML,
Llama 3). A default system prompt that the template injects when none is given becomes the
Modelfile's SYSTEM line. An unrecognised template gets no TEMPLATE line (Ollama then falls back
to the template stored in the GGUF, which it matches against its own list) and a comment says so.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

S, U, A, U2 = "SYS-7f3a", "USR-1b9c", "AST-5d2e", "USR-8e4f"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    turn: str  # one message, with {role} and {content}
    prompt: str  # what opens the assistant's answer
    ollama: str  # Ollama TEMPLATE
    stops: tuple[str, ...]


FORMATS = (
    ChatFormat(
        "chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>", "<|im_start|>"),
    ),
    ChatFormat(
        "llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """A chat template compiled once (compiling takes ~4 ms, rendering a short chat ~0.1 ms)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(template)


def render(template: str, messages: list[dict[str, str]], bos: str = "", eos: str = "", add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2)."""
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)


def detect_format(template: str, bos: str = "") -> tuple[ChatFormat | None, str | None]:
    """(the format the template renders, the default system prompt it injects) or (None, None)."""
    convo = [{"role": "system", "content": S}, {"role": "user", "content": U},
             {"role": "assistant", "content": A}, {"role": "user", "content": U2}]
    try:
        full = render(template, convo, bos=bos).removeprefix(bos)
        alone = render(template, [{"role": "user", "content": U}], bos=bos).removeprefix(bos)
    except Exception:  # a template that needs variables we do not pass is simply not recognised
        return None, None
    for fmt in FORMATS:
        want = "".join(fmt.turn.format(role=m["role"], content=m["content"]) for m in convo) + fmt.prompt
        if full != want:
            continue
        user_turn = fmt.turn.format(role="user", content=U) + fmt.prompt
        pattern = re.escape(fmt.turn.format(role="system", content="\x00")).replace("\\\x00", "(.*)").replace("\x00", "(.*)")
        m = re.fullmatch(pattern + re.escape(user_turn), alone, flags=re.S)
        return fmt, (m.group(1) if m else None)
    return None, None


def modelfile_text(gguf_name: str, template: str | None, bos: str = "", eos: str | None = None) -> str:
    fmt, system = detect_format(template, bos) if template else (None, None)
    lines = [f"# Ollama Modelfile written by `camelid export gguf`.  ollama create <name> -f {gguf_name.rsplit('.', 1)[0]}.Modelfile",
             f"FROM ./{gguf_name}"]
    if fmt is None:
        lines.append("# The chat template is not one camelid can translate; Ollama uses the GGUF's own if it knows it.")
    else:
        lines.append(f'TEMPLATE """{fmt.ollama}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    stops = list(fmt.stops) if fmt else ([eos] if eos else [])
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
