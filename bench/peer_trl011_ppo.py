"""The peer of bench/ppo.py: TRL 0.11.4's PPOTrainer on StackLLaMA's settings, timed per phase.

Runs in its own virtual environment (TRL 0.11.4 needs transformers 4.x; camelid needs 5.x), made
by `make bench-peer`; bench/ppo.py starts it as a subprocess on the same model, reward model and
questions, so both figures come from the same machine in the same run. Imports nothing of camelid.

The step is StackLLaMA's rl_training.py loop body: `ppo_trainer.generate` (batches of 4, a
LengthSampler, top-k 0 / top-p 1, eos_token_id 100_000 = never stop), a text-classification
pipeline on query + response (batch 16, raw logits), `ppo_trainer.step`. Policy and reward
model in `--dtype` (float32 or bfloat16: bench/ppo.py passes the dtype camelid's side runs in;
StackLLaMA loads the base in 8 bits on a GPU, whose bitsandbytes CPU path is a different, slower
kernel).

    python bench/peer_trl011_ppo.py --model DIR --reward-model DIR --questions FILE.json --steps 3 [--dtype bfloat16]

Prints one JSON line: per-step seconds of each phase and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def legacy_copy(src: Path, dst: Path) -> Path:
    """The model folder with configs transformers 4.x reads right: rope_theta at the top level
    (transformers 5 nests it in rope_parameters) and the fast tokenizer class named as 4.x names
    it. The weights and tokenizer.json are linked, not copied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            (dst / f.name).symlink_to(f.resolve())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["model_input_names"] = ["input_ids", "attention_mask"]
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def vm_hwm_kb() -> int:
    """Peak RSS of this program (kB): VmHWM, not ru_maxrss, which keeps the parent's peak across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--reward-model", required=True)
    ap.add_argument("--questions", required=True, help="JSON list of question strings")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the policy's and reward model's weights")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, pipeline
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from trl.core import LengthSampler

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="peer-trl011-"))
    try:
        model_dir = legacy_copy(Path(args.model), tmp / "policy")
        rm_dir = legacy_copy(Path(args.reward_model), tmp / "rm")
        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        config = PPOConfig(model_name=str(model_dir), learning_rate=1.4e-5, batch_size=8, mini_batch_size=2,
                           gradient_accumulation_steps=1, ppo_epochs=4, early_stopping=False, target_kl=0.1,
                           init_kl_coef=0.2, adap_kl_ctrl=True, seed=0)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir), peft_config=lora, torch_dtype=getattr(torch, args.dtype))
        optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=config.learning_rate)
        trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok, optimizer=optimizer)
        scorer = pipeline("text-classification", model=str(rm_dir), tokenizer=str(rm_dir), device="cpu",
                          torch_dtype=getattr(torch, args.dtype))
        gen = {"top_k": 0.0, "top_p": 1.0, "do_sample": True, "pad_token_id": tok.pad_token_id, "eos_token_id": 100_000}
        lengths = LengthSampler(args.new_tokens, args.new_tokens + 1)
        texts = json.loads(Path(args.questions).read_text())
        prompts = [f"Question: {q}\n\nAnswer: " for q in texts]
        rows = []
        for step in range(args.steps):
            batch = prompts[step * 8 : (step + 1) * 8]
            queries = [tok(p, return_tensors="pt").input_ids[0] for p in batch]
            t0 = time.perf_counter()
            responses = trainer.generate(queries, return_prompt=False, length_sampler=lengths, **gen)
            t1 = time.perf_counter()
            full = [q + tok.decode(r, skip_special_tokens=True) for q, r in zip(batch, responses)]
            out = scorer(full, top_k=None, function_to_apply="none", batch_size=16, truncation=True)
            rewards = [torch.tensor(o[0]["score"]) for o in out]
            t2 = time.perf_counter()
            trainer.step(queries, responses, rewards)
            t3 = time.perf_counter()
            rows.append({"rollout": t1 - t0, "score": t2 - t1, "optimize": t3 - t2})
            print(f"peer step {step + 1}/{args.steps}: {t3 - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak_gb = vm_hwm_kb() / 2**20
    print(json.dumps({"steps": rows, "peak_gb": peak_gb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
