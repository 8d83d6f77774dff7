"""What the tests of the kit's C kernels (test_amx.py, test_f32_decode.py) share: the bundled
model's sampled decode, run with and without a kernel, and the kernel's loader in a child process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path


def sampled_decode(bundled_dir: Path, dtype: str):
    """(model, run): the bundled model in `dtype` and a function that samples 4 sequences of 12
    tokens through the engine, returning them with their hidden states."""
    from camelid.engine import Engine, SamplingParams
    from camelid.models.load import load_for_inference

    model, tok, _ = load_for_inference(str(bundled_dir), device="cpu", dtype=dtype)
    engine = Engine(model, tok)
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "def add(a, b):", "Hello", "1, 2, 3,")]

    def run():
        params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=i, ignore_eos=True, return_hidden=True)
                  for i in range(len(prompts))]
        return engine.generate([list(p) for p in prompts], params)

    return model, run


def kernel_in_child(module: str, env: dict[str, str]) -> bool:
    """Whether `camelid.cpu.<module>.kernel()` loads in a fresh process with `env` added."""
    code = f"from camelid.cpu import {module}; print({module}.kernel() is not None)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, r.stderr
    return {"True": True, "False": False}[r.stdout.strip()]


def check_falls_back(module, off: dict[str, str], tmp_path: Path) -> None:
    """The kernel of `module` is off under the switch `off`; a compiler that fails leaves a `.failed`
    verdict (so no process tries again) and torch's product in use."""
    name = module.__name__.rsplit(".", 1)[-1]
    assert not kernel_in_child(name, {**off, "CAMELID_HOME": str(tmp_path / "off")})
    home = tmp_path / "broken"
    assert not kernel_in_child(name, {"CC": "false", "CAMELID_HOME": str(home)})
    if module.kernel() is not None:  # on a machine that would otherwise build it: the failure is recorded
        assert [p.suffix for p in (home / "kernels").iterdir()] == [".failed"]
        assert "failed" in next((home / "kernels").iterdir()).read_text()


@contextlib.contextmanager
def recording(module, name: str):
    """Within the block, `module.<name>` still runs and each call's arguments are appended to the
    list yielded."""
    calls: list[tuple] = []
    real = getattr(module, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    setattr(module, name, spy)
    try:
        yield calls
    finally:
        setattr(module, name, real)
