"""camelid merge: adapter folded into its base gives the same outputs, as a plain HF folder."""

from __future__ import annotations

from pathlib import Path

import torch

from camelid.cli import main
from camelid.models.lora import LoraSettings
from camelid.models.train_load import load_for_training


def random_adapter(base: Path, out: Path, task: str) -> torch.nn.Module:
    """A LoRA adapter with random (non-zero) B matrices and, for seq_cls, a random score head."""
    torch.manual_seed(0)
    model, tok, _ = load_for_training(base, LoraSettings(r=4, alpha=8, dropout=0.0), task=task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


def test_merge_causal_lm_equals_adapter_and_loads_for_chat(tiny_model_dir, tmp_path, capsys):
    from camelid.models.load import load_for_inference

    model = random_adapter(tiny_model_dir, tmp_path / "adapter", "causal_lm")
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model written" in capsys.readouterr().out
    merged, tok, _ = load_for_inference(str(tmp_path / "merged"), device="cpu", dtype="float32")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        base_out = model.get_base_model()
        torch.testing.assert_close(merged(ids).logits, ref, atol=1e-4, rtol=1e-4)
        with model.disable_adapter():
            assert (base_out(ids).logits - ref).abs().max() > 1e-2  # the adapter mattered
    assert tok.eos_token == "<|im_end|>" and (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merge_reward_adapter_keeps_trained_score_head(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = random_adapter(tiny_model_dir, tmp_path / "rm-adapter", "seq_cls")
    assert main(["merge", str(tmp_path / "rm-adapter"), "--out", str(tmp_path / "rm")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id is not None
    ids = torch.randint(3, 1000, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_merge_bad_inputs(tmp_path, tiny_model_dir, capsys):
    assert main(["merge", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 1
    assert "not a LoRA adapter folder" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert main(["merge", str(bad), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("camelid: error:") and "not valid JSON" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
