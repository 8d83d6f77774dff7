"""CPU training speed-ups (camelid.cpu.training) and PPO's float32 head: same math as the
libraries' own paths, checked against them on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from camelid import cpu
from camelid.cpu import training
from camelid.models.lora import LoraSettings, unwrap
from camelid.models.train_load import load_for_training, training_dtype

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)


def test_ppo_auto_dtype_follows_the_cpus_bf16_hardware_sft_and_reward_stay_float32():
    from camelid.train.ppo_policy import ppo_dtype

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine decides by its GPU")
    assert ppo_dtype("auto") == ("bfloat16" if cpu.native_bf16() else "float32")
    assert training_dtype("auto") == torch.float32
    assert ppo_dtype("float32") == "float32" and training_dtype("bfloat16", cpu_bf16=True) == torch.bfloat16


def test_fast_dropout_drops_p_and_keeps_the_mean():
    # 0.05 * 65536 = 3276.8 -> 3277 lanes of 65536 drop: p = 0.0500031; kept values x 1/(1-p).
    d = training.FastLoraDropout(0.05).train()
    torch.manual_seed(0)
    y = d(torch.ones(2000, 1000))
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 3277 / 65536) < 5 * (0.05 * 0.95 / 2e6) ** 0.5  # within 5 standard errors
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - 3277 / 65536)))
    assert abs(y.mean().item() - 1.0) < 0.002
    # Each of the four 16-bit lanes of a 64-bit output is uniform: the drop rate is the same at
    # every position mod 4, and neighbouring lanes are uncorrelated.
    lanes = (y.flatten().view(-1, 4) == 0).float()
    assert (lanes.mean(0) - 0.05).abs().max() < 0.002
    assert abs(torch.corrcoef(lanes[:, :2].T)[0, 1]) < 0.005
    assert abs(torch.corrcoef(torch.stack([lanes[:-1, 0], lanes[1:, 0]]))[0, 1]) < 0.005


def test_fast_dropout_is_seeded_identity_in_eval_and_passes_the_masked_gradient():
    d = training.FastLoraDropout(0.3)
    x = torch.randn(7, 33, requires_grad=True)
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    assert torch.equal(a, d(x))  # the global generator decides the mask: resumable runs repeat it
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() * d.scale)
    assert d.eval()(x) is x
    assert training.FastLoraDropout(0.0).train()(x) is x


def lora_model(tiny_model_dir, dtype: str):
    model, _, _ = load_for_training(tiny_model_dir, LoraSettings(r=4, alpha=8, dropout=0.1), dtype=dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)  # non-zero adapters, so that LoRA is in the outputs
    return model


@pytest.mark.cpu_kit
def test_speed_up_swaps_lora_dropout_and_16bit_attention(tiny_model_dir):
    fp32 = lora_model(tiny_model_dir, "float32")
    bf16 = lora_model(tiny_model_dir, "bfloat16")
    for model in (fp32, bf16):
        drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict) for d in m.lora_dropout.values()]
        assert drops and all(isinstance(d, training.FastLoraDropout) and d.p == 0.1 for d in drops)
    assert unwrap(fp32).config._attn_implementation == "sdpa"
    assert unwrap(bf16).config._attn_implementation == training.FLOAT32_ATTENTION


@pytest.mark.cpu_kit
def test_float32_attention_gives_the_sdpa_outputs(tiny_model_dir):
    """A bfloat16 model with float32 attention against the same model with bfloat16 SDPA: equal
    up to bfloat16 rounding, on a right-padded batch with a padding mask."""
    model = lora_model(tiny_model_dir, "bfloat16").eval()
    ids = torch.randint(5, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ours = model(input_ids=ids, attention_mask=mask).logits.float()
    unwrap(model).set_attn_implementation("sdpa")
    theirs = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (ours - theirs)[real].abs().max() <= 0.05 * theirs[real].abs().max()
    unwrap(model).set_attn_implementation(training.FLOAT32_ATTENTION)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits.float(), ours)


def test_ppo_head_is_float32_where_it_counts_and_16bit_backward(tiny_model_dir):
    from camelid.train import rl
    from camelid.cpu.lm_head import EXACT_TOP, head_logits

    model = lora_model(tiny_model_dir, "bfloat16")
    head = unwrap(model).get_output_embeddings()
    torch.manual_seed(0)
    hidden = (3 * torch.randn(2, 5, head.in_features)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, head.out_features, (2, 5))
    logits = head_logits(model, hidden, labels)
    # Float32 products of the bfloat16 numbers (both convert to float32 without loss).
    exact = hidden.detach().float() @ head.weight.float().T
    assert logits.dtype == torch.float32
    # The label's logit and each row's EXACT_TOP largest are float32; the rest bfloat16-rounded.
    torch.testing.assert_close(logits.gather(-1, labels[..., None]), exact.gather(-1, labels[..., None]), rtol=1e-6, atol=1e-6)
    top = exact.topk(EXACT_TOP // 2, dim=-1).indices  # (the selection is by the rounded values: ties at its edge)
    torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-6)
    err = (logits - exact).abs()
    float32 = err <= 1e-5 * exact.abs() + 1e-6
    assert (float32 | (err <= 2**-8 * exact.abs())).all()  # the rest within bfloat16's rounding
    assert float32.sum(-1).min() >= EXACT_TOP and not float32.all()
    # The labels' log-probabilities: as the all-float32 head's, to well under bfloat16's rounding.
    ours, theirs = rl.logprobs_from_logits(logits, labels), rl.logprobs_from_logits(exact, labels)
    plain = rl.logprobs_from_logits(exact.bfloat16().float(), labels)  # a plain bfloat16 head
    assert (ours - theirs).abs().max() < 0.1 * (plain - theirs).abs().max()
    grad = torch.randn_like(logits)
    logits.backward(grad)
    assert hidden.grad.dtype == torch.bfloat16
    exact_grad = grad @ head.weight.float()
    assert (hidden.grad.float() - exact_grad).abs().max() <= 0.02 * exact_grad.abs().max()
    # A float32 model: the head's own logits (to float32 rounding: oneDNN's product runs it, below).
    model32 = lora_model(tiny_model_dir, "float32")
    h32 = torch.randn(2, 5, head.in_features)
    torch.testing.assert_close(head_logits(model32, h32, labels), unwrap(model32).get_output_embeddings()(h32),
                               rtol=1e-5, atol=1e-5)


def _float32_llama(vocab: int) -> nn.Module:
    """A random one-layer float32 Llama with a frozen head over `vocab` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().requires_grad_(False)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_float32_head_over_a_large_vocabulary_runs_on_onednn_with_the_same_logits_and_gradient(monkeypatch):
    from camelid.cpu import internals, lm_head
    from kernel_helpers import recording

    monkeypatch.delenv(cpu.SWITCH, raising=False)
    model = _float32_llama(16 * lm_head.VOCAB_CHUNK)
    weight = model.get_output_embeddings().weight
    for shape in ((2, 48, 64), (1, 5, 64), (64, 64)):
        hidden = torch.randn(*shape, requires_grad=True)
        with recording(lm_head, "onednn_linear") as calls:
            logits = cpu.head_logits(model, hidden)
        assert len(calls) == 1 and logits.dtype == torch.float32 and logits.shape == (*shape[:-1], weight.shape[0])
        torch.testing.assert_close(logits, F.linear(hidden.detach(), weight), rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(logits)
        logits.backward(grad)
        torch.testing.assert_close(hidden.grad, grad @ weight, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # PPO's experience: no graph
        assert not cpu.head_logits(model, torch.randn(3, 64)).requires_grad
    # Where oneDNN's op is missing, a small vocabulary, or the kit off: the head as is, bit for bit.
    small = _float32_llama(256)
    h = torch.randn(2, 3, 64)
    for m, env, broken in ((model, "1", {"onednn-head": "missing"}), (small, "1", {}), (model, "0", {})):
        monkeypatch.setenv(cpu.SWITCH, env)
        monkeypatch.setattr(internals, "_broken", broken)
        with recording(lm_head, "onednn_linear") as calls:
            logits = cpu.head_logits(m, h)
        assert calls == [] and torch.equal(logits, m.get_output_embeddings()(h))
    # An op that fails at run time (a build whose oneDNN lacks the kernel): torch's product, and
    # the path off from then on.
    monkeypatch.setenv(cpu.SWITCH, "1")
    monkeypatch.setattr(internals, "_broken", {})

    def failing(x, w):
        raise RuntimeError("no kernel for this build\nmore detail")

    monkeypatch.setattr(lm_head, "onednn_linear", failing)
    assert torch.equal(cpu.head_logits(model, h), model.get_output_embeddings()(h))
    assert internals.broken("onednn-head").startswith("torch.ops.mkldnn._linear_pointwise failed (no kernel")
    assert "onednn-head" not in cpu.active_fast_paths()


def test_right_padded_rows_need_no_padding_mask(tiny_model_dir):
    """PPO's forward passes no padding mask (right padding, causal attention): each row's
    log-probs and values equal those of the row run alone."""
    from camelid.train.ppo_batch import pack
    from camelid.train.ppo_policy import PolicyWithValue

    policy = PolicyWithValue(lora_model(tiny_model_dir, "float32")).eval()
    nn.init.normal_(policy.v_head.weight, std=0.1)
    prompts, responses = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [30, 31, 32, 33, 34, 35]]
    with torch.no_grad():
        batch = pack(prompts, responses, 0, torch.device("cpu"))
        logits, values = policy(batch.input_ids, batch.gather_idx)
        for i in range(2):
            alone = pack(prompts[i : i + 1], responses[i : i + 1], 0, torch.device("cpu"))
            l1, v1 = policy(alone.input_ids, alone.gather_idx)
            n = len(responses[i])
            torch.testing.assert_close(logits[i, :n], l1[0, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[i, :n], v1[0, :n], rtol=1e-5, atol=1e-5)


def test_two_stage_top_indices_equal_topk():
    """The head's selection of each row's largest logits (block maxima first) against torch.topk,
    on random rows, on rows whose largest values crowd into one block, and on a vocabulary that
    is not a multiple of the block (plain topk then)."""
    from camelid.cpu.lm_head import _top_indices

    torch.manual_seed(0)
    z = torch.randn(37, 49152)
    z[0, 256:384] += 10  # the 32 largest of row 0 all in one block
    for x in (z, torch.randn(5, 1000)):
        got = _top_indices(x, 32).sort(-1).values
        want = x.topk(32, dim=-1).indices.sort(-1).values
        assert torch.equal(got, want)
