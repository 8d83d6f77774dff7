"""The `camelid` command as a user sees it: results on stdout, camelid's status lines on stderr and
nothing else there (no third-party warnings, notices or progress bars), --quiet / --verbose, exit
codes (1: the work failed, 2: a usage error) and a one-line error naming a missing extra."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from camelid import logs
from camelid.cli import main
from camelid.extras import EXTRA_OF_MODULE
from train_data import write_dataset

REPO = Path(__file__).resolve().parents[1]
CAMELID = [sys.executable, "-m", "camelid"]
THIRD_PARTY_NOISE = ("bitsandbytes", "kernels-community", "Warning", "warn(", "Loading weights",
                     "Writing model shards", "Map:", "pad_token_id", "loss=-", "Traceback")
"""What never reaches stderr without --verbose (the progress bar once showed `loss=-` before the first log)."""


def camelid(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(CAMELID + list(args), capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def sft_args(tmp_path_factory, tiny_model_dir) -> list[str]:
    data = write_dataset(tmp_path_factory.mktemp("sftdata"), n_pairs=20)
    return ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--seq-length", "32", "--batch-size", "2",
            "--max-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--max-eval-samples", "4", "--overwrite"]


def test_sft_8bit_prints_results_on_stdout_and_only_its_own_status_on_stderr(sft_args, tmp_path):
    pytest.importorskip("bitsandbytes")
    r = camelid(*sft_args, "--load-8bit", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("sft: 2 steps, train loss ") and out[1] == f"adapter: {tmp_path / 'run' / 'adapter'}"
    assert "train blocks" in r.stderr and "train blocks" not in r.stdout  # a status line
    assert "loss=" in r.stderr  # the bar shows the loss once logged
    for noise in THIRD_PARTY_NOISE:
        assert noise not in r.stderr, (noise, r.stderr[-3000:])


def test_quiet_leaves_results_only_and_verbose_adds_the_libraries_output(sft_args, tmp_path):
    quiet = camelid("--quiet", *sft_args, "--out", str(tmp_path / "q"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-3000:]
    assert quiet.stdout.startswith("sft: 2 steps, train loss ")
    verbose = camelid(*sft_args, "--out", str(tmp_path / "v"), "--verbose")  # after the command name too
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Loading weights" in verbose.stderr and "train blocks" in verbose.stderr
    assert verbose.stdout.startswith("sft: 2 steps, train loss ")


def test_exit_codes_usage_is_2_and_a_failed_run_is_1(tmp_path, capsys):
    assert main(["estimate", "--params", "lots"]) == 2  # a flag value wrong in itself
    assert main(["sft", "--lora-r", "0", "--data", str(tmp_path)]) == 2  # a config check
    assert main(["models", "fetch", "--model", str(tmp_path / "no-such-model")]) == 1  # names nothing
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("camelid: error: ") for line in err), err
    assert "lora_r" in err[1] and "no such folder" in err[2]
    for argv in (["generate", "hi", "--max-new-tokens", "many"], ["--quiet", "generate", "hi", "--verbose"]):
        with pytest.raises(SystemExit) as e:  # argparse's own usage errors
            main(argv)
        assert e.value.code == 2
    assert "exclude each other" in capsys.readouterr().err


def test_verbose_shows_the_traceback_of_an_error(tmp_path):
    r = camelid("-v", "models", "fetch", "--model", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("camelid: error: no such folder")


@pytest.mark.parametrize("blocked, argv, extra", [
    ("fastapi", ["serve"], "serve"),
    ("pyarrow", ["data", "stackexchange", "dump-folder"], "train"),
])
def test_missing_extra_is_one_line_naming_it(blocked, argv, extra):
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"  # `import {blocked}` now fails as if not installed
            "from camelid.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"camelid: error: `camelid {argv[0]}` needs the {extra} extra (module {blocked!r} is not installed): "
        f"pip install 'camelid[{extra}]'"]


def test_output_level_filters_third_party_warnings_and_logs_and_restores_state(capsys, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    third_party = logging.getLogger("bitsandbytes.backends.cpu")
    with logs.output_level(logs.NORMAL):
        with warnings.catch_warnings(record=True) as hidden:
            warnings.warn("an old API, shown at the default level", FutureWarning)
        third_party.warning("Failed to load CPU gemm_4bit_forward")
        third_party.error("a real failure")
        logging.getLogger("camelid.engine").warning("prompt truncated")
        logs.debug("not shown")
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert hidden == []
    assert capsys.readouterr().err == "bitsandbytes: error: a real failure\nprompt truncated\n"
    assert "TRANSFORMERS_VERBOSITY" not in os.environ and logs.level() == logs.NORMAL
    with logs.output_level(logs.VERBOSE):
        with warnings.catch_warnings(record=True) as shown:
            warnings.warn("an old API, shown under --verbose", FutureWarning)
        third_party.warning("kernel notice")
        logs.debug("a debug line")
    assert [str(w.message) for w in shown] == ["an old API, shown under --verbose"]
    assert capsys.readouterr().err == "bitsandbytes: warning: kernel notice\na debug line\n"
    with logs.output_level(logs.QUIET):
        from camelid.utils import status

        status("working")
        logging.getLogger("camelid.engine").warning("prompt truncated")
        assert logs.bars_off() and os.environ["TQDM_DISABLE"] == "1"
    assert capsys.readouterr().err == ""


def _third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in camelid/ that are neither stdlib nor camelid."""
    found = set()
    for path in (REPO / "camelid").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("camelid", "__future__")}


DIST_OF_MODULE = {"yaml": "pyyaml", "llama_cpp": "llama-cpp-python", "prompt_toolkit": "prompt_toolkit"}
"""Modules whose distribution on the package index has another name."""


def _names(requirements: list[str]) -> set[str]:
    return {_norm(r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0]) for r in requirements}


def _norm(name: str) -> str:
    """A distribution name as PEP 503 compares them (prometheus_client == prometheus-client)."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def test_every_imported_package_is_declared_in_base_or_its_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base, extras = _names(project["dependencies"]), project["optional-dependencies"]
    for module in sorted(_third_party_imports()):
        dist = _norm(DIST_OF_MODULE.get(module, module))
        extra = EXTRA_OF_MODULE.get(module)
        if extra is None:
            assert dist in base, f"{module} is imported but neither a base dependency nor in camelid/extras.py"
        else:
            assert dist in _names(extras[extra]), f"{module} -> [{extra}] but pyproject's {extra} lacks {dist}"
            assert dist not in base, f"{module} is in base and in [{extra}]"
    heavy = {"duckdb", "py7zr", "matplotlib", "trl", "datasets", "fastapi", "bitsandbytes"}
    assert not heavy & base
