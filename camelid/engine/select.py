"""Which backend generates: `--backend torch|llama.cpp|auto` of chat, generate and serve.

auto takes llama.cpp where it can, since on a CPU it decodes several times faster than the
torch engine: the model runs from a GGUF (a .gguf given as the model, or the model exported once
into $CAMELID_HOME/gguf by `export.core.cached_gguf`) when llama-cpp-python is importable and the
model exports (a llama-architecture model with a byte-level BPE or SentencePiece tokenizer; a
LoRA adapter folder is merged on export, as the torch engine merges it on load). The torch engine
runs instead when a flag asks for what only it does (`torch_only_flag`), when a GPU is there (this
llama.cpp backend runs on the CPU), when llama-cpp-python is missing, or when the model does not
export. One status line on stderr says which backend and precision run, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError, UsageError
from camelid.export.writer import DEFAULT_QUANT

BACKENDS = ("auto", "torch", "llama.cpp")
@dataclass(frozen=True)
class Choice:
    backend: str
    """torch or llama.cpp"""
    why: str
    """The reason, for the status line."""


def choose(model: str | None, backend: str = "auto", device: str = "auto", dtype: str = "auto",
           load_8bit: bool = False, quant: str = DEFAULT_QUANT) -> Choice:
    """The backend that runs `model`. Under auto this may export the model to the GGUF cache
    (once), since whether it exports is only known by exporting it."""
    conflict = option_conflict(backend, load_8bit)
    if conflict:
        raise UsageError(conflict)
    if backend != "auto":
        return Choice(backend, f"--backend {backend}")
    flag = torch_only_flag(device, dtype, load_8bit)
    if flag:
        return Choice("torch", f"auto: {flag} is a torch engine option")
    gpu = visible_gpu() if device == "auto" else None
    if gpu:
        return Choice("torch", f"auto: a {gpu} GPU is here and the llama.cpp backend runs on the CPU; --device cpu for llama.cpp")
    if not llama_cpp_importable():
        return Choice("torch", "auto: llama-cpp-python is not installed; pip install 'camelid[llamacpp]' for the faster llama.cpp backend")
    name = str(model or _default_model())
    if not name.endswith(".gguf"):
        from camelid.export.core import cached_gguf
        from camelid.models.resolve import resolve_model

        resolve_model(name)  # a model that is not there is an error under any backend
        try:
            cached_gguf(name, quant)
        except Exception as e:  # noqa: BLE001 - any failure to export: the torch engine loads it, or says why it cannot
            return Choice("torch", f"auto: it does not export to GGUF for llama.cpp: {(str(e).splitlines() or [type(e).__name__])[0]}")
    return Choice("llama.cpp", "auto; --backend torch for the torch engine")


def option_conflict(backend: str, load_8bit: bool) -> str | None:
    """What is wrong with this --backend and its options, or None."""
    if backend not in BACKENDS:
        return f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
    if backend == "llama.cpp" and load_8bit:
        return "--load-8bit is for the torch backend; with llama.cpp use --quant q8_0 (or a q8_0 .gguf)"
    return None


def torch_only_flag(device: str, dtype: str, load_8bit: bool) -> str | None:
    """The first option given that only the torch engine honours, as the user wrote it: int8
    weights, a torch dtype, a GPU device (--device cpu or auto asks for nothing llama.cpp lacks)."""
    if load_8bit:
        return "--load-8bit"
    if dtype != "auto":
        return f"--dtype {dtype}"
    if device not in ("auto", "cpu"):
        return f"--device {device}"
    return None


def visible_gpu() -> str | None:
    """cuda or mps when torch sees that GPU (where `--device auto` puts the torch engine)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def llama_cpp_importable() -> bool:
    from camelid.engine.llamacpp import import_llama_cpp

    try:
        import_llama_cpp()
    except (CamelidError, OSError):  # not installed, or its shared library does not load
        return False
    return True


def load_backend(model: str | None, backend: str = "auto", *, device: str = "auto", dtype: str = "auto", load_8bit: bool = False,
                 quant: str = DEFAULT_QUANT, max_context: int | None = None, threads: int | None = None,
                 parallel: int = 1) -> tuple[Any, str]:
    """The loaded engine (`backend.Backend`) for these options, and the status line saying which
    backend and precision run, and why (the caller shows it once the rest of its setup worked, so
    that a failure is its one line). `parallel`: the requests llama.cpp decodes together."""
    choice = choose(model, backend, device, dtype, load_8bit, quant)
    if choice.backend == "llama.cpp":
        from camelid.engine.llamacpp import load_llamacpp_engine

        engine = load_llamacpp_engine(model, threads=threads, quant=quant, max_context=max_context, parallel=parallel)
    else:
        from camelid.engine import Engine

        engine = Engine.load(model, device=device, dtype=dtype, load_8bit=load_8bit, max_context=max_context)
    return engine, f"backend: {choice.backend} {precision(engine, load_8bit)} ({choice.why})"


def precision(engine: Any, load_8bit: bool = False) -> str:
    """The weights' type as the status line names it: the GGUF's file type for llama.cpp
    (q8_0, q4_0, f16...), the torch dtype and device for the torch engine (int8 with --load-8bit)."""
    gguf = getattr(engine, "gguf", None)
    if gguf is not None:
        return gguf_file_type(gguf)
    param = next(engine.model.parameters())
    return f"{'int8' if load_8bit else str(param.dtype).removeprefix('torch.')} on {param.device.type}"


def gguf_file_type(path: Path) -> str:
    """A GGUF's `general.file_type` as llama.cpp's quantize names it (q8_0, q4_k_m, f16)."""
    import gguf

    from camelid.export.header import read_header

    ftype = read_header(path, tensors=False).kv.get("general.file_type")
    try:
        return gguf.LlamaFileType(ftype).name.lower().removeprefix("mostly_").removeprefix("all_")
    except ValueError:
        return "gguf"


def _default_model() -> str:
    from camelid.models.resolve import DEFAULT_MODEL

    return DEFAULT_MODEL
