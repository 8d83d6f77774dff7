"""Forward passes over many continuations of few prompts, each prompt run once.

Evaluation scores 4+ answers to every held-out question, from each model: the reward models read
`Question: <q>\\n\\nAnswer: <a>` whole, and the KL of a tuned model reads its answers under the
reference model. Running each question once into a KV cache, copying the cache to its answers
and running only the answers does about half the work of the full passes on the sample (prompts
~40 tokens, answers up to 32), and takes about 0.6 of `train.reward.score_ids`' time there.
Causal attention makes
the result the same as the full pass: a continuation token attends to the same prompt keys and
values. Not for a reward model's pairs: there the answers (up to 256 tokens) are most of each
text, and `score_ids`' lean CPU pass over length-sorted rows is faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def continuation_hidden(model: Any, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        pad_id: int, batch_size: int, desc: str | None = None) -> list[Any]:
    """For item i, the decoder's final hidden states (len(continuations[i]) + 1, H) at the
    prefix's last position and at each continuation token: row t predicts continuation token t,
    the last row reads the whole text.

    `model`: a transformers causal LM or sequence classifier (or a peft wrapper of one). Items
    run in batches of `batch_size`, those with the same prefix together, each distinct prefix
    once per batch. Every continuation must be non-empty. With `desc`, a progress bar of batches."""
    from camelid.engine.engine import cache_kwarg
    from camelid.models.lora import unwrap

    inner = unwrap(model)
    body = getattr(inner, inner.base_model_prefix)
    cache_kw = cache_kwarg(body)
    device = next(inner.parameters()).device
    out: list[Any] = [None] * len(prefixes)
    seen: dict[tuple[int, ...], int] = {}
    order = sorted(range(len(prefixes)), key=lambda i: (seen.setdefault(tuple(prefixes[i]), i), i))
    was_training = model.training
    model.eval()
    try:
        _run(body, cache_kw, device, prefixes, continuations, order, pad_id, batch_size, out, desc)
    finally:
        model.train(was_training)
    return out


def _run(body: Any, cache_kw: str, device: Any, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
         order: list[int], pad_id: int, batch_size: int, out: list[Any], desc: str | None) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from camelid.engine.engine import distinct_left_padded, select_cache_rows
    from camelid.logs import bars_off

    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None or bars_off(),
                          dynamic_ncols=True):
            rows = order[start : start + batch_size]
            ids, mask, inverse = distinct_left_padded([list(prefixes[i]) for i in rows], pad_id, device)
            cache = DynamicCache()
            h_prefix = body(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]
            idx = torch.tensor(inverse, device=device)
            select_cache_rows(cache, idx)
            conts = [list(continuations[i]) for i in rows]
            c = max(len(x) for x in conts)
            cids = torch.full((len(conts), c), pad_id, dtype=torch.long)
            cmask = torch.zeros((len(conts), c), dtype=torch.long)
            for j, x in enumerate(conts):  # right-padded after the prefix
                cids[j, : len(x)] = torch.tensor(x)
                cmask[j, : len(x)] = 1
            cids, cmask = cids.to(device), cmask.to(device)
            pos = mask.sum(1)[idx][:, None] + torch.arange(c, device=device)[None]
            hidden = body(input_ids=cids, attention_mask=torch.cat([mask[idx], cmask], 1), position_ids=pos,
                          use_cache=True, **{cache_kw: cache}).last_hidden_state
            for j, (i, x) in enumerate(zip(rows, conts)):
                out[i] = torch.cat([h_prefix[inverse[j]][None], hidden[j, : len(x)]])
            del cache


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The length of the longest token prefix all of `seqs` share, leaving each at least one token."""
    from camelid.utils import shared_start

    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = min(n, shared_start(seqs[0], s))
    return max(n, 0)


def score_texts_shared(rm: Any, tok: Any, groups: Sequence[Sequence[str]], batch_size: int, desc: str | None = None) -> list[list[float]]:
    """A reward model's score of every text, texts grouped by the prompt they answer: each group's
    common token prefix runs once (EOS appended as in training, as `train.reward.score_texts`)."""
    return score_ids_shared(rm, [[x + [tok.eos_token_id] for x in tok(list(g))["input_ids"]] for g in groups], batch_size, desc)


def score_ids_shared(rm: Any, groups: Sequence[Sequence[Sequence[int]]], batch_size: int, desc: str | None = None) -> list[list[float]]:
    """A reward model's score of token lists, grouped so that each group's common prefix runs once.
    The score is read where transformers' sequence classifier reads it: at the rightmost token
    that is not the padding id (where EOS is the padding id, the token before it)."""
    import torch

    from camelid.models.lora import unwrap

    pad = unwrap(rm).config.pad_token_id
    prefixes, conts, where, pooled = [], [], [], []
    for gi, g in enumerate(groups):
        k = common_prefix(g)
        for ti, x in enumerate(g):
            prefixes.append(x[:k])
            conts.append(x[k:])
            where.append((gi, ti))
            last = max((p for p, t in enumerate(x) if t != pad), default=len(x) - 1)
            pooled.append(max(last - (k - 1), 0))  # row 0 is position k - 1
    hidden = continuation_hidden(rm, prefixes, conts, pad if pad is not None else 0, batch_size, desc)
    head = unwrap(rm).score
    out = [[0.0] * len(g) for g in groups]
    with torch.no_grad():
        last = torch.stack([h[row] for h, row in zip(hidden, pooled)])
        scores = head(last.to(next(head.parameters()).dtype))[:, 0].float().tolist()
    for (gi, ti), s in zip(where, scores):
        out[gi][ti] = s
    return out


def logprobs_shared(lm: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int, batch_size: int, desc: str | None = None) -> list[float]:
    """Σ_t log π(r_t | prompt, r_<t) per (prompt, response), teacher-forced at temperature 1."""
    import torch

    from camelid.train.ppo_batch import head_logprobs

    hidden = continuation_hidden(lm, prompts, responses, pad_id, batch_size, desc)
    sums = []
    with torch.no_grad():
        for h, r in zip(hidden, responses):
            lp, _ = head_logprobs(lm, h[:-1][None], torch.tensor([list(r)], device=h.device))
            sums.append(float(lp.sum()))
    return sums
