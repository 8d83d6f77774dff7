"""The generation engine on a tiny random Llama: streaming, batching, seeds, stops, cancel."""

import math

import pytest
import torch

from camelid.engine import Engine, SamplingParams

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)

PROMPTS = ["Question: How do I boil an egg?\n\nAnswer: ", "Hi", "Tell me about the garden and the roses in spring"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")


def test_stream_equals_generate(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=12)
    whole = engine.generate(PROMPTS[:1], sp)[0]
    pieces = [d.text for step in engine.stream(PROMPTS[:1], sp) for d in step]
    assert "".join(pieces) == whole.text
    assert len(whole.token_ids) == 12 and whole.finish_reason == "length"


def test_batched_greedy_equals_single(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    batched = engine.generate(PROMPTS, sp)
    for prompt, got in zip(PROMPTS, batched):
        alone = engine.generate([prompt], sp)[0]
        assert got.token_ids == alone.token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=10, seed=7)
    a = engine.generate([PROMPTS[0]], sp)[0]
    b = engine.generate([PROMPTS[1], PROMPTS[0]], sp)[1]
    c = engine.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_new_tokens=10, seed=8))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("path", ["fast", "hf"])
def test_a_repeated_prompt_is_prefilled_once_and_answers_as_alone(engine, path, monkeypatch):
    """n answers to one prompt: the prefill forward sees each distinct prompt once, and every row
    (its own seed, its own length) answers exactly as when generated alone."""
    eng = engine if path == "fast" else Engine(engine.model, engine.tokenizer)
    if path == "hf":
        eng.fast = None
    batches = []
    real = eng.forward

    def counting(input_ids, *args, **kwargs):
        batches.append(input_ids.shape[0])
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(eng, "forward", counting)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=n, seed=s, logprobs=True)
              for s, n in ((1, 8), (2, 8), (3, 5), (4, 8))]
    together = eng.generate(prompts, params)
    assert batches[0] == 2  # PROMPTS[0] and PROMPTS[1], once each
    assert len({tuple(c.token_ids) for c in together}) == 4  # the seeds differ, so do the answers
    for prompt, sp, got in zip(prompts, params, together):
        alone = eng.generate([prompt], sp)[0]
        assert got.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=1e-4)


def test_per_request_lengths_and_logprobs(engine):
    params = [SamplingParams(temperature=0, max_new_tokens=n, logprobs=True) for n in (3, 7, 5)]
    outs = engine.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == [3, 7, 5]
    assert all(len(o.logprobs) == len(o.token_ids) and all(lp <= 0 for lp in o.logprobs) for o in outs)


def test_top_logprobs_are_the_distributions_top_tokens(engine):
    """top_logprobs=5 under temperature and top-k 3: the alternatives are the three tokens top-k
    kept, in order, renormalised; the two it removed read the -9999 floor; the sampled token is
    one of the three and carries the same log-probability."""
    sp = SamplingParams(temperature=0.7, top_k=3, max_new_tokens=6, seed=1, logprobs=True, top_logprobs=5)
    out = engine.generate([PROMPTS[0]], sp)[0]
    assert len(out.top_logprobs) == len(out.token_ids) == 6
    for tok, lp, alts in zip(out.token_ids, out.logprobs, out.top_logprobs):
        kept = [a for a in alts if a[1] > -9999.0]
        assert len(alts) == 5 and len(kept) == 3 and [a[1] for a in alts[3:]] == [-9999.0, -9999.0]
        assert sum(math.exp(a[1]) for a in kept) == pytest.approx(1.0, abs=1e-4)
        assert [a[1] for a in kept] == sorted((a[1] for a in kept), reverse=True)
        assert dict(kept)[tok] == pytest.approx(lp)
    plain = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.7, top_k=3, max_new_tokens=6, seed=1))[0]
    assert plain.token_ids == out.token_ids and plain.top_logprobs is None  # asking changes nothing sampled


