"""8-bit weights for inference (`--load-8bit`), by device.

On a CPU (and Apple mps): our weight-only int8, one scale per output row. Symmetric
per-channel quantisation (LLM.int8's vector-wise scheme without the outlier split, as in
gpt-fast's `WeightOnlyInt8QuantHandler`); the matmul runs in `torch._weight_int8pack_mm`, which
reads the int8 weights directly, so decode moves half the bytes of bfloat16 and is faster, not
slower (bitsandbytes' 8-bit mode is ~3x slower than float32 on CPU). Where that op is missing
(reported once: `internals.broken`), or with CAMELID_CPU_FAST=0, the weights are dequantised per
call, the library's plain product.

On CUDA: bitsandbytes' LLM.int8() (`Linear8bitLt`, Dettmers et al. 2022, arXiv:2208.07339),
what `load_in_8bit` gives FastChat and StackLLaMA users: its int8 kernels read the int8 weights
and keep outlier features in 16 bits; the weights are quantised when the model moves to the GPU.
The output head and embeddings stay 16-bit, as transformers leaves them. Without bitsandbytes,
CUDA takes our weight-only int8 (dequantised per call: the same memory, slower), with a warning.

The tied input embedding / output head of small models is a large share of their weights
(28M of SmolLM2-135M's 135M), so our int8 quantises it too: one int8 table serves both the
lookup (rows dequantised on the fly) and the output projection.
"""

from __future__ import annotations

import gc
import importlib.util
import logging

import torch
from torch import nn
from torch.nn import functional as F

from camelid.cpu import heap

