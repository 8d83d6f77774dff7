"""`camelid export gguf`: the file read back (gguf's reader, our header reader, transformers),
compared with the source model; the bundled model compared with its original GGUF; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from camelid.errors import CamelidError
from camelid.export.core import ExportConfig, export_gguf
from camelid.export.header import read_header, tensor_data
from camelid.export.writer import permute_rotary

PROMPTS = ["def add(a, b):\n    return a + b", "Héllo wörld — 3.14159 ≈ π 🦙", "<|im_start|>user\nHi!<|im_end|>\n"]


def _export(model, out: Path, quant: str, **kw) -> Path:
    return export_gguf(ExportConfig(model=str(model), out=str(out), quant=quant, progress=False, **kw)).path


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {q: _export(tiny_model_dir, out / f"tiny-{q}.gguf", q) for q in ("f16", "q8_0", "q4_0")}


def _hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_f16_read_back_by_gguf_reader(tiny_ggufs, tiny_model_dir):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    r = GGUFReader(str(tiny_ggufs["f16"]))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert kv["general.architecture"] == "llama" and kv["general.name"] == tiny_model_dir.name
    assert kv["general.file_type"] == 1 and kv["general.size_label"].endswith("M")
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.attention.head_count"],
            kv["llama.attention.head_count_kv"], kv["llama.feed_forward_length"]) == (2, 64, 4, 2, 128)
    assert kv["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
    assert kv["tokenizer.ggml.tokens"] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    types = kv["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == 3] == sorted(tok.added_tokens_decoder)  # CONTROL
    assert len(kv["tokenizer.ggml.merges"]) == 48900
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert kv["tokenizer.ggml.add_bos_token"] is False and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.chat_template"] == tok.chat_template
    tensors = {t.name: t for t in r.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == expected  # tied: no output.weight, as llama.cpp's converter writes it
    assert tensors["blk.1.attn_k.weight"].shape.tolist() == [64, 32]  # ggml order: (cols, rows)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.F16
    src = _hf_weights(tiny_model_dir)
    q = np.asarray(tensors["blk.1.attn_q.weight"].data, dtype=np.float32)
    np.testing.assert_allclose(q, permute_rotary(src["model.layers.1.self_attn.q_proj.weight"], 4), atol=1e-3)


def test_quantized_types_and_values(tiny_ggufs, tiny_model_dir):
    src = _hf_weights(tiny_model_dir)
    for quant, mat, embd, tol in (("q8_0", 8, 8, 0.01), ("q4_0", 2, 8, 0.08)):
        path = tiny_ggufs[quant]
        h = read_header(path)
        assert h.kv["general.file_type"] == {"q8_0": 7, "q4_0": 2}[quant]
        assert h.tensors["blk.0.ffn_down.weight"] == ((64, 128), mat)
        assert h.tensors["token_embd.weight"][1] == embd  # Q8_0 for the (tied) embedding in both
        assert h.tensors["output_norm.weight"][1] == 0  # F32
        v = src["model.layers.0.self_attn.v_proj.weight"]
        err = np.abs(tensor_data(path, h, "blk.0.attn_v.weight") - v).max()
        assert err < tol * np.abs(v).max(), (quant, err)
        k = permute_rotary(src["model.layers.0.self_attn.k_proj.weight"], 2)
        assert np.abs(tensor_data(path, h, "blk.0.attn_k.weight") - k).max() < tol * np.abs(k).max()
    sizes = [tiny_ggufs[q].stat().st_size for q in ("f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)


def test_transformers_loads_f16_export_with_same_logits(tiny_ggufs, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_ggufs["f16"]
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            a, b = src(ids).logits, back(ids).logits
            assert (a - b).abs().max().item() < 2e-3 * a.abs().max().item() + 1e-3


def test_damaged_gguf_is_refused_before_conversion(tiny_ggufs, tmp_path):
    """A GGUF given as --model is checked from its header and tensor table before the slow
    conversion: a cut file or a damaged length is a one-line error, not a memory blow-up."""
    from camelid.models.gguf_check import check_gguf

    good = tiny_ggufs["q4_0"]
    check_gguf(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])  # the last tensor's data (its padding is under 32 bytes)
    bad = tmp_path / "bad-length.gguf"
    bad.write_bytes(data[:24] + (1 << 62).to_bytes(8, "little") + data[32:])  # the first key's length
    for path, needle in ((cut, r"corrupt or truncated \(tensor \S+ runs past the end of the file"),
                         (bad, r"corrupt or truncated \(a string runs past the end of the file")):
        with pytest.raises(CamelidError, match=needle):
            check_gguf(path)


@pytest.mark.parametrize("model,quant", [("tiny", "q4_0"), ("llama2", "q8_0")])
def test_gguf_conversion_equals_transformers(tiny_ggufs, llama2_model_dir, tmp_path, monkeypatch, model, quant):
    """A GGUF given as a model converts with one read of the file for the model
    (`models.gguf_convert`) into the folder transformers' GGUF loader gives: the same config and
    generation config, every tensor bit for bit (q and k un-permuted; LLaMA-2's untied head and
    SentencePiece vocabulary included), the same tokenizer."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from camelid.models import gguf_convert, resolve

    path = tiny_ggufs[quant] if model == "tiny" else _export(llama2_model_dir, tmp_path / f"llama2-{quant}.gguf", quant)
    ours = resolve.convert_gguf(path, tmp_path / "ours")

    def unsupported(*_):
        raise gguf_convert.Unsupported("the test asks for transformers' path")

    monkeypatch.setattr(gguf_convert, "convert", unsupported)
    theirs = resolve.convert_gguf(path, tmp_path / "theirs")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json", "camelid.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys() and "model.layers.1.self_attn.k_proj.weight" in a
    assert ("lm_head.weight" in a) == (model == "llama2")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    text = PROMPTS[1] + PROMPTS[2]
    assert AutoTokenizer.from_pretrained(ours)(text)["input_ids"] == AutoTokenizer.from_pretrained(theirs)(text)["input_ids"]


