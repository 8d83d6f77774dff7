"""Small dataset folders in camelid's layout (camelid.data.output) for the SFT and reward tests,
and the helpers the training tests share: a camelid subprocess under torchrun, adapters compared.

Toy preference a tiny model can learn: the chosen answer (response_j) contains a marker word,
the rejected one does not; answer lengths are random on both sides, so "longer wins" is a
coin flip here and the reward model must learn the marker.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from camelid.data.output import ANSWERS_SCHEMA, PAIR_SCHEMA, SPLITS, split_path

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 2
SUBPROCESS_TIMEOUT_S = 600

MARKER = "excellent"
WORDS = ("the apple tree grows fast in spring while birds sing near old stone walls and rivers "
         "bend under bridges where children play with red kites on windy days").split()


def _answer(rng: random.Random, marker: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    if marker:
        words.insert(rng.randint(0, len(words)), MARKER)
    return " ".join(words)


def write_dataset(root: Path, n_pairs: int = 40, seed: int = 0, splits: tuple[str, ...] = SPLITS,
                  drop_columns: tuple[str, ...] = ()) -> Path:
    """A dataset folder with `n_pairs` pairs per split (+ the answers table); returns `root`."""
    rng = random.Random(seed)
    answers = []
    for s_i, split in enumerate(splits):
        rows = []
        for i in range(n_pairs):
            qid = s_i * 10_000 + i
            q = f"How do I look after tree number {qid}?"
            j, k = _answer(rng, True), _answer(rng, False)
            meta = {"tags": ["trees"], "site": "toy", "question_url": "", "answer_j_url": "", "answer_k_url": "",
                    "answer_j_id": 2 * qid, "answer_k_id": 2 * qid + 1}
            rows.append({"qid": qid, "question": q, "date": "2024-01-01", "metadata": meta,
                         "response_j": j, "response_k": k, "score_j": 3, "score_k": 0})
            for aid, text, score in ((2 * qid, j, 3), (2 * qid + 1, k, 0)):
                answers.append({"qid": qid, "aid": aid, "split": split, "question": q, "response": text, "score": score,
                                "vote_score": score, "upvotes": score, "accepted": score > 0, "date": "2024-01-01"})
        table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA).drop_columns(list(drop_columns))
        path = split_path(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    path = split_path(root, "answers")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(answers, schema=ANSWERS_SCHEMA), path)
    return root


def child_env() -> dict[str, str]:
    """A camelid subprocess's environment: this checkout's package, no tokenizer threads, no hub."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def torchrun_camelid(args: list[str], port: int) -> None:
    """`camelid ARGS` in PROCESSES processes under torchrun (gloo on CPU), its rendezvous on `port`
    (offset by this process id, so parallel test runs do not meet); a failure shows its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
           "--master_port", str(port + os.getpid() % 1000), "-m", "camelid", *args]
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def adapter_weights(adapter_dir: str | Path) -> dict:
    """The LoRA weights saved in an adapter folder."""
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def assert_same_adapter(a_dir: str | Path, b_dir: str | Path, rtol: float = 1e-3) -> None:
    """Two adapter folders hold the same weights (to float32 reduction-order noise)."""
    import torch

    a, b = adapter_weights(a_dir), adapter_weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=rtol)
