"""A fast reader of a GGUF file's header: scalar metadata and the tensor table, no tensor data.

`gguf.GGUFReader` builds a numpy view per array element, which takes many seconds for a 49k-token
vocabulary; this reader skips arrays by their byte lengths. Used
to validate files and read a few keys (the pre-tokenizer name, the architecture) cheaply.
Layout: the GGUF spec (ggml `docs/gguf.md`): magic, version, n_tensors, n_kv, then the KVs,
then per tensor: name, n_dims, dims (ggml order, fastest first), type, offset.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayInfo:
    """An array value, summarised: element type code and length."""

    subtype: int
    length: int


@dataclass
class GgufHeader:
    version: int
    kv: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    """name -> (shape in numpy order, GGMLQuantizationType value)."""
    offsets: dict[str, int] = field(default_factory=dict)
    """name -> absolute byte offset of the tensor's data in the file."""


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("file ends inside its header")
    return struct.unpack("<" + fmt, data)[0]


def _string(f: BinaryIO, size: int) -> str:
    """A length-prefixed string; `size`, the file's, bounds the length (a damaged one would
    otherwise ask read() for exabytes)."""
    n = _read(f, "Q")
    data = f.read(n) if n <= size else b""
    if len(data) != n:
        raise ValueError("a string runs past the end of the file")
    return data.decode("utf-8", "replace")


def _value(f: BinaryIO, vtype: int, size: int) -> Any:
    if vtype == _STRING:
        return _string(f, size)
    if vtype == _ARRAY:
        sub, n = _read(f, "I"), _read(f, "Q")
        if sub in _SCALAR:
            if n * struct.calcsize(_SCALAR[sub]) > size:
                raise ValueError("an array runs past the end of the file")
            f.seek(n * struct.calcsize(_SCALAR[sub]), 1)
        else:
            for _ in range(n):
                _value(f, sub, size)
        return ArrayInfo(sub, n)
    if vtype not in _SCALAR:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return _read(f, _SCALAR[vtype])


def read_header(path: str | Path, tensors: bool = True) -> GgufHeader:
    """Parse the header of the GGUF at `path`; raises ValueError for a file that is not GGUF."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic bytes)")
        size = os.fstat(f.fileno()).st_size
        header = GgufHeader(_read(f, "I"))
        n_tensors, n_kv = _read(f, "Q"), _read(f, "Q")
        for _ in range(n_kv):
            key = _string(f, size)
            header.kv[key] = _value(f, _read(f, "I"), size)
        for _ in range(n_tensors if tensors else 0):
            name = _string(f, size)
            dims = [_read(f, "Q") for _ in range(_read(f, "I"))]
            qtype, offset = _read(f, "I"), _read(f, "Q")
            header.tensors[name] = (tuple(reversed(dims)), qtype)
            header.offsets[name] = offset
        align = header.kv.get("general.alignment", 32)
        start = (f.tell() + align - 1) // align * align
        header.offsets = {k: start + v for k, v in header.offsets.items()}
    return header


def check_tensor_data(path: str | Path, header: GgufHeader) -> None:
    """ValueError unless every tensor of the table has a known type and its data lies inside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = Path(path).stat().st_size
    for name, (shape, qtype) in header.tensors.items():
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name} has an unknown type {qtype}") from None
        if header.offsets[name] + math.prod(shape) // block * type_size > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")


def tensor_data(path: str | Path, header: GgufHeader, name: str) -> Any:
    """One tensor of the file as float32 numpy (dequantized with gguf.quants where needed)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    from gguf.quants import quant_shape_to_byte_shape

    shape, qtype = header.tensors[name]
    qt = GGMLQuantizationType(qtype)
    byte_shape = quant_shape_to_byte_shape(shape, qt) if qt not in (qt.F32, qt.F16) else shape
    dtype = {qt.F32: np.float32, qt.F16: np.float16}.get(qt, np.uint8)
    raw = np.memmap(path, dtype=dtype, mode="r", offset=header.offsets[name], shape=tuple(byte_shape))
    return np.asarray(raw, dtype=np.float32) if dtype is not np.uint8 else quants.dequantize(np.asarray(raw), qt)
