"""`camelid export gguf`: ExportConfig -> a GGUF file (+ Ollama Modelfile), and the GGUF cache
the llama.cpp backend exports into on the fly."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError
from camelid.export.spm import build_spm_vocab
from camelid.export.vocab import LLAMA, GgufVocab, build_bpe_vocab, tokenizer_kind
from camelid.export.writer import QUANTS
from camelid.utils import camelid_home, status


@dataclass(frozen=True)
class ExportConfig:
    model: str = "smollm2-135m"
    """model to export: a bundled name, a llama Hugging Face folder, or a LoRA adapter folder (merged on the fly)"""
    out: str | None = None
    """output .gguf path; unset: <model>-<quant>.gguf in the current folder"""
    quant: str = "q8_0"
    """weight type: f16, q8_0, q4_0 (gguf package) or q4_k_m (llama.cpp's quantizer, needs llama-cpp-python)"""
    name: str | None = None
    """general.name written into the file; unset: the model folder's name"""
    modelfile: bool = True
    """also write <out stem>.Modelfile for `ollama create`"""
    progress: bool = True
    """show a progress bar over tensors"""

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ValueError(f"unknown quant type {self.quant!r}; choose one of {', '.join(QUANTS)}")

    def out_path(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        return Path(f"{Path(self.model).name}-{self.quant}.gguf")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    modelfile: Path | None
    quant: str
    n_tensors: int
    size_bytes: int
    seconds: float


def _check_out(out: Path) -> None:
    """Fail before any work when the output cannot be written (one-line error)."""
    if out.is_dir():
        raise CamelidError(f"--out {out} is a folder; give a file path such as {out / 'model.gguf'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CamelidError(f"cannot write {out}: {e.strerror}; choose another --out") from None


def build_vocab(model_dir: Path, vocab_size: int, hint_dirs: tuple[Path, ...] = ()) -> GgufVocab:
    """The GgufVocab of the tokenizer in `model_dir`, by its kind: SentencePiece BPE with byte
    fallback (camelid.export.spm) or byte-level BPE (camelid.export.vocab); another kind is a
    one-line error that names it."""
    if tokenizer_kind(model_dir) == LLAMA:
        return build_spm_vocab(model_dir, vocab_size)
    return build_bpe_vocab(model_dir, vocab_size, hint_dirs)


def export_gguf(cfg: ExportConfig) -> ExportResult:
    """Export `cfg.model` to GGUF. Returns where it went and what was written."""
    from camelid.export.ollama import modelfile_text
    from camelid.export.quantize import quantize_with_llamacpp, require_llamacpp_quantizer
    from camelid.export.source import open_source
    from camelid.export.writer import temp_beside, write_gguf
    from camelid.utils import Timer, atomic_write_text

    out = cfg.out_path()
    _check_out(out)
    if cfg.quant == "q4_k_m":
        require_llamacpp_quantizer()
    with Timer() as timer:
        src = open_source(cfg.model)
        vocab = build_vocab(src.tokenizer_dir, src.config["vocab_size"], src.hint_dirs)
        name = cfg.name or src.name
        with temp_beside(out) as tmp:
            if cfg.quant == "q4_k_m":
                # llama.cpp's k-quant recipe (Q4_K with Q6_K for sensitive tensors) from an f16 file
                with temp_beside(out.with_name(out.name + ".f16")) as f16:
                    plan = write_gguf(src, vocab, "f16", f16, name, cfg.progress)
                    quantize_with_llamacpp(f16, tmp, "q4_k_m")
            else:
                plan = write_gguf(src, vocab, cfg.quant, tmp, name, cfg.progress)
    modelfile = None
    if cfg.modelfile:
        modelfile = out.with_name(out.stem + ".Modelfile")
        bos = vocab.tokens[vocab.special_ids["bos"]] if vocab.add_bos and "bos" in vocab.special_ids else ""
        atomic_write_text(modelfile, modelfile_text(out.name, vocab.chat_template, bos, vocab.eos_token))
        modelfile.chmod(0o644)  # mkstemp made it owner-only; Ollama's server may run as another user
    return ExportResult(out, modelfile, cfg.quant, len(plan), out.stat().st_size, timer.seconds)


def _model_fingerprint(model_dir: Path) -> str:
    """Changes when the model's weights, config or tokenizer change (size + mtime, no hashing of GBs)."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".jinja", ".model"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def cached_gguf(model: str, quant: str = "q8_0", progress: bool = True) -> Path:
    """The GGUF of `model` in the cache ($CAMELID_HOME/gguf/), exported first if missing or stale."""
    from camelid.models.resolve import resolve_model

    model_dir = resolve_model(model)
    out = camelid_home() / "gguf" / f"{model_dir.name}-{_model_fingerprint(model_dir)}-{quant}.gguf"
    if not out.is_file():
        status(f"exporting {model} to {out} (once; later runs reuse it)")
        export_gguf(ExportConfig(model=str(model_dir), out=str(out), quant=quant, modelfile=False, progress=progress))
    return out


def describe(result: ExportResult) -> str:
    lines = [f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.n_tensors} tensors, {result.quant}) in {result.seconds:.1f}s"]
    if result.modelfile:
        lines.append(f"wrote {result.modelfile}; run:  ollama create {result.path.stem} -f {result.modelfile}")
    return "\n".join(lines)


__all__ = ["ExportConfig", "ExportResult", "export_gguf", "cached_gguf", "describe"]
