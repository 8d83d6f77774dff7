"""Conversation templates: how a list of messages becomes one prompt string.

`model` (the default) uses the model's own chat template (tokenizer.chat_template). The named
templates follow their sources exactly; tests pin them byte for byte.
- vicuna_v1.1: FastChat's `conversation.py` (sep_style ADD_COLON_TWO, seps " " and "</s>").
- stackllama: `Question: <q>\n\nAnswer: <a>` (camelid.qa), the format of StackLLaMA's SFT, reward and PPO data.
- chatml: OpenAI's ChatML as used by SmolLM2 and Qwen.

Selection (`pick_template`): an explicit name; else the `conv_template` a camelid training run
recorded in the model folder's camelid.json; else a template named by the model's name (a
"vicuna" model gets vicuna_v1.1); else the model's own template; else vicuna_v1.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from camelid.errors import CamelidError, UsageError
from camelid.qa import NEXT_QUESTION, TURN_SEP, qa_text

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    name: str
    render_fn: Callable[[list[Message], str | None], str]
    default_system: str | None = None
    stop: tuple[str, ...] = ()
    """Stop strings beside the tokenizer's EOS (so a model that writes the next turn stops)."""

    def render(self, messages: list[Message], system: str | None = None) -> str:
        """The prompt for `messages`, ending where the assistant's next answer starts."""
        _check(messages)
        sys_msgs = [m["content"] for m in messages if m["role"] == "system"]
        system = sys_msgs[-1] if sys_msgs else (system if system is not None else self.default_system)
        return self.render_fn([m for m in messages if m["role"] != "system"], system)


def _check(messages: list[Message]) -> None:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise CamelidError("each message needs a role (system, user or assistant) and a string content")


def _vicuna(messages: list[Message], system: str | None) -> str:
    # FastChat ADD_COLON_TWO: system + sep, then "ROLE: msg" + seps[i % 2]; the open turn is "ASSISTANT:".
    seps = (" ", "</s>")
    out = (system or "") + seps[0]
    for i, m in enumerate(messages):
        role = "USER" if m["role"] == "user" else "ASSISTANT"
        out += f"{role}: {m['content']}{seps[i % 2]}"
    return out + "ASSISTANT:"


def _stackllama(messages: list[Message], system: str | None) -> str:
    out = system + TURN_SEP if system else ""
    for m in messages:
        if m["role"] == "user":
            out += qa_text(m["content"])
        else:
            out += m["content"] + TURN_SEP
    return out


def _chatml(messages: list[Message], system: str | None) -> str:
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


TEMPLATES: dict[str, Template] = {
    "vicuna_v1.1": Template("vicuna_v1.1", _vicuna, VICUNA_SYSTEM, stop=("</s>", "USER:")),
    "stackllama": Template("stackllama", _stackllama, None, stop=(NEXT_QUESTION,)),
    "chatml": Template("chatml", _chatml, None, stop=("<|im_end|>",)),
}
NAMES = ("model", *TEMPLATES)


def model_template(tokenizer) -> Template:
    """The tokenizer's own Jinja chat template as a Template."""

    def render(messages: list[Message], system: str | None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return Template("model", render, None, stop=())


def pick_template(name: str | None, tokenizer=None, model_path: str | Path | None = None) -> Template:
    if name and name != "model":
        if name not in TEMPLATES:
            raise UsageError(f"unknown conversation template {name!r}; choose one of {', '.join(NAMES)}")
        return TEMPLATES[name]
    if name is None and model_path is not None:
        meta = Path(model_path) / "camelid.json"
        if meta.is_file():
            recorded = json.loads(meta.read_text()).get("conv_template")
            if recorded in TEMPLATES:
                return TEMPLATES[recorded]
        lowered = str(model_path).lower()
        for key, tname in (("vicuna", "vicuna_v1.1"), ("stackllama", "stackllama")):
            if key in lowered:
                return TEMPLATES[tname]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return model_template(tokenizer)
    if name == "model":
        raise CamelidError("this model has no chat template of its own; pass --conv-template vicuna_v1.1, stackllama or chatml")
    return TEMPLATES["vicuna_v1.1"]