CHUNK_BYTES = 16 * 2**20
"""quantize_rows works through a weight this many float32 bytes at a time (its temporaries)."""


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int8 and (N,) float scales with w ≈ q * scale[:, None]. Rows are
    taken in chunks, so the float32 temporaries stay small beside a large weight (a 7B model's
    embedding is 500 MB in float32)."""
    w = weight.detach()
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    step = max(1, CHUNK_BYTES // (4 * max(k, 1)))
    for i in range(0, n, step):
        rows = w[i : i + step].float()
        s = rows.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[i : i + step] = torch.round(rows / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[i : i + step] = s
    return q, scale


INT8PACK_K_MULTIPLE = 8
"""`torch._weight_int8pack_mm` reads K in blocks of 8 on CPU and crashes the process (no
exception) on other widths; such layers take the dequantising product."""


def packed_product() -> bool:
    """Whether new int8 layers take `torch._weight_int8pack_mm`: the kit on and the op present."""
    from camelid.cpu import internals
    from camelid.cpu.switches import enabled

    return enabled() and not internals.broken("int8-matmul")


PACKED_MAX_ROWS = 64
PACKED_MAX_ROWS_AMX = 16
"""Up to this many rows (of 16-bit activations) a CPU product takes the packed int8 kernel; above
it, the dequantised weight's F.linear. The packed kernel's cost grows with every row, a 16-bit
GEMM's hardly: on a Xeon the crossover is ~16 rows with AMX, ~64 without (a 448-row prefill 6x
and 1.4x faster dequantised). With float32 activations the packed kernel is slower at any row
count (1 ms vs 0.17 ms at one row, 420 ms vs 9 ms at 448, for a 576 x 1536 weight), so
float32 never takes it."""


def packed_rows() -> int:
    """The most rows new int8 layers send to the packed kernel (0: never)."""
    from camelid.cpu.switches import native_bf16

    if not packed_product():
        return 0
    return PACKED_MAX_ROWS_AMX if native_bf16() else PACKED_MAX_ROWS


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, packed: int = PACKED_MAX_ROWS) -> torch.Tensor:
    """x (..., K) @ dequant(q)(N, K)^T -> (..., N) in x's dtype: through the weight-packed int8
    product where it applies (on a CPU: 16-bit x of at most `packed` rows; elsewhere: `packed`
    not 0), else the dequantised weight's F.linear."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.device.type == "cpu":
        use = x.dtype in (torch.bfloat16, torch.float16) and x2.shape[0] <= packed
    else:
        use = bool(packed) and (x.device.type == "mps" or (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 8))
    if use and shape[-1] % INT8PACK_K_MULTIPLE == 0:
        try:
            y = torch._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
            return y.reshape(*shape[:-1], q.shape[0])
        except (RuntimeError, NotImplementedError):
            pass
    return (F.linear(x2, q.to(x.dtype)) * scale.to(x.dtype)).reshape(*shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """An nn.Linear stored as int8 rows and one scale per row (`packed`: `packed_rows()` when made)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        self.packed = packed_rows()
        q, scale = quantize_rows(linear.weight)
        dtype = dtype or linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype, copy=True), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.qweight, self.scale, self.packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows; `weight` exists only as the int8 data."""

    def __init__(self, emb: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_rows(emb.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(dtype))
        self.dtype = dtype
        self.padding_idx = emb.padding_idx
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scale[ids][..., None]


class Int8TiedHead(nn.Module):
    """Output projection that reuses an Int8Embedding's table (tied embeddings)."""

    def __init__(self, emb: Int8Embedding):
        super().__init__()
        self.emb = [emb]  # a list, so the table is not registered (and counted) twice
        self.packed = packed_rows()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb[0]
        return int8_matmul(x, e.qweight, e.scale, self.packed)


WEIGHT_ONLY, BITSANDBYTES = "weight-only", "bitsandbytes"
LLM_INT8_THRESHOLD = 6.0
"""LLM.int8()'s outlier threshold: input features above it are multiplied in 16 bits
(the paper's value and transformers' `BitsAndBytesConfig` default)."""


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def int8_backend(device: torch.device | str | None) -> str:
    """The 8-bit backend for a model that will run on `device`: bitsandbytes on CUDA where it is
    installed, else our weight-only int8 (see the module docstring)."""
    if device is not None and torch.device(device).type == "cuda":
        if has_bitsandbytes():
            return BITSANDBYTES
        logging.getLogger(__name__).warning(
            "--load-8bit on CUDA without bitsandbytes: int8 weights are dequantised per call (slower); "
            "pip install bitsandbytes for LLM.int8() kernels")
    return WEIGHT_ONLY


def quantize_model_int8(model: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """8-bit weights for a model (still on the CPU) that will run on `device` (default: the CPU),
    by `int8_backend`; returns the model, changed in place. Weight-only int8 takes the model in
    any float dtype (best: the checkpoint's own, loaded without a copy) and leaves what stays in
    floating point (scales, norms, biases) in `dtype`."""
    if int8_backend(device) == BITSANDBYTES:
        return to_bitsandbytes(model)
    return own_memory(quantize_weight_only(model, dtype), dtype)


def load_dtype(dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype | str:
    """The dtype to load a model in before `quantize_model_int8(model, dtype, device)`: for our
    weight-only int8, the checkpoint's own ("auto": loaded without a conversion, the weights stay
    views of the memory-mapped file, whose pages are handed back as each is quantised, so the load
    never holds a 16-bit copy); for bitsandbytes, `dtype` (its layers keep 16-bit weights)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return dtype if on_cuda and has_bitsandbytes() else "auto"  # int8_backend's choice, without its warning


def own_memory(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Copy the float parameters left after quantisation (norm weights) into memory of their own,
    in `dtype` (None: those that view a mapped file, in their own dtype), and the float buffers
    that still view a mapped file (in their own dtype: rotary tables stay float32).
    transformers memory-maps a safetensors checkpoint and keeps tensors whose dtype matches as
    views of the mapping; while one view lives, the whole mapping stays, with every page the
    quantisation read resident: on the bundled model 61 norm weights kept the 513 MB file in RSS
    beside its 134 MB of int8 weights."""
    mapped = file_mappings()
    with torch.no_grad():
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and p.is_floating_point() and (dtype is not None or _in_mapping(p, mapped)):
                    p.data = p.data.to(dtype or p.dtype, copy=True)
            for name, b in m._buffers.items():
                if b is not None and b.is_floating_point() and _in_mapping(b, mapped):
                    m._buffers[name] = b.clone()
    return model


def release_checkpoint(model: nn.Module) -> nn.Module:
    """After bitsandbytes quantised a model loaded on the CPU (`load_in_8bit`, training's 8-bit
    base): its int8 weights are copies, but the embeddings and norms still view the memory-mapped
    checkpoint, which keeps every page the quantisation read resident, and the float copies it
    made are freed into the C heap without going back to the system. Copy the views out
    (`own_memory`) and trim the heap (glibc). Bundled model: 1.20 GB resident after the load
    becomes 0.67 GB, for 0.22 GB of weights."""
    own_memory(model, None)
    gc.collect()
    heap.trim()
    return model


def to_bitsandbytes(model: nn.Module) -> nn.Module:
    """Every nn.Linear but the output head becomes a bitsandbytes `Linear8bitLt` holding its
    16-bit weights; they are quantised to int8 when the model is moved to a device (`.to`)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD, device="meta")
            q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
    return model


def quantize_weight_only(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every nn.Linear and the input embedding (and a tied head) with our int8 versions.

    A weight that is a view of the memory-mapped checkpoint has its pages handed back to the
    kernel once it is quantised (`release_file_pages`): otherwise every page the quantisation
    reads stays resident until the mapping goes, and loading in 8 bits peaks above loading in 16."""
    mapped = file_mappings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not model.get_output_embeddings():
                setattr(parent, name, Int8Linear(child, dtype))
                release_file_pages(child.weight, mapped)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    qemb = Int8Embedding(emb, dtype)
    model.set_input_embeddings(qemb)
    if head is not None:
        new_head = Int8TiedHead(qemb) if tied else Int8Linear(head, dtype)
        model.set_output_embeddings(new_head)
        # transformers re-ties weights on some calls; there is no float weight left to tie.
        model.config.tie_word_embeddings = False
        release_file_pages(head.weight, mapped)
    release_file_pages(emb.weight, mapped)
    return model


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of the regular files this process has memory-mapped (Linux's
    /proc/self/maps; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            lo, hi = parts[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans


def _in_mapping(t: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return t.device.type == "cpu" and any(lo <= start and end <= hi for lo, hi in mapped)


def release_file_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) on the whole pages of `t`'s bytes when they lie in a memory-mapped
    file (a checkpoint loaded without a copy) and `t`'s values are no longer needed: the kernel
    drops them from this process's memory. A private file mapping reads back from the file if
    touched again, so nothing that still views other bytes of the file changes."""
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED") or not _in_mapping(t, mapped):
        return
    start = t.data_ptr()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi > lo:
        heap.libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(mmap.MADV_DONTNEED))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting shared storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