def test_stop_string_cuts_text(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=20)
    full = engine.generate([PROMPTS[0]], sp)[0].text
    stop = full[5:8]
    assert stop and stop in full
    got = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=20, stop=(stop,)))[0]
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]


def test_stop_token_ids_and_eos(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    first = engine.generate([PROMPTS[0]], sp)[0].token_ids
    tok = first[2]
    got = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(tok,)))[0]
    assert got.finish_reason == "stop" and got.token_ids == first[: first.index(tok) + 1]


def test_continuous_batching_join_mid_flight(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    expected = [engine.generate([p], sp)[0].token_ids for p in PROMPTS[:2]]
    got = {0: [], 1: []}
    batch = engine.new_batch()
    with torch.inference_mode():
        for d in next(iter(batch.add([0], [PROMPTS[0]], [sp]))):
            got[d.index] += d.token_ids
        for _ in range(3):
            for d in batch.step():
                got[d.index] += d.token_ids
        for d in next(iter(batch.add([1], [PROMPTS[1]], [sp]))):
            got[d.index] += d.token_ids
        while batch.rows:
            for d in batch.step():
                got[d.index] += d.token_ids
    assert [got[0], got[1]] == expected


def test_cancel_frees_the_row(engine):
    cancelled: set[int] = set()
    reasons = {}
    for step in engine.stream(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=30), cancelled=cancelled):
        cancelled.add(1)
        for d in step:
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
    assert reasons == {0: "length", 1: "cancelled"}


def test_long_prompt_is_truncated_with_warning(engine, caplog):
    small = Engine(engine.model, engine.tokenizer, max_context=32)
    with caplog.at_level("WARNING", logger="camelid.engine"):
        out = small.generate(["word " * 100], SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert out.prompt_tokens == 24 and len(out.token_ids) == 8
    assert "truncated" in caplog.text


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_new_tokens=16))[0]
    pen = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_new_tokens=16, repetition_penalty=5.0))[0]
    assert len(set(pen.token_ids)) >= len(set(plain.token_ids))
    assert pen.token_ids != plain.token_ids


