"""A LLaMA-2-style model made locally, for tests and benchmarks that must see what LLaMA-1/2 and
Vicuna users run: a SentencePiece BPE tokenizer with byte fallback (`<unk>` 0, `<s>` 1, `</s>` 2,
`<0x00>`..`<0xFF>` next, no pad token, BOS prepended, no EOS appended) and random
`LlamaForCausalLM` weights in LLaMA-2's config shape (untied LM head, rope theta 10000, RMSNorm
eps 1e-5, no pad token id), at any width.

    from llama2_fixture import write_tokenizer, write_model
    tok_dir = write_tokenizer(tmp / "tok")                      # ~1 s
    model_dir = write_model(tmp / "model", tok_dir, hidden=64)   # tiny; hidden=4096 ... for a 7B's widths

The tokenizer is trained here with the `sentencepiece` package on the bundled sample dump's text,
with LLaMA's trainer settings (bpe, byte_fallback, split_digits, identity normalisation, a dummy
prefix, whitespace-only pieces, no extra-whitespace removal), one line per sentence as LLaMA's was,
so a newline is never a piece and goes through byte fallback (`<0x0A>`) as in LLaMA.
The folder holds what a LLaMA-2 / Vicuna v1.5 hub folder holds: `tokenizer.model`, a
`tokenizer.json` in the hub's layout (Prepend/Replace normaliser, ByteFallback decoder) and a
`tokenizer_config.json` (LlamaTokenizer, add_bos_token, legacy false, pad_token null).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE_POSTS = REPO / "camelid" / "data" / "sample" / "Posts.xml"
SPECIALS = ("<unk>", "<s>", "</s>")
DEFAULT_VOCAB = 1000
LLAMA2_CONTEXT = 4096
LLAMA2_RMS_EPS = 1e-5
LLAMA2_ROPE_THETA = 10000.0
# LLaMA's trainer settings (its tokenizer.model's trainer_spec), vocabulary size aside.
SPM_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995, max_sentence_length=4192,
)


def corpus_lines(posts: Path = SAMPLE_POSTS) -> list[str]:
    """Titles and Markdown bodies of a Posts.xml, one non-empty line each."""
    from camelid.data.dump import iter_rows
    from camelid.data.markdown import html_to_markdown

    lines: list[str] = []
    for rows in iter_rows(posts, "posts"):
        for row in rows:
            for text in (row.get("Title") or "", html_to_markdown(row.get("Body") or "")):
                lines.extend(line for line in text.splitlines() if line.strip())
    return lines


def train_sentencepiece(vocab_size: int = DEFAULT_VOCAB, posts: Path = SAMPLE_POSTS) -> bytes:
    """A serialised SentencePiece model trained with LLaMA's settings (seeded, one thread)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines(posts)), model_writer=out, vocab_size=vocab_size,
                                   num_threads=1, minloglevel=2, **SPM_SETTINGS)
    return out.getvalue()


def hub_tokenizer_json(model: bytes) -> str:
    """The `tokenizer.json` a LLaMA-2 hub folder ships for this SentencePiece model: BPE with
    byte fallback over the pieces (merges in piece order, as transformers derives them), the
    Prepend("▁") + Replace(" ", "▁") normaliser, BOS prepended by the post-processor."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok.to_str()


def tokenizer_config() -> dict:
    """LLaMA-2's / Vicuna v1.5's tokenizer_config.json (no pad token)."""
    return {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": LLAMA2_CONTEXT, "padding_side": "right",
        "sp_model_kwargs": {},
    }


def write_tokenizer(out: Path, vocab_size: int = DEFAULT_VOCAB) -> Path:
    """A LLaMA-2-style tokenizer folder at `out` (created); returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(vocab_size)
    (out / "tokenizer.model").write_bytes(model)
    (out / "tokenizer.json").write_text(hub_tokenizer_json(model), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


def llama2_config(vocab_size: int, hidden: int = 64, intermediate: int | None = None, layers: int = 2,
                  heads: int = 4, kv_heads: int | None = None) -> "LlamaConfig":
    """LLaMA-2's config at the given widths (7B: 4096, 11008, 32 layers, 32 heads, vocab 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 11008 // 4096,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=LLAMA2_CONTEXT, rms_norm_eps=LLAMA2_RMS_EPS, rope_theta=LLAMA2_ROPE_THETA,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )


def write_model(out: Path, tokenizer_dir: Path, *, vocab_size: int | None = None, seed: int = 0, dtype: str = "float32",
                **widths) -> Path:
    """Random LlamaForCausalLM weights (seeded) + the tokenizer files, saved at `out`.

    `vocab_size` defaults to the tokenizer's; a larger one (32000 for LLaMA's shape) leaves the
    ids past the tokenizer unused, as llama.cpp's converter pads them. `widths`: see llama2_config."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    tokenizer_dir = Path(tokenizer_dir)
    n_tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    cfg = llama2_config(vocab_size or len(n_tok), **widths)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = None
    model.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out