def test_modelfile_translates_chatml(tiny_ggufs):
    text = tiny_ggufs["f16"].with_name("tiny-f16.Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_adapter_is_merged_on_the_fly(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # records base_model_name_or_path = tiny_model_dir
    merged = {k: v.numpy() for k, v in lora.merge_and_unload().state_dict().items()}
    path = _export(tmp_path / "adapter", tmp_path / "a.gguf", "f16")
    h = read_header(path)
    base_v = _hf_weights(tiny_model_dir)["model.layers.0.self_attn.v_proj.weight"]
    got_v = tensor_data(path, h, "blk.0.attn_v.weight")
    np.testing.assert_allclose(got_v, merged["model.layers.0.self_attn.v_proj.weight"], atol=2e-3)
    assert np.abs(got_v - base_v).max() > 1e-2  # the adapter really changed it
    np.testing.assert_allclose(tensor_data(path, h, "blk.0.attn_q.weight"),
                               permute_rotary(merged["model.layers.0.self_attn.q_proj.weight"], 4), atol=2e-3)


# ---- bad input: one-line CamelidError, nothing left behind ----------------------------------

def _copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))


def test_not_a_llama_model(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CamelidError, match="llama-architecture"):
        _export(d, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_missing_tokenizer(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CamelidError, match="no tokenizer"):
        _export(d, tmp_path / "x.gguf", "f16")


def test_unknown_pre_tokenizer_is_refused(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True  # tokenises differently from every known family
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CamelidError, match="pre-tokenizer"):
        _export(d, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_unknown_quant_and_unwritable_output_via_cli(tiny_model_dir, tmp_path, capsys):
    from camelid.cli import main

    assert main(["export", "gguf", str(tiny_model_dir), "--out", str(tmp_path / "x.gguf"), "--quant", "q5_1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown quant type 'q5_1'" in err
    (tmp_path / "file").write_text("")
    assert main(["export", "gguf", str(tiny_model_dir), "--out", str(tmp_path / "file" / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write" in err
    assert main(["export", "gguf", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_q4_k_m_without_llama_cpp_says_how_to_install(tiny_model_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(CamelidError, match=r"pip install 'camelid\[llamacpp\]'"):
        _export(tiny_model_dir, tmp_path / "x.gguf", "q4_k_m")


# ---- the bundled model against its original GGUF (llama.cpp's own converter + quantizer) ----

@pytest.mark.slow
def test_bundled_q8_0_matches_original_gguf(bundled_dir, tmp_path):
    from camelid.models.resolve import BUNDLED, bundled_gguf_path

    path = _export("smollm2-135m", tmp_path / "smol.gguf", "q8_0")
    orig_path = bundled_gguf_path(BUNDLED["smollm2-135m"])
    ours, orig = read_header(path), read_header(orig_path)
    assert set(ours.tensors) == set(orig.tensors)
    assert {k: v[0] for k, v in ours.tensors.items()} == {k: v[0] for k, v in orig.tensors.items()}
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "llama.context_length", "llama.rope.freq_base", "general.license"):
        assert ours.kv[key] == orig.kv[key], key
    assert ours.kv["general.base_model.0.name"] == orig.kv["general.name"]
    # The HF weights are the original's dequantised Q4_1 values, so after our permutation and
    # Q8_0 rounding every tensor must sit within one Q8_0 step of the original.
    for name in ("blk.0.attn_q.weight", "blk.17.attn_k.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        a, b = tensor_data(path, ours, name), tensor_data(orig_path, orig, name)
        assert np.abs(a - b).max() <= np.abs(b).max() / 127 + 1e-6, name
