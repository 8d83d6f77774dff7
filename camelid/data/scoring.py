"""Answer scores, preference pairs and the seeded per-question randomness, as small pure functions.

The score follows StackLLaMA (https://huggingface.co/blog/stackllama, "Stack Exchange dataset"),
which took it from Askell et al. 2021, "A General Language Assistant as a Laboratory for
Alignment", sec. 4.1 (https://arxiv.org/abs/2112.00861):

    score = round(log2(1 + upvotes)) + (1 if the answer is accepted else 0)
    score = -1                       if the answer's vote score is negative

Which `upvotes`: a dump's Posts.xml carries only `Score` = upvotes - downvotes. The true upvote
count exists only in Votes.xml (VoteTypeId 2). When the dump has Votes.xml we count those up-votes,
which is what the formula names; without it we use `max(Score, 0)` as the estimate, which is what
the StackLLaMA data (HuggingFaceH4/stack-exchange-preferences) did, since it was built from Posts.xml.
"Vote score negative" is always the net `Score` (a post can have many up-votes and still be
net-negative, and that is the case the -1 is for). A negative answer gets -1 even when accepted.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from typing import Sequence


def answer_score(upvotes: int, accepted: bool, vote_score: int) -> int:
    """StackLLaMA / Askell et al. answer score; see the module docstring for which numbers to pass."""
    if vote_score < 0:
        return -1
    # floor(x + 0.5): log2(1 + n) is never exactly k + 0.5 for integer n, so this equals round().
    return int(math.floor(math.log2(1 + max(upvotes, 0)) + 0.5)) + (1 if accepted else 0)


def stable_u64(seed: int, key: str | int) -> int:
    """A 63-bit integer from (seed, key), identical on every machine and Python version.

    Python's hash() is salted per process, so it cannot make reruns identical; blake2b can.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_pairs(scores: Sequence[int], cap: int, seed: int, qid: int | str) -> list[tuple[int, int]]:
    """Index pairs (better, worse) of answers with different scores, at most `cap` of them.

    Every unordered pair with different scores counts once, the better answer first; ties are
    dropped (they carry no preference). Over the cap, `cap` pairs are drawn without replacement
    by a generator seeded from (seed, qid), so the choice for one question does not depend on
    which other questions the dump holds or in what order they come. The result is sorted.
    """
    pairs = [
        (i, j) if scores[i] > scores[j] else (j, i)
        for i, j in itertools.combinations(range(len(scores)), 2)
        if scores[i] != scores[j]
    ]
    if cap >= 0 and len(pairs) > cap:
        pairs = random.Random(stable_u64(seed, qid)).sample(pairs, cap)
    return sorted(pairs)


def split_bounds(n: int, fractions: Sequence[float]) -> list[int]:
    """Cumulative row counts that cut `n` questions into splits of the given fractions.

    Uses largest remainders so the counts always add up to n and a 10% split of 200 is exactly 20.
    """
    total = sum(fractions)
    raw = [n * f / total for f in fractions]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return list(itertools.accumulate(counts))
