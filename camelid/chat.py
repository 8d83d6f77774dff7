"""`camelid chat` (multi-turn, streaming) and `camelid generate` (one answer, then exit).

In-chat commands: !!exit, !!reset, !!remove (drop the last exchange), !!regen (answer the last
question again), !!save FILE, !!load FILE. Ctrl-C stops the answer being written, not the
program; Ctrl-D (or !!exit) quits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from camelid.cli_common import add_model_args, add_sampling_args, check_sampling_args, load_engine, sampling_from_args
from camelid.errors import CamelidError, UsageError

STYLES = ("rich", "simple", "programmatic")
ROLES = ("system", "user", "assistant")


def register(sub: argparse._SubParsersAction, name: str) -> None:
    if name == "generate":
        p = sub.add_parser(name, help="answer one prompt and exit")
        p.add_argument("prompt", help="the question or instruction ('-' reads it from stdin)")
        p.add_argument("--raw", action="store_true", help="send the prompt as-is, without the conversation template")
        add_model_args(p)
        add_sampling_args(p, temperature=0.0, max_new_tokens=256)
        p.set_defaults(func=run_generate)
        return
    p = sub.add_parser(name, help="chat with a model in the terminal")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--style", default=None, choices=STYLES,
                   help="rich (default on a terminal), simple, or programmatic (plain lines on stdin, for scripts)")
    p.add_argument("--multiline", action="store_true",
                   help="multi-line input: Esc+Enter sends (rich); a line with only __END__ sends (simple/programmatic)")
    p.add_argument("--debug", action="store_true", help="print the prompt and tokens/s after each answer")
    p.set_defaults(func=run_chat)


def _stream_text(engine, prompt: str, params):
    """Yield text deltas of one answer; returns (tokens, seconds) through StopIteration.value."""
    start, n = time.perf_counter(), 0
    gen = engine.stream([prompt], params)
    try:
        for deltas in gen:
            for d in deltas:
                n += len(d.token_ids)
                if d.text:
                    yield d.text
    finally:
        gen.close()
    return n, time.perf_counter() - start


def run_generate(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty; pass the question as an argument")
    engine, template = load_engine(args)
    prompt = text if args.raw else template.render([{"role": "user", "content": text}], args.system)
    params = sampling_from_args(args, extra_stop=template.stop)
    for piece in _stream_text(engine, prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---- terminal front ends --------------------------------------------------------------------
class SimpleIO:
    """input()/print() with readline line editing and history where the platform has it."""

    def __init__(self, multiline: bool):
        self.multiline = multiline
        try:
            import readline  # noqa: F401  (enables line editing and history for input())
        except ImportError:
            pass

    def read(self, role: str) -> str | None:
        try:
            first = input(f"{role}: ")
            if not self.multiline:
                return first
            lines = [first]
            while lines[-1].strip() != "__END__":
                lines.append(input())
            return "\n".join(lines[:-1])
        except EOFError:
            return None

    def write_stream(self, role: str, pieces) -> str:
        print(f"{role}: ", end="", flush=True)
        out = []
        for piece in pieces:
            out.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        return "".join(out)

    def info(self, text: str) -> None:
        print(text, flush=True)


class ProgrammaticIO(SimpleIO):
    """Plain lines on stdin, answers on stdout as `ASSISTANT: <text>` then a newline."""

    def read(self, role: str) -> str | None:
        line = sys.stdin.readline()
        if not line:
            return None
        if not self.multiline:
            return line.rstrip("\n")
        lines = [line.rstrip("\n")]
        while lines[-1].strip() != "__END__":
            nxt = sys.stdin.readline()
            if not nxt:
                break
            lines.append(nxt.rstrip("\n"))
        return "\n".join(line for line in lines if line.strip() != "__END__")


class RichIO:
    """prompt_toolkit input (history, editing, Esc+Enter for multi-line) and rich Markdown output."""

    def __init__(self, multiline: bool):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from rich.console import Console

        from camelid.utils import camelid_home

        camelid_home().mkdir(parents=True, exist_ok=True)
        self.session = PromptSession(history=FileHistory(str(camelid_home() / "chat_history")))
        self.console = Console()
        self.multiline = multiline

    def read(self, role: str) -> str | None:
        try:
            return self.session.prompt(f"{role}: ", multiline=self.multiline)
        except EOFError:
            return None
        except KeyboardInterrupt:
            return ""

    def write_stream(self, role: str, pieces) -> str:
        from rich.live import Live
        from rich.markdown import Markdown

        self.console.print(f"[bold]{role}:[/bold]")
        text = ""
        with Live(console=self.console, refresh_per_second=8, vertical_overflow="visible") as live:
            for piece in pieces:
                text += piece
                live.update(Markdown(text))
        return text

    def info(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


def make_io(style: str | None, multiline: bool):
    style = style or ("rich" if sys.stdin.isatty() and sys.stdout.isatty() else "simple")
    return {"rich": RichIO, "simple": SimpleIO, "programmatic": ProgrammaticIO}[style](multiline)


# ---- the chat loop ----------------------------------------------------------------------------
class Chat:
    """Conversation state and the in-chat commands; the terminal front end is `io`."""

    def __init__(self, engine, template, params, io, system: str | None = None, debug: bool = False):
        self.engine, self.template, self.params, self.io = engine, template, params, io
        self.system, self.debug = system, debug
        self.messages: list[dict] = []

    def run(self) -> None:
        while True:
            text = self.io.read("USER")
            if text is None or text.strip() == "!!exit":
                return
            if not text.strip():
                continue
            if text.startswith("!!"):
                self.command(text.strip())
                continue
            self.messages.append({"role": "user", "content": text})
            self.answer()

    def command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd == "!!reset":
            self.messages = []
            self.io.info("(conversation reset)")
        elif cmd == "!!remove":
            while self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if self.messages:
                self.messages.pop()
            self.io.info("(last exchange removed)")
        elif cmd == "!!regen":
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if not self.messages:
                self.io.info("(nothing to regenerate)")
                return
            self.answer()
        elif cmd == "!!save" and arg:
            self.save(os.path.expanduser(arg))
        elif cmd == "!!load" and arg:
            self.load(os.path.expanduser(arg))
        else:
            self.io.info("commands: !!exit  !!reset  !!remove  !!regen  !!save FILE  !!load FILE")

    def save(self, path: str) -> None:
        """Write the conversation as JSON; a path that cannot be written is a one-line note, and the chat goes on."""
        from camelid.utils import atomic_write_text

        text = json.dumps({"template": self.template.name, "system": self.system, "messages": self.messages}, indent=2)
        try:
            atomic_write_text(path, text + "\n")
        except OSError as e:
            self.io.info(f"(cannot save to {path}: {e.strerror or e}; the conversation is kept, try another path)")
            return
        self.io.info(f"(saved to {path})")

    def load(self, path: str) -> None:
        """Replace the conversation with one written by !!save, after checking all of it, so a
        bad file is a one-line note and never breaks the next answer."""
        from jinja2 import TemplateError  # what a model's own chat template raises for input it rejects

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            messages, system = _checked_conversation(data, self.system)
            self.template.render(messages, system)  # the template's own checks (roles, contents)
        except OSError as e:
            self.io.info(f"(cannot load {path}: {e.strerror or e})")
            return
        except (ValueError, CamelidError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.io.info(f"(cannot load {path}: {reason}; expected a file written by !!save)")
            return
        except TemplateError as e:
            self.io.info(f"(cannot load {path}: the {self.template.name} template rejects it: "
                         f"{(str(e).splitlines() or [type(e).__name__])[0]})")
            return
        self.messages, self.system = messages, system
        self.io.info(f"(loaded {len(messages)} messages from {path})")

    def answer(self) -> None:
        prompt = self.template.render(self.messages, self.system)
        if self.debug:
            self.io.info(f"[prompt]\n{prompt}\n[/prompt]")
        stream = _stream_text(self.engine, prompt, self.params)
        counter = _Counted(stream)
        try:
            reply = self.io.write_stream("ASSISTANT", counter)
        except KeyboardInterrupt:
            reply = "".join(counter.pieces)
            self.io.info("\n(stopped)")
        finally:
            stream.close()
        self.messages.append({"role": "assistant", "content": reply.strip()})
        if self.debug and counter.result:
            n, secs = counter.result
            self.io.info(f"[{n} tokens in {secs:.2f} s, {n / max(secs, 1e-9):.1f} tokens/s]")


def _checked_conversation(data: object, system: str | None) -> tuple[list[dict], str | None]:
    """(messages, system prompt) of a saved conversation, or ValueError saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("no list of messages")
    messages = data["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + 1} needs a role ({', '.join(ROLES)}) and a string content")
    system = data.get("system", system)
    if system is not None and not isinstance(system, str):
        raise ValueError(f"the system prompt must be a string, not {type(system).__name__}")
    return messages, system


class _Counted:
    """Iterates a generator, remembering its pieces and its return value."""

    def __init__(self, gen):
        self.gen, self.pieces, self.result = gen, [], None

    def __iter__(self):
        while True:
            try:
                piece = next(self.gen)
            except StopIteration as stop:
                self.result = stop.value
                return
            self.pieces.append(piece)
            yield piece


def run_chat(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    io = make_io(args.style, args.multiline)
    engine, template = load_engine(args)
    params = sampling_from_args(args, extra_stop=template.stop)
    if args.style != "programmatic":
        io.info(f"camelid chat: {getattr(engine, 'name', args.model)} ({template.name} template). "
                "!!exit quits, !!reset starts over, Ctrl-C stops an answer.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Chat(engine, template, params, io, args.system, args.debug).run()
    return 0
