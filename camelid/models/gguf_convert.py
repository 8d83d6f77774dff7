"""A llama GGUF as a Hugging Face model folder (float32 safetensors, config, tokenizer), read once.

transformers' own GGUF loading (`from_pretrained(gguf_file=...)`) parses the file's metadata with
gguf's `GGUFReader`, which builds a numpy view per element of every array (a 49k-token vocabulary
and its merges: ~3.5 s a parse on a 2-core Xeon), three times: for the tokenizer's config, the
model's config and the weights; and it rebuilds gguf's tensor-name table once per module while
mapping names (~5 s more). Converting the bundled SmolLM2-135M Q4_1 file took 29 s that way.

Here the model comes from the header camelid's own reader (`export.header`) read once to
check the file: its metadata becomes the config through transformers' own key table
(`GGUF_TO_TRANSFORMERS_MAPPING`, as its legacy loader applies it), each tensor is dequantised
with gguf's `quants.dequantize` (what that loader calls), llama.cpp's q/k row permutation is
undone the way its `LlamaTensorProcessor` does it, and the weights are saved through a
transformers model built on the meta device, so the folder is the one `save_pretrained` writes.
The tokenizer is transformers' own (`AutoTokenizer` with `gguf_file`, which picks the class; one
more metadata parse). The first use of the bundled model (a process that converts it) takes 12 s
instead of 30 on that Xeon, and the folder equals transformers' (tests compare the configs, every
tensor bit for bit, and the tokenizer files). Anything this does not cover (not plain llama, a
tensor it does not know, rope scaling) raises `Unsupported` and the caller uses transformers' path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

from camelid.export.header import ArrayInfo, GgufHeader, tensor_data

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


class Unsupported(Exception):
    """The file needs transformers' general GGUF path."""


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; Unsupported for others."""
    base, dot, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise Unsupported(gguf_name)
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}{dot}{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}{dot}{kind}"
    raise Unsupported(gguf_name)


def config_dict(metadata: dict, tensor_names: Collection[str]) -> dict:
    """transformers' config keys for a plain llama file: its legacy loader's renames, applied to
    the metadata (`GgufHeader.kv`) the same way (unlisted keys left out, tying read from the
    tensors)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_TO_TRANSFORMERS_MAPPING,
        )
    except ImportError as e:  # another transformers version: its own loader then
        raise Unsupported(f"transformers has no GGUF key table here ({e})") from None

    name = metadata.get("general.name")
    if metadata.get("general.architecture") != "llama" or (isinstance(name, str) and "mistral" in name):
        raise Unsupported("not a plain llama file")  # transformers reads "mistral" names as mistral
    if any(k.startswith("llama.rope.scaling") for k in metadata):
        raise Unsupported("rope scaling")
    config: dict = {"tie_word_embeddings": "output.weight" not in tensor_names}
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        new = renames.get(prefix, {}).get(rest)
        if new is not None and new != -1:
            if isinstance(value, ArrayInfo):
                raise Unsupported(f"{key} is an array")
            config[new] = value
    if "vocab_size" not in config:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, ArrayInfo):
            raise Unsupported("no vocabulary size")
        config["vocab_size"] = tokens.length
    return config


def reverse_permute(w, n_head: int):
    """llama.cpp's converter interleaves each head's rows for its rotary layout; undo it (as
    transformers' LlamaTensorProcessor does) for q (n_head heads) or k (its kv heads)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def convert(gguf: Path, header: GgufHeader, out: Path) -> None:
    """Write `gguf` (a llama file, `header` its `read_header`) into the folder `out` as
    transformers would save it."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(**config_dict(header.kv, header.tensors))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = {}
    for name in header.tensors:
        target = hf_name(name)
        w = tensor_data(gguf, header, name)  # float32, dequantised by gguf.quants
        if ".attn_q." in name:
            w = reverse_permute(w, heads)
        elif ".attn_k." in name:
            w = reverse_permute(w, kv_heads)
        state[target] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))  # contiguous, writable: a copy of a mapped F32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if set(state) != expected:
        raise Unsupported(f"tensors differ from the model's: {sorted(set(state) ^ expected)[:4]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.config.dtype = torch.float32
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # its class is transformers' choice
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
