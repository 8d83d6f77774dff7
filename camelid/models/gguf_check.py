"""Cheap validation of a GGUF file before the slow conversion, for one-line errors."""

from __future__ import annotations

from pathlib import Path

from camelid.errors import CamelidError

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CamelidError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise CamelidError(f"{path} is not a GGUF file (bad magic bytes); reinstall or re-download it")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "?"
    except Exception as e:
        raise CamelidError(f"{path} is corrupt or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__}); reinstall or re-download it") from None
    if arch != "llama":
        raise CamelidError(f"{path} holds a {arch!r} model; camelid supports llama-architecture models")
