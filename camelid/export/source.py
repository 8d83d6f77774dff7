"""Where the exported weights come from: a Hugging Face llama folder or a LoRA adapter folder.

Both become a `Source`: the model config, the folder that holds the tokenizer, and tensors that
are read one at a time (a 7B export never holds more than one tensor in float32 beside the
file being written). An adapter is merged into its base with peft first, in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from camelid.errors import CamelidError

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class Source:
    config: dict[str, Any]
    tokenizer_dir: Path
    hint_dirs: tuple[Path, ...]  # folders that may record the GGUF the model came from
    tensors: dict[str, LazyTensor]  # HF name -> its shape and a loader
    name: str


@dataclass
class LazyTensor:
    """A weight's shape, known without reading it, and a loader of its float32 numpy data."""

    shape: tuple[int, ...]
    load: Callable[[], Any]


def check_llama_config(config: dict[str, Any], where: Path) -> None:
    arch = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") != "llama" or arch not in LLAMA_ARCHITECTURES:
        raise CamelidError(
            f"{where} holds a {config.get('model_type')!r} model ({arch}); camelid exports llama-architecture "
            "models (model_type 'llama', LlamaForCausalLM) only"
        )


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CamelidError(f"cannot read {model_dir}/config.json: {e}") from None


def _safetensors_loaders(model_dir: Path) -> dict[str, LazyTensor]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CamelidError(f"{model_dir} has no *.safetensors weights; re-save the model with save_pretrained(safe_serialization=True)")
    loaders: dict[str, LazyTensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                loaders[key] = LazyTensor(tuple(f.get_slice(key).get_shape()), _loader(path, key))
    return loaders


def _loader(path: Path, key: str) -> Callable[[], Any]:
    def load() -> Any:
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32).numpy()

    return load


def _hf_source(model_dir: Path) -> Source:
    config = _read_config(model_dir)
    check_llama_config(config, model_dir)
    return Source(config, model_dir, (model_dir,), _safetensors_loaders(model_dir), model_dir.name)


def _adapter_source(adapter_dir: Path) -> Source:
    """Merge a LoRA adapter into its base model (in memory) and read the merged weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from camelid.models.resolve import resolve_model

    try:
        base_name = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CamelidError(f"{adapter_dir}/adapter_config.json is unreadable or names no base model ({e})") from None
    base_dir = resolve_model(base_name)
    check_llama_config(_read_config(base_dir), base_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    state = {k: v.detach() for k, v in merged.state_dict().items()}
    tok_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_dir
    loaders = {k: LazyTensor(tuple(t.shape), lambda t=t: t.to(torch.float32).numpy()) for k, t in state.items()}
    return Source(merged.config.to_dict(), tok_dir, (tok_dir, base_dir), loaders, adapter_dir.name)


def open_source(model: str) -> Source:
    """A model name/path (anything `resolve_model` takes) -> its weights, config and tokenizer."""
    from camelid.models.resolve import is_adapter_dir, resolve_model

    path = resolve_model(model)
    if is_adapter_dir(path):
        return _adapter_source(path)
    return _hf_source(path)
