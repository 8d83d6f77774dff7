"""Output folders: camelid replaces only what it wrote (or what --overwrite names), cleans its own
leftovers of killed runs, and creates files with the permissions the umask gives."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.runfiles import OUTPUT_MARKER
from camelid.utils import atomic_dir, atomic_write_text

from test_merge import random_adapter
from test_pipeline import write_dump


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    return path


def test_atomic_dir_refuses_a_folder_camelid_did_not_write(tmp_path):
    out = users_folder(tmp_path / "models")
    ran = []
    with pytest.raises(CamelidError, match=r"models already exists and camelid did not write it.*--overwrite"):
        with atomic_dir(out) as tmp:
            ran.append(tmp)
    assert not ran, "the check comes before any work"
    assert (out / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_atomic_dir_replaces_its_own_or_an_empty_folder_and_what_overwrite_names(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / OUTPUT_MARKER).is_file()
    with atomic_dir(out) as tmp:  # camelid's own: replaced whole
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "b"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "c").write_text("3")
    assert (empty / "c").is_file()
    users = users_folder(tmp_path / "users")
    with atomic_dir(users, overwrite=True) as tmp:
        (tmp / "d").write_text("4")
    assert not (users / "thesis.txt").exists() and (users / "d").is_file()


def test_atomic_dir_cleans_leftovers_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"out.tmp-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    old = tmp_path / f"out.old-{dead_pid}"
    old.mkdir()
    live = tmp_path / f"out.tmp-{os.getppid()}-def456"  # our parent is alive: not ours to judge
    live.mkdir()
    unrelated = users_folder(tmp_path / "out.tmp-notes")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert not stale.exists() and not old.exists()
    assert live.is_dir() and (unrelated / "thesis.txt").is_file()


def test_outputs_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_text(tmp / "f.txt", "x")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "out" / "f.txt").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_merge_keeps_a_users_folder_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    random_adapter(tiny_model_dir, tmp_path / "adapter", "causal_lm")
    models = users_folder(tmp_path / "models")
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(models)]) == 1
    err = capsys.readouterr().err
    assert "camelid did not write it" in err and "Traceback" not in err
    assert (models / "thesis.txt").is_file()
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0  # its own: replaced
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(models), "--overwrite"]) == 0
    assert not (models / "thesis.txt").exists() and (models / "config.json").is_file()


def test_data_commands_keep_a_users_folder(tmp_path, capsys):
    out = users_folder(tmp_path / "x")
    assert main(["data", "stackexchange", "sample", "--out", str(out), "--no-progress"]) == 1
    assert "camelid did not write it" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert main(["data", "import", str(pairs), "--out", str(out), "--no-progress"]) == 1
    assert "camelid did not write it" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]


def test_report_and_eval_check_their_folder_before_work(tmp_path):
    from camelid.eval.evaluate import EvalConfig, run as run_eval
    from camelid.eval.report import build_report

    users = users_folder(tmp_path / "report")
    with pytest.raises(CamelidError, match="camelid did not write it"):
        build_report(tmp_path, users)
    with pytest.raises(CamelidError, match="camelid did not write it"):
        run_eval(EvalConfig(data=str(tmp_path / "no-data"), out=str(users)))
    assert (users / "thesis.txt").is_file()


def test_pipeline_never_removes_a_folder_it_did_not_mark(tmp_path, tiny_model_dir):
    """`--out .` beside the user's own data/ holding the dump given as --data: refused before any
    stage runs, the dump intact."""
    from camelid import pipeline

    run = tmp_path / "here"
    dump = write_dump(run / "data")
    before = (dump / "Posts.xml").read_bytes()
    cfg = pipeline.PipelineConfig(data=str(dump / "Posts.xml"), model=str(tiny_model_dir), out=str(run))
    with pytest.raises(CamelidError, match=r"data exists and was not written by camelid pipeline"):
        pipeline.run(cfg)
    assert (dump / "Posts.xml").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["data"]
    users_folder(tmp_path / "there" / "report")
    with pytest.raises(CamelidError, match=r"report exists and was not written"):
        pipeline.run(pipeline.PipelineConfig(data="sample", model=str(tiny_model_dir), out=str(tmp_path / "there")))


@pytest.mark.slow
def test_generate_prints_only_the_answer_on_stdout(tmp_path):
    """A first run converts the bundled model: that status line goes to stderr, so stdout holds
    only the answer (`camelid generate "..." > answer.txt`)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CAMELID_HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "camelid", "generate", "What is the capital of France?", "--backend", "torch",
                          "--temperature", "0", "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "converting" in out.stderr
    assert "Paris" in out.stdout and len(out.stdout.strip().splitlines()) == 1, out.stdout