@pytest.mark.cpu_kit
def test_fast_path_matches_hf_forward(engine):
    """The lean Llama forward gives Hugging Face's logits on a padded batch, prefill and decode."""
    from transformers import DynamicCache

    assert engine.fast is not None
    tok = engine.tokenizer
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hf_cache, fast_cache = DynamicCache(), DynamicCache()
    with torch.inference_mode():
        hf = engine.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, **{engine.cache_kw: hf_cache}).logits
        fast = engine.fast(enc["input_ids"], mask, pos, fast_cache)
        real = mask.bool()
        torch.testing.assert_close(fast[real], hf[real], atol=1e-4, rtol=1e-4)
        nxt = hf[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        hf2 = engine.model(input_ids=nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1, **{engine.cache_kw: hf_cache}).logits
        fast2 = engine.fast(nxt, mask2, pos[:, -1:] + 1, fast_cache)
    torch.testing.assert_close(fast2, hf2, atol=1e-4, rtol=1e-4)


@pytest.mark.cpu_kit
def test_fast_path_runs_a_peft_policy(engine):
    """PPO's rollout: the lean forward on a LoRA-wrapped model gives peft's logits, with the
    adapter on and under `disable_adapter()` (the reference)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    torch.manual_seed(0)
    lm = get_peft_model(copy.deepcopy(engine.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter (peft starts B at zero)
    lm.eval()
    policy = Engine(lm, engine.tokenizer)
    assert policy.fast is not None
    ids = engine.tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]

    def both():
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        return policy.fast(ids, mask, pos, DynamicCache()), ref

    with torch.inference_mode():
        fast, ref = both()
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
        with lm.disable_adapter():
            fast_off, ref_off = both()
    torch.testing.assert_close(fast_off, ref_off, atol=1e-4, rtol=1e-4)
    assert (fast - fast_off).abs().max() > 1e-2  # the adapter did change the logits


@pytest.mark.cpu_kit
def test_fast_path_cache_appends_in_place_and_matches_hf(engine):
    """The fast path appends K/V into a growing buffer instead of concatenating every step; across
    rows joining, finishing at different lengths and padding being trimmed, sampled tokens and
    log-probs equal the Hugging Face path's (DynamicCache's own concatenation)."""
    hf = Engine(engine.model, engine.tokenizer)
    hf.fast = None
    lengths = (20, 5, 12)

    def run(eng):
        got = {i: [] for i in range(3)}
        lps = {i: [] for i in range(3)}
        batch = eng.new_batch()

        def take(deltas):
            for d in deltas:
                got[d.index] += d.token_ids
                lps[d.index] += d.logprobs

        with torch.inference_mode():
            sps = [SamplingParams(temperature=0.8, max_new_tokens=n, seed=i, logprobs=True) for i, n in enumerate(lengths)]
            take(next(iter(batch.add([0, 1], PROMPTS[:2], sps[:2]))))
            for _ in range(3):
                take(batch.step())
            take(next(iter(batch.add([2], PROMPTS[2:], sps[2:]))))
            buffers = []
            while batch.rows:
                take(batch.step())
                layer = batch.cache.layers[0] if batch.cache is not None else None
                if layer is not None and hasattr(layer, "_camelid_buffers"):
                    buffers.append(layer.keys.data_ptr() == layer._camelid_buffers[0].data_ptr())
        return got, lps, buffers

    fast_tokens, fast_lps, in_place = run(engine)
    hf_tokens, hf_lps, _ = run(hf)
    assert fast_tokens == hf_tokens
    assert [len(fast_tokens[i]) for i in range(3)] == list(lengths)
    for i in range(3):
        torch.testing.assert_close(torch.tensor(fast_lps[i]), torch.tensor(hf_lps[i]), atol=1e-4, rtol=1e-4)
    assert sum(in_place) > len(in_place) // 2  # most steps wrote into the buffer, not a new tensor


@pytest.mark.parametrize("path", ["fast", "hf"])
def test_return_hidden_gives_the_states_each_token_was_sampled_from(engine, path):
    """With return_hidden, row t of Completion.hidden is the LM head's input that token t was
    sampled from: the head on it gives the returned log-probability (temperature 1, no filter),
    and it equals a full forward's final hidden state at position prompt_len - 1 + t. Rows of
    different lengths in one batch, on the fast path and on Hugging Face's forward."""
    eng = engine if path == "fast" else Engine(engine.model, engine.tokenizer)
    if path == "hf":
        eng.fast = None
    params = [SamplingParams(temperature=1.0, max_new_tokens=n, seed=i, logprobs=True, return_hidden=True) for i, n in enumerate((6, 3))]
    outs = eng.generate(PROMPTS[:2], params)
    plain = eng.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_new_tokens=6, seed=0))[0]
    assert plain.hidden is None and plain.token_ids == outs[0].token_ids  # asking for them changes nothing else
    head = engine.model.get_output_embeddings()
    for prompt, out in zip(PROMPTS, outs):
        assert out.hidden.shape == (len(out.token_ids), engine.model.config.hidden_size)
        with torch.no_grad():
            lp = torch.log_softmax(head(out.hidden).float(), -1)[torch.arange(len(out.token_ids)), out.token_ids]
            ids = engine.encode(prompt) + out.token_ids
            full = engine.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(lp, torch.tensor(out.logprobs), atol=1e-4, rtol=1e-4)
        n = len(ids) - len(out.token_ids)
        torch.testing.assert_close(out.hidden, full[n - 1 : len(ids) - 1], atol=1e-4, rtol=1e-4)


