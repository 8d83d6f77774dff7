"""Write a llama model as GGUF with the `gguf` package, the way llama.cpp's converter does.

Reference: llama.cpp `conversion/llama.py` (LlamaModel: q/k permutation, rope factors) and
`conversion/base.py` (TextModel.set_gguf_parameters, prepare_tensors: which tensors stay f32).
Tensors are streamed: pass 1 plans names, shapes and types from the weights' headers, the header
and tensor table are written, then pass 2 loads, converts and writes one tensor at a time, so
memory stays at one tensor whatever the model size. The file is written under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from camelid.errors import CamelidError
from camelid.export.source import Source
from camelid.export.vocab import GgufVocab, write_vocab

# quant name -> (general.file_type, block type of the weight matrices); q4_k_m goes through
# llama.cpp's own quantizer (the gguf package has no Q4_K/Q6_K quantizers), see quantize.py.
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
DEFAULT_QUANT = "q4_0"
"""The GGUF weight type chat, generate and serve export a model to for llama.cpp (`--quant`): the
fastest type on a CPU (the token embedding, which is also a tied output layer, stays Q8_0).
Its quality cost is measured by bench/quality.py (docs/benchmarks.md): q8_0 keeps the model's
perplexity, q4_0 costs some; `--quant q8_0` trades speed for it."""


@dataclass
class PlannedTensor:
    hf_name: str | None  # None for tensors computed here (rope_freqs)
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def _file_type(quant: str) -> Any:
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant]


def tensor_qtype(name: str, shape: tuple[int, ...], quant: str) -> Any:
    """The storage type of one tensor: norms and vectors f32 (llama.cpp requires it), matrices per
    `quant`. q4_0 keeps token_embd/output at Q8_0, as the bundled Q4_1 file and llama-quantize do
    (that matrix is also the tied output layer, where 4-bit error costs most)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if quant == "f16":
        return Q.F16
    target = Q.Q8_0 if quant == "q8_0" or name in ("token_embd.weight", "output.weight") else Q.Q4_0
    if shape[-1] % GGML_QUANT_SIZES[target][0]:
        return Q.F16  # rows must be whole blocks; llama.cpp's converter falls back the same way
    return target


def permute_rotary(w: Any, n_head: int) -> Any:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rotary layout (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(config: dict[str, Any]) -> Any | None:
    """Llama 3.x frequency factors (llama.cpp LlamaModel.generate_extra_tensors), else None."""
    import math

    import numpy as np

    rope = _rope_params(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def plan_tensors(src: Source, shapes: dict[str, tuple[int, ...]], quant: str) -> list[PlannedTensor]:
    """HF tensor names -> GGUF names and types; unknown tensors are an error, not a silent drop."""
    import gguf

    n_layers = src.config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = src.config.get("tie_word_embeddings", False)
    plan: list[PlannedTensor] = []
    factors = rope_freqs(src.config)
    if factors is not None:
        plan.append(PlannedTensor(None, "rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32))
    for hf_name, shape in shapes.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / tied to token_embd (no output.weight, like llama.cpp)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CamelidError(f"tensor {hf_name!r} has no llama.cpp name; this is not a plain llama model")
        plan.append(PlannedTensor(hf_name, name, shape, tensor_qtype(name, shape, quant)))
    return plan


def write_metadata(w: Any, src: Source, vocab: GgufVocab, quant: str, n_params: int, name: str) -> None:
    import gguf

    c = src.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    _write_lineage(w, src)
    w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_file_type(_file_type(quant))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c["vocab_size"])
    w.add_context_length(c.get("max_position_embeddings", 4096))
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c.get("num_key_value_heads") or c["num_attention_heads"])
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    w.add_rope_dimension_count(head_dim)
    if c.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    _write_rope(w, c)
    write_vocab(w, vocab)


def _write_lineage(w: Any, src: Source) -> None:
    """Where the model descends from a GGUF (the bundled model does): its licence, and the
    original as base model (general.base_model.*), so the export does not lose its provenance."""
    from camelid.export.header import read_header
    from camelid.export.vocab import source_gguf

    origin = source_gguf(src.hint_dirs)
    if origin is None:
        return
    kv = read_header(origin, tensors=False).kv
    if kv.get("general.license"):
        w.add_license(kv["general.license"])
    if kv.get("general.name"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, kv["general.name"])
        if kv.get("general.organization"):
            w.add_base_model_organization(0, kv["general.organization"])


def _write_rope(w: Any, config: dict[str, Any]) -> None:
    import gguf

    rope = _rope_params(config)
    w.add_rope_freq_base(rope["rope_theta"])
    kind = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise CamelidError(f"rope scaling {kind!r} is not supported by camelid's GGUF export (default, linear, yarn, llama3 are)")


def convert_tensor(t: PlannedTensor, data: Any, config: dict[str, Any]) -> Any:
    """float32 HF tensor -> bytes-ready numpy array in the planned type (permuted where needed)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, quants

    n_head = config["num_attention_heads"]
    if t.name.endswith("attn_q.weight"):
        data = permute_rotary(data, n_head)
    elif t.name.endswith("attn_k.weight"):
        data = permute_rotary(data, config.get("num_key_value_heads") or n_head)
    if t.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), t.qtype)


def write_gguf(src: Source, vocab: GgufVocab, quant: str, path: Path, name: str, progress: bool = True) -> list[PlannedTensor]:
    """Stream `src` into a GGUF at `path` (the caller renames it into place)."""
    import numpy as np
    from gguf import GGUFWriter, GGMLQuantizationType as Q, quants
    from tqdm import tqdm

    from camelid.logs import bars_off

    shapes = {k: t.shape for k, t in src.tensors.items()}
    plan = plan_tensors(src, shapes, quant)
    writer = GGUFWriter(path, "llama")
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    write_metadata(writer, src, vocab, quant, n_params, name)
    for t in plan:
        dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(t.qtype, np.uint8)
        byte_shape = t.shape if dtype is not np.uint8 else quants.quant_shape_to_byte_shape(t.shape, t.qtype)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(t.name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc=f"export {quant}", unit="tensor", disable=bars_off(progress)):
            data = rope_freqs(src.config) if t.hf_name is None else src.tensors[t.hf_name].load()
            writer.write_tensor_data(convert_tensor(t, data, src.config))
    finally:
        writer.close()
    return plan


@contextlib.contextmanager
def temp_beside(out: Path) -> Iterator[Path]:
    """A temporary path next to `out`, renamed onto `out` when the block succeeds."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
