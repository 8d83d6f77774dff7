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
    r = run(["chat", "--model", str(tiny_model_dir), "--style", "programmatic", "--temperature", "0",
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


def test_chat_exits_on_eof(tiny_model_dir):
    r = run(["chat", "--model", str(tiny_model_dir), "--style", "programmatic", "--max-new-tokens", "3"], stdin="hi\n")
    assert r.returncode == 0 and r.stdout.count("ASSISTANT: ") == 1


def test_generate_debug_free_and_raw(tiny_model_dir):
    r = run(["generate", "--model", str(tiny_model_dir), "--raw", "--max-new-tokens", "4", "Question: hi\n\nAnswer: "])
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


@pytest.mark.parametrize("args, needle", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--load-8bit", "--backend", "llama.cpp"], "--load-8bit is for the torch backend"),
    (["--conv-template", "alpaca"], "unknown conversation template"),
])
def test_bad_input_is_one_line(args, needle, tiny_model_dir):
    full = ["generate", "hi"] + (args if "--model" in args else ["--model", str(tiny_model_dir)] + args)
    r = run(full)
    assert r.returncode == 2
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
        r = run(["generate", "hi", "--model", str(model)])
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and needle in err[0], (model, r.stderr)


def test_help_lists_commands():
    r = run(["--help"])
    assert r.returncode == 0
    for cmd in ("chat", "generate", "serve", "sft", "reward", "ppo", "pipeline", "export"):
        assert cmd in r.stdout
