"""k-quants through llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

The `gguf` package (0.19) quantizes Q4_0/Q8_0 but has no Q4_K/Q6_K quantizers, and Q4_K_M is
not one type but llama.cpp's per-tensor recipe (`llama-quant.cpp`: Q6_K for some attn_v /
ffn_down / output tensors, Q4_K elsewhere), so the faithful way is to run llama.cpp itself, as
`llama-quantize model-f16.gguf out.gguf Q4_K_M` would.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from camelid.errors import CamelidError

INSTALL_HINT = "pip install 'camelid[llamacpp]' (compiles llama.cpp, ~10 minutes)"


def require_llamacpp_quantizer() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise CamelidError(
            "--quant q4_k_m needs llama.cpp's k-quant quantizer (the gguf package cannot write Q4_K): "
            f"{INSTALL_HINT}; or use --quant q4_0 / q8_0"
        ) from None


def quantize_with_llamacpp(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    import llama_cpp

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise CamelidError(f"llama.cpp could not quantize {src} to {quant} (return code {rc})")