def test_fast_path_attends_in_float32_when_the_model_does(tiny_model_dir):
    """A 16-bit model switched to float32 attention (PPO's policy on a CPU) gets float32
    attention on the fast path too, so that its rollout computes what its training forward does."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from camelid.cpu.fastllama import FastLlama
    from camelid.cpu.training import float32_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ids = torch.randint(100, 4000, (2, 96), generator=torch.Generator().manual_seed(0))
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1]).expand(2, -1)
    plain = FastLlama(model)
    float32_attention(model)
    fast32 = FastLlama(model)
    assert plain.attn_dtype is None and fast32.attn_dtype == torch.float32
    with torch.no_grad():
        hf = model(input_ids=ids).logits.float()
        a, b = plain(ids, mask, pos, DynamicCache()).float(), fast32(ids, mask, pos, DynamicCache()).float()
    assert (b - hf).abs().mean() <= 0.1 * (a - hf).abs().mean()  # measured: equal, against 4e-4


def test_fast_path_decodes_bfloat16_like_the_model(tiny_model_dir):
    """A bfloat16 decode step (one row per sequence: `llama_train.linear`'s weight @ xᵀ products,
    column-major outputs through the layer) gives the model's own bfloat16 logits, to bfloat16
    rounding, and the same greedy tokens over several steps."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from camelid.engine.engine import cache_kwarg
    from camelid.cpu.fastllama import FastLlama

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    kw = cache_kwarg(model)
    ids = torch.randint(100, 4000, (3, 20), generator=torch.Generator().manual_seed(0))
    fast, hf_cache, fast_cache = FastLlama(model), DynamicCache(), DynamicCache()
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1]).expand(3, -1)
    with torch.inference_mode():
        hf = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{kw: hf_cache}).logits[:, -1:]
        ours = fast(ids, mask, pos, fast_cache)[:, -1:]
        for _ in range(4):
            nxt = hf[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(ours[:, -1].argmax(-1, keepdim=True), nxt)
            mask, pos = torch.cat([mask, mask[:, :1]], 1), pos[:, -1:] + 1
            hf = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **{kw: hf_cache}).logits
            ours = fast(nxt, mask, pos, fast_cache)
            assert ours.shape == hf.shape == (3, 1, model.config.vocab_size)
            torch.testing.assert_close(ours.float(), hf.float(), atol=0.05, rtol=0.02)


@pytest.mark.cpu_kit
def test_fast_path_follows_adapter_changes_between_calls(engine):
    """The fast path keeps each LoRA module's projection between decode steps; switching the
    adapter off and on again, updating its weights in place (the optimizer) or replacing them
    (a loaded state) must show in the next call, as in peft's own forward."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    torch.manual_seed(0)
    lm = get_peft_model(copy.deepcopy(engine.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lm.eval()
    policy = Engine(lm, engine.tokenizer)
    ids = engine.tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]

    def check():
        with torch.inference_mode():
            fast = policy.fast(ids, mask, pos, DynamicCache())
            torch.testing.assert_close(fast, lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits, atol=1e-4, rtol=1e-4)
        return fast

    zero = check()  # B = 0: the adapter adds nothing yet
    b_weights = [m for n, m in lm.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in b_weights:
            p.normal_(std=0.5)  # in place, as an optimizer step
    trained = check()
    assert (trained - zero).abs().max() > 1e-2
    with lm.disable_adapter():
        torch.testing.assert_close(check(), zero)
    torch.testing.assert_close(check(), trained)  # on again
    layer = unwrap_lora_layer(lm)
    layer.lora_B["default"].weight = torch.nn.Parameter(torch.zeros_like(layer.lora_B["default"].weight))  # replaced
    assert (check() - trained).abs().max() > 0


def unwrap_lora_layer(lm):
    from camelid.models.lora import unwrap

    return unwrap(lm).model.layers[0].self_attn.q_proj


def test_a_load_that_casts_reads_the_same_weights(tiny_model_dir):
    """Inference in bfloat16 from a float32 checkpoint reads each tensor and casts it
    (`models.load.from_pretrained`, not the memory map): the model transformers would load."""
    from transformers import AutoModelForCausalLM

    from camelid.models.load import load_for_inference

    ours, _, _ = load_for_inference(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    assert ours.name_or_path == str(tiny_model_dir)
