"""Flags shared by every command that loads a model or generates text."""

from __future__ import annotations

import argparse

from camelid.errors import CamelidError, UsageError


def add_model_args(p: argparse.ArgumentParser, backend: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", default="smollm2-135m",
                   help="bundled name (smollm2-135m), model folder, adapter folder, .gguf file or hub id (default: smollm2-135m)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CPU and recent GPUs, float16 on older GPUs and MPS")
    g.add_argument("--load-8bit", action="store_true", help="int8 weights (about half the memory of bfloat16)")
    g.add_argument("--conv-template", default=None, help="model (the model's own), vicuna_v1.1, stackllama or chatml (default: auto)")
    g.add_argument("--system", default=None, help="system message (replaces the template's default)")
    if backend:
        from camelid.engine.select import BACKENDS, DEFAULT_QUANT
        from camelid.export.writer import QUANTS

        g.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="auto (default: llama.cpp where it can run the model, else torch; a status line says "
                            "which and why), torch, or llama.cpp (a .gguf, or the model exported to GGUF once into "
                            "$CAMELID_HOME/gguf)")
        g.add_argument("--quant", default=DEFAULT_QUANT, choices=QUANTS,
                       help=f"GGUF weight type the model is exported to for llama.cpp (default: {DEFAULT_QUANT}, the "
                            "fastest; q8_0 keeps the model's quality at about half the speed; a .gguf runs as it is)")
        g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.7, max_new_tokens: int = 512) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off (default: 1.0)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default: {max_new_tokens})")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace, extra_stop: tuple[str, ...] = ()):
    from camelid.engine import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        seed=args.seed, stop=tuple(args.stop) + tuple(extra_stop),
    )


def check_sampling_args(args: argparse.Namespace) -> None:
    """Validate sampling flags before the (slow) model load: a bad value is a UsageError."""
    try:
        sampling_from_args(args)
    except CamelidError as e:
        raise UsageError(str(e)) from None


def load_engine(args: argparse.Namespace):
    """The engine the flags ask for (`--backend`, auto by default), plus its conversation template."""
    import torch

    from camelid.engine.select import load_backend
    from camelid.templates import pick_template
    from camelid.utils import status

    if args.threads:
        torch.set_num_threads(args.threads)
    engine, line = load_backend(args.model, args.backend, device=args.device, dtype=args.dtype, load_8bit=args.load_8bit,
                                quant=args.quant, threads=args.threads)
    template = pick_template(args.conv_template, engine.tokenizer, getattr(engine, "path", None))
    status(line)
    return engine, template
