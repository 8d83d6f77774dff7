"""OpenAI's sampling fields through the official `openai` client against a live server:
presence_penalty and frequency_penalty move the answer's repetition the way they should (the
bundled model, several seeds), logit_bias -100 bans a token and +100 forces it (the tiny model,
checked token by token against an engine in the test process)."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import CHAT, MODEL, live_server, openai_client, tiny_server

from camelid.engine import Engine, SamplingParams
from camelid.engine.sampling import apply_presence_frequency, sample_next, token_counts
from camelid.errors import CamelidError

openai = pytest.importorskip("openai")
SEEDS = 4
PENALTY_TOKENS = 64


running = tiny_server(max_batch_size=8, max_queue=32)


@pytest.fixture(scope="module")
def tiny(running):
    """(client, the served model)."""
    return openai_client(running.url), running.model


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same weights in the test process: token ids the HTTP answer only shows as text."""
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")


def test_penalties_follow_openai_definition():
    logits = torch.zeros((2, 5))
    counts = token_counts([[1, 1, 3], []], 5, "cpu")
    assert counts[0].tolist() == [0, 2, 0, 1, 0] and counts[1].sum() == 0
    out = apply_presence_frequency(logits, counts, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]))
    # logits[j] -= c[j] * frequency + (c[j] > 0) * presence
    assert out[0].tolist() == [0.0, -2.5, 0.0, -1.5, 0.0] and out[1].tolist() == [0.0] * 5


def test_logit_bias_and_penalties_are_per_row():
    logits = torch.zeros((3, 6))
    logits[:, 2] = 5.0
    params = [SamplingParams(temperature=0, logit_bias={4: 100.0}), SamplingParams(temperature=0),
              SamplingParams(temperature=0, frequency_penalty=2.0)]
    s = sample_next(logits, params, [None] * 3, None, outputs=[[], [], [2, 2, 2]])
    assert s.tokens.tolist() == [4, 2, 0]  # forced; untouched; token 2 pushed below the rest (5 - 6 < 0)
    banned = sample_next(logits[:1], [SamplingParams(temperature=1.0, logit_bias={2: -100.0})], [torch.Generator().manual_seed(0)], None)
    assert banned.tokens.item() != 2 and banned.logprobs.item() > -1e9


@pytest.mark.parametrize("kw, msg", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
])
def test_engine_refuses_values_out_of_range(kw, msg):
    with pytest.raises(CamelidError, match=msg):
        SamplingParams(**kw)


def test_logit_bias_minus_100_bans_a_token(tiny, local):
    client, served = tiny
    ids, _ = served.chat_prompt(CHAT)
    greedy = local.generate([ids], SamplingParams(temperature=0, max_new_tokens=8))[0]
    banned = {str(t): -100 for t in set(greedy.token_ids)}
    want = local.generate([ids], SamplingParams(temperature=0, max_new_tokens=8, logit_bias={int(t): -100 for t in banned}))[0]
    assert not set(want.token_ids) & set(greedy.token_ids)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8, logit_bias=banned)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    assert plain.choices[0].message.content == greedy.text
    assert r.choices[0].message.content == want.text != greedy.text


def test_logit_bias_plus_100_forces_a_token(tiny):
    client, served = tiny
    token = served.engine.tokenizer.encode(" llama", add_special_tokens=False)[0]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=1.0, seed=7, max_tokens=6,
                                      logit_bias={str(token): 100}, stream=stream)
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == served.engine.tokenizer.decode([token] * 6)


def test_logit_bias_past_the_vocabulary_is_400(tiny):
    client, served = tiny
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                       logit_bias={str(len(served.engine.tokenizer)): 1})


def repeated_share(texts_tokens: list[list[str]]) -> float:
    """Share of answer tokens that repeat an earlier token of the same answer."""
    repeats = sum(len(toks) - len(set(toks)) for toks in texts_tokens)
    return repeats / sum(len(toks) for toks in texts_tokens)


def answers(client, **kw) -> list[list[str]]:
    r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "List some animals."}],
                                       temperature=1.0, seed=11, n=SEEDS, max_tokens=PENALTY_TOKENS, logprobs=True,
                                       **kw)
    return [[t.token for t in c.logprobs.content] for c in r.choices]


@pytest.mark.slow
def test_penalties_lower_repetition_on_the_bundled_model(bundled_dir):
    with live_server(bundled_dir, name="smollm2-135m", max_batch_size=SEEDS) as (base, _):
        client = openai_client(base, timeout=300)
        free = repeated_share(answers(client))
        frequency = repeated_share(answers(client, frequency_penalty=2.0))
        presence = repeated_share(answers(client, presence_penalty=2.0))
        encouraged = repeated_share(answers(client, frequency_penalty=-2.0))
    assert frequency < free and presence < free, (free, frequency, presence)
    assert encouraged > free, (free, encouraged)
