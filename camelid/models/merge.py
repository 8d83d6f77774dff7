"""`camelid merge ADAPTER --out DIR`: fold a LoRA adapter into its base, save a plain HF model.

W' = W + (alpha / r) * B @ A for every adapted layer (peft's `merge_and_unload`), so the merged
model computes what base + adapter computed, with no peft needed to load it. The base is loaded
afresh in its own saved dtype (never 8-bit: merging into int8 weights would lose precision),
so an adapter trained on an 8-bit base merges into the full-precision weights. A reward-model
adapter (peft task SEQ_CLS) merges into a one-output sequence classifier, its trained `score`
head included.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise CamelidError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CamelidError(f"{path} is not valid JSON ({e})") from None
    if not cfg.get("base_model_name_or_path"):
        raise CamelidError(f"{path} does not name its base model (base_model_name_or_path)")
    return cfg


def load_merged(adapter_dir: str | os.PathLike, dtype: str = "auto") -> tuple[Any, Any]:
    """(merged model, tokenizer) in memory; `dtype` "auto" keeps the base's saved dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from camelid.models.train_load import load_tokenizer, resolve_trained

    adapter_dir = Path(adapter_dir)
    acfg = read_adapter_config(adapter_dir)
    base_path = resolve_trained(acfg["base_model_name_or_path"])
    seq_cls = acfg.get("task_type") == "SEQ_CLS"
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if seq_cls:
        kwargs["num_labels"] = 1
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the classifier's fresh `score` is replaced by the adapter's
    try:
        base = cls.from_pretrained(str(base_path), **kwargs)
        with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise CamelidError(f"cannot apply adapter {adapter_dir} to {base_path}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    has_tok = any((adapter_dir / f).is_file() for f in TOKENIZER_FILES)
    tok = load_tokenizer(adapter_dir if has_tok else base_path)
    # Recorded with the weights (a tokenizer without one got it from load_tokenizer); sequence
    # classifiers also find each row's last token through it.
    merged.config.pad_token_id = tok.pad_token_id
    return merged, tok


def merge_adapter(adapter_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto",
                  overwrite: bool = False) -> Path:
    """Merge and save to `out` (written to a temporary folder, renamed when complete). An existing
    `out` is replaced only when camelid wrote it or `overwrite` is set."""
    from camelid.utils import atomic_dir, check_replaceable, ensure_writable_dir

    ensure_writable_dir(Path(out).parent)
    check_replaceable(out, overwrite)
    merged, tok = load_merged(adapter_dir, dtype)
    with atomic_dir(out, overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out)


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="merge a LoRA adapter into its base model",
                       description="Merge a LoRA adapter (from camelid sft / reward / ppo) into its base; "
                                   "the output is a plain Hugging Face model folder with the tokenizer.")
    p.add_argument("adapter", help="adapter folder (with adapter_config.json), e.g. runs/sft/adapter")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when camelid did not write it (a folder camelid wrote is always replaced)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default: the base model's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.utils import print0

    out = merge_adapter(args.adapter, args.out, args.dtype, args.overwrite)
    print0(f"merged model written to {out}")
    return 0
