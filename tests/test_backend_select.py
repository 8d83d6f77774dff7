"""`--backend auto` (the default of chat, generate and serve): llama.cpp on a GGUF exported once
into $CAMELID_HOME where it can run the model, the torch engine otherwise, and one status line on
stderr saying which backend and precision run, and why; stdout keeps the answer only."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from camelid.cli import main
from camelid.engine.select import choose
from camelid.export.writer import DEFAULT_QUANT

GENERATE = ["generate", "--backend", "auto", "--raw", "--temperature", "0", "--max-new-tokens", "6", "--threads", "2", "The quick brown fox"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $CAMELID_HOME: where auto exports the GGUF (the bundled model stays where it is:
    these tests use the tiny model folder)."""
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def status_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("backend: ")]


def torch_answer(model_dir) -> str:
    from camelid.engine import Engine, SamplingParams

    eng = Engine.load(str(model_dir), device="cpu")
    return eng.generate(["The quick brown fox"], SamplingParams(temperature=0, max_new_tokens=6))[0].text


@pytest.mark.llamacpp
def test_auto_runs_llama_cpp_on_the_exported_gguf(tiny_model_dir, home, capsys):
    pytest.importorskip("llama_cpp")
    from camelid.engine import SamplingParams
    from camelid.engine.llamacpp import load_llamacpp_engine

    assert main([*GENERATE, "--model", str(tiny_model_dir)]) == 0
    out, err = capsys.readouterr()
    assert status_lines(err) == [f"backend: llama.cpp {DEFAULT_QUANT} (auto; --backend torch for the torch engine)"]
    [gguf] = (home / "gguf").glob(f"*-{DEFAULT_QUANT}.gguf")
    eng = load_llamacpp_engine(str(gguf), threads=2, parallel=1)
    try:
        want = eng.generate(["The quick brown fox"], SamplingParams(temperature=0, max_new_tokens=6))[0].text
    finally:
        eng.close()
    assert out == want + "\n", "stdout holds the answer only"
    # the next run reuses the export (no "exporting" line), and --quant picks another file
    assert main([*GENERATE, "--model", str(tiny_model_dir)]) == 0
    assert "exporting" not in capsys.readouterr().err
    assert main([*GENERATE, "--model", str(tiny_model_dir), "--quant", "q4_0"]) == 0
    assert status_lines(capsys.readouterr().err) == ["backend: llama.cpp q4_0 (auto; --backend torch for the torch engine)"]


def test_auto_without_llama_cpp_runs_torch_and_says_why(tiny_model_dir, home, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails as if not installed
    assert main([*GENERATE, "--model", str(tiny_model_dir)]) == 0
    out, err = capsys.readouterr()
    assert status_lines(err) == ["backend: torch bfloat16 on cpu (auto: llama-cpp-python is not installed; "
                                 "pip install 'camelid[llamacpp]' for the faster llama.cpp backend)"]
    assert out == torch_answer(tiny_model_dir) + "\n"
    assert not (home / "gguf").exists()


def test_auto_runs_torch_on_a_model_that_does_not_export(tiny_model_dir, home, tmp_path, capsys):
    """A Mistral model (the tiny Llama's weights under Mistral's config): the torch engine runs
    it; the GGUF export takes llama-architecture models only, and leaves nothing behind."""
    mistral = tmp_path / "mistral"
    shutil.copytree(tiny_model_dir, mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    assert main([*GENERATE, "--model", str(mistral)]) == 0
    out, err = capsys.readouterr()
    [line] = status_lines(err)
    assert line.startswith("backend: torch bfloat16 on cpu (auto: it does not export to GGUF for llama.cpp: ")
    assert "'mistral' model" in line
    assert out == torch_answer(mistral) + "\n"
    assert not any((home / "gguf").glob("*")), "the failed export left nothing"


def test_explicit_torch_and_torch_only_options(tiny_model_dir, home, capsys):
    assert main([*GENERATE, "--model", str(tiny_model_dir), "--backend", "torch", "--dtype", "float32"]) == 0
    assert status_lines(capsys.readouterr().err) == ["backend: torch float32 on cpu (--backend torch)"]
    assert main([*GENERATE, "--model", str(tiny_model_dir), "--load-8bit"]) == 0
    assert status_lines(capsys.readouterr().err) == ["backend: torch int8 on cpu (auto: --load-8bit is a torch engine option)"]
    assert not (home / "gguf").exists(), "nothing was exported"


@pytest.mark.parametrize("options, why", [
    ({"dtype": "float32"}, "--dtype float32 is a torch engine option"),
    ({"load_8bit": True}, "--load-8bit is a torch engine option"),
    ({"device": "cuda"}, "--device cuda is a torch engine option"),
    ({"device": "mps"}, "--device mps is a torch engine option"),
])
def test_torch_only_options_choose_torch_before_anything_loads(options, why):
    choice = choose("no-such-model", "auto", **options)  # the model is never looked at
    assert (choice.backend, choice.why) == ("torch", f"auto: {why}")


def test_status_line_is_quiet_under_quiet(tiny_model_dir, home, capsys):
    assert main(["--quiet", *GENERATE, "--model", str(tiny_model_dir), "--backend", "torch"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("\n")
