"""`camelid chat` / `generate` as a user runs them (subprocess), and their bad-input errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

CAMELID = [sys.executable, "-m", "camelid"]


def run(args, stdin="", timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(CAMELID + args, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_programmatic_chat_reset_save_load_exit(tiny_model_dir, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([
        "Hello there", "!!save " + str(saved), "!!reset", "Second question", "!!load " + str(saved),
        "!!remove", "Third", "!!regen", "!!exit", "never read",
    ]) + "\n"
    r = run(["chat", "--backend", "torch", "--model", str(tiny_model_dir), "--style", "programmatic", "--temperature", "0",
             "--max-new-tokens", "5", "--dtype", "float32"], stdin=script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    answers = [line for line in lines if line.startswith("ASSISTANT: ")]
    assert len(answers) == 4  # Hello, Second, Third, regen of Third
    assert answers[2] == answers[3]  # greedy regen gives the same answer
    assert "(conversation reset)" in lines and "(loaded 2 messages from %s)" % saved in lines
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][0]["content"] == "Hello there"


def test_bad_save_and_load_are_one_line_notes_and_the_chat_goes_on(tiny_model_dir, tmp_path):
    from camelid.utils import camelid_home

    home = tmp_path / "home"
    home.mkdir()
    (home / "a-file").write_text("not a folder")
    (home / "bad-system.json").write_text(json.dumps({"system": 5, "messages": []}))
    (home / "bad-messages.json").write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}))
    script = "\n".join([
        "Hello there", f"!!save {home}/a-file/conv.json", "Second", "!!save ~/conv.json", "!!load ~/bad-system.json",
        "Third", "!!load ~/bad-messages.json", "!!load ~/missing.json", "Fourth", "!!exit",
    ]) + "\n"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HOME=str(home), CAMELID_HOME=str(camelid_home()))
    r = subprocess.run(CAMELID + ["chat", "--backend", "torch", "--model", str(tiny_model_dir), "--style", "programmatic",
                                  "--temperature", "0", "--max-new-tokens", "3", "--dtype", "float32"],
                       input=script, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("ASSISTANT: ") for line in lines) == 4
    notes = [line for line in lines if line.startswith("(cannot ")]
    assert len(notes) == 4, lines
    assert notes[0].startswith(f"(cannot save to {home / 'a-file' / 'conv.json'}: ")
    assert f"(saved to {home / 'conv.json'})" in lines  # ~ expanded
    assert "the system prompt must be a string" in notes[1] and "message 1 needs a role" in notes[2]
    assert notes[3] == f"(cannot load {home / 'missing.json'}: No such file or directory)"
    saved = json.loads((home / "conv.json").read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["Hello there", "Second"]


def test_chat_exits_on_eof(tiny_model_dir):
    r = run(["chat", "--backend", "torch", "--model", str(tiny_model_dir), "--style", "programmatic", "--max-new-tokens", "3"],
            stdin="hi\n")
    assert r.returncode == 0 and r.stdout.count("ASSISTANT: ") == 1


def test_generate_debug_free_and_raw(tiny_model_dir):
    r = run(["generate", "--backend", "torch", "--model", str(tiny_model_dir), "--raw", "--max-new-tokens", "4",
             "Question: hi\n\nAnswer: "])
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


@pytest.mark.parametrize("args, needle, code", [
    # exit 2: a flag value wrong in itself; exit 1: the flags are fine, but what they name is not there
    (["--model", "no-such-model"], "unknown model 'no-such-model'", 1),
    (["--temperature", "-1"], "temperature must be >= 0", 2),
    (["--top-p", "0"], "top_p must be in (0, 1]", 2),
    (["--top-p", "1.5"], "top_p must be in (0, 1]", 2),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1", 2),
    (["--device", "cuda"], "no CUDA GPU", 1),
    (["--load-8bit", "--backend", "llama.cpp"], "--load-8bit is for the torch backend", 2),
    (["--conv-template", "alpaca"], "unknown conversation template", 2),
])
def test_bad_input_is_one_line(args, needle, code, tiny_model_dir):
    full = ["generate", "hi"] + (args if "--model" in args else ["--model", str(tiny_model_dir)] + args)
    full += [] if "--backend" in args else ["--backend", "torch"]
    r = run(full)
    assert r.returncode == code
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camelid: error: ") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_and_corrupt_weights(tiny_model_dir, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(tiny_model_dir, missing)
    (missing / "model.safetensors").unlink()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all")
    for model, needle in [(missing, "cannot load model weights"), (corrupt, "cannot load model weights"),
                          (bad_gguf, "not a GGUF file"), (tmp_path / "nope.gguf", "does not exist"),
                          (tmp_path, "is not a model folder")]:
        r = run(["generate", "hi", "--backend", "torch", "--model", str(model)])
        err = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(err) == 1 and needle in err[0], (model, r.stderr)


def test_help_lists_commands():
    r = run(["--help"])
    assert r.returncode == 0
    for cmd in ("chat", "generate", "serve", "sft", "reward", "ppo", "pipeline", "export"):
        assert cmd in r.stdout
