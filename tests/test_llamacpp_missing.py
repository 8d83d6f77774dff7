"""Without llama-cpp-python, the llama.cpp backend and q4_k_m export say how to install it."""

import sys

import pytest

from camelid.errors import CamelidError


@pytest.fixture
def no_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError


def test_backend_says_how_to_install(no_llama_cpp):
    from camelid.engine.llamacpp import load_llamacpp_engine

    with pytest.raises(CamelidError, match=r"pip install 'camelid\[llamacpp\]'"):
        load_llamacpp_engine("smollm2-135m")


def test_cli_error_is_one_line(no_llama_cpp, capsys):
    from camelid.cli import main

    assert main(["generate", "--backend", "llama.cpp", "hi"]) == 1  # a missing extra: the work failed, the usage is fine
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama-cpp-python" in err[0]
