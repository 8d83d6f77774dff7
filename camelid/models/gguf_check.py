"""Cheap validation of a GGUF file before the slow conversion, for one-line errors: the header and
tensor table read without the tensors (`export.header`), each tensor's data inside the file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from camelid.errors import CamelidError

if TYPE_CHECKING:
    from camelid.export.header import GgufHeader

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> "GgufHeader":
    """The file's header (metadata and tensor table), or a one-line CamelidError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CamelidError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise CamelidError(f"{path} is not a GGUF file (bad magic bytes); reinstall or re-download it")
    from camelid.export.header import check_tensor_data, read_header

    try:
        header = read_header(path)
        check_tensor_data(path, header)
    except (OSError, ValueError) as e:
        raise CamelidError(f"{path} is corrupt or truncated ({e}); reinstall or re-download it") from None
    arch = header.kv.get("general.architecture", "?")
    if arch != "llama":
        raise CamelidError(f"{path} holds a {arch!r} model; camelid supports llama-architecture models")
    return header
