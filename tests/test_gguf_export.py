"""GGUF export: tiny random models of every family -> GGUF -> reopened (lmcraft's importer, gguf-py's reader and,
as parity, transformers' own GGUF loader) -> logits / perplexity; the Modelfile; corrupt and truncated files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_model, save_chat_tokenizer
from lmcraft.cli import main
from lmcraft.gguf_export import export_gguf, load_source
from lmcraft.gguf_import import GGUFImportError
from lmcraft.gguf_verify import verify_export
from lmcraft.hub import save_model

TEXTS = ["The quick brown fox jumps over the lazy dog. Rivers carry water to the sea.", "Hello world 12345, café"] * 20
FAMILIES = {
    "llama": dict(num_kv_heads=2),
    "mistral": dict(model_type="mistral", num_kv_heads=2),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, num_kv_heads=2),
    # n_inner = 4 * n_embd and 1024 positions: the values transformers' GGUF loader assumes for gpt2
    "gpt2": dict(model_type="gpt2", norm="layernorm", mlp="plain", activation="gelu_tanh", position="learned",
                 qkv_bias=True, out_bias=True, mlp_bias=True, max_position_embeddings=1024, intermediate_size=128),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("tok")
    return folder, save_chat_tokenizer(folder, TEXTS, 300)


def _model_folder(root: Path, tokenizer_dir: tuple[Path, int], family: str, seed: int = 0, **fields) -> Path:
    folder = root / f"src-{family}-{seed}"  # not named after the family: transformers guesses types from names
    model = build_tiny_model(vocab_size=tokenizer_dir[1], seed=seed, **{**FAMILIES[family], **fields})
    save_model(model, folder, tokenizer_dir=tokenizer_dir[0])
    return folder


def _value(checks, prefix: str) -> str:
    return next(c.value for c in checks if c.name.startswith(prefix))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_f32_and_q8_0(tmp_path: Path, tokenizer_dir, family: str) -> None:
    source = load_source(str(_model_folder(tmp_path, tokenizer_dir, family)))
    for quant, logit_limit in (("f32", 0.0), ("q8_0", 1e-2)):
        out = tmp_path / f"m-{quant}.gguf"
        counts = export_gguf(source, out, quant, progress=False)
        assert set(counts) == ({"F32"} if quant == "f32" else {"F32", "Q8_0"})
        checks = verify_export(out, source)
        assert not [c for c in checks if c.failed], checks
        assert [c.status for c in checks][:2] == ["ok", "ok"]  # gguf-py's tensor list, tokenizer from metadata
        assert float(_value(checks, "logits")) <= logit_limit


def test_q4_k_m_uses_k_quants_and_stays_close(tmp_path: Path, tokenizer_dir) -> None:
    """Rows of 256 values, so the mix really holds Q4_K and Q6_K (narrower rows fall back to Q5_0/Q8_0)."""
    folder = _model_folder(tmp_path, tokenizer_dir, "llama", hidden_size=256, num_heads=4, intermediate_size=512,
                           tie_word_embeddings=False)
    source = load_source(str(folder))
    out = tmp_path / "m.gguf"
    counts = export_gguf(source, out, "q4_k_m", progress=False)
    # 2 layers: use_more_bits(i, 2) picks layer 1 only, so its attn_v/ffn_down and the output are Q6_K
    assert counts == {"Q4_K": 13, "Q6_K": 3, "F32": 5}
    checks = verify_export(out, source)
    assert not [c for c in checks if c.failed], checks
    export_gguf(source, tmp_path / "q4_0.gguf", "q4_0", progress=False)  # byte-identical to gguf-py's Q4_0
    legacy = verify_export(tmp_path / "q4_0.gguf", source)
    assert float(_value(checks, "logits")) < float(_value(legacy, "logits"))


@pytest.mark.parity
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_reads_the_export(tmp_path: Path, tokenizer_dir, family: str) -> None:
    """transformers' GGUF loader (its own name maps, q/k un-permutation, tokenizer rebuild) gives our logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = load_source(str(_model_folder(tmp_path, tokenizer_dir, family)))
    export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    text = "Hello world 12345, café <|im_start|>user fox"
    ids = source.tokenizer.encode(text)
    assert AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")(text)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, source.model(torch.tensor([ids])).logits,
                                   rtol=1e-5, atol=1e-5)


def test_cli_export_writes_modelfile_and_verifies(tmp_path: Path, tokenizer_dir, capsys) -> None:
    folder = _model_folder(tmp_path, tokenizer_dir, "qwen2")
    out = tmp_path / "out" / "tiny.gguf"
    assert main(["export", str(folder), str(out), "--quant", "q8_0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"perplexity \(held paragraph\).*ok", printed)
    assert ("llama_cpp is not importable" in printed) != bool(re.search(r"llama.cpp perplexity.*ok", printed))
    modelfile = (tmp_path / "out" / "tiny.Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./tiny.gguf"
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""') in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert "SYSTEM" not in modelfile
    assert main(["export", str(folder), str(out), "--quant", "q4_0", "--quiet"]) == 2  # another run's file
    assert main(["export", str(folder), str(out), "--quant", "q4_0", "--quiet", "--overwrite"]) == 0
    assert main(["verify-export", str(out), "--against", str(folder)]) == 0


def test_verify_export_fails_against_another_model(tmp_path: Path, tokenizer_dir, capsys) -> None:
    out = tmp_path / "m.gguf"
    export_gguf(load_source(str(_model_folder(tmp_path, tokenizer_dir, "llama"))), out, "f32", progress=False)
    other = _model_folder(tmp_path, tokenizer_dir, "llama", seed=1)
    assert main(["verify-export", str(out), "--against", str(other)]) == 1
    captured = capsys.readouterr()
    assert re.search(r"logits \(probe\).*FAIL", captured.out) and "verification FAILED" in captured.err


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_folder_is_merged_before_export(tmp_path: Path, tokenizer_dir, method: str) -> None:
    import torch

    from lmcraft import peft
    from lmcraft.hub import load_model

    folder = _model_folder(tmp_path, tokenizer_dir, "llama")
    adapted = peft.apply(load_model(folder, dtype=torch.float32), {"method": method, "r": 4, **(
        {"blocksize": 32} if method == "qlora" else {})})
    with torch.no_grad():
        for _, p in adapted.named_adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    peft.save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(folder))
    source = load_source(str(tmp_path / "adapter"))
    assert source.notes and "merged the adapter" in source.notes[0]
    out = tmp_path / "m.gguf"
    export_gguf(source, out, "f32", progress=False)
    # default-init tiny weights give near-tied logits, which llama.cpp's f16 KV cache may flip in greedy decoding
    assert not [c for c in verify_export(out, source) if c.failed and c.name != "llama.cpp greedy tokens (probe)"]
    ids = torch.tensor([source.tokenizer.encode("the quick fox")])
    with torch.no_grad():
        torch.testing.assert_close(source.model(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    base_checks = verify_export(out, load_source(str(folder)))  # the merged file is not the base model
    assert "logits (probe), max rel diff" in [c.name for c in base_checks if c.failed]


def test_truncated_and_corrupt_files_name_the_offset(tmp_path: Path, tokenizer_dir, capsys) -> None:
    folder = _model_folder(tmp_path, tokenizer_dir, "llama")
    source = load_source(str(folder))
    good = tmp_path / "m.gguf"
    export_gguf(source, good, "f32", progress=False)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFImportError, match=r"cut\.gguf, byte \d+: tensor \S+ .* needs bytes up to [\d,]+, but "
                                              r"the file ends at byte [\d,]+: the file is truncated"):
        verify_export(cut, source)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:2000])
    with pytest.raises(GGUFImportError, match=r"head\.gguf, byte \d+: expected .* but the file ends at byte 2000"):
        verify_export(head, source)
    bad = bytearray(data)
    bad[:4] = b"GGUX"
    (tmp_path / "bad.gguf").write_bytes(bytes(bad))
    assert main(["verify-export", str(tmp_path / "bad.gguf"), "--against", str(folder)]) == 2
    assert "does not start with the bytes 'GGUF'" in " ".join(capsys.readouterr().err.split())


def test_unsupported_models_are_refused(tmp_path: Path, tokenizer_dir) -> None:
    from lmcraft.gguf_export import ExportError

    bert = build_tiny_model(arch="encoder", model_type="bert", norm="layernorm", mlp="plain", position="learned")
    source = load_source(str(_model_folder(tmp_path, tokenizer_dir, "llama")))
    with pytest.raises(ExportError, match="no llama.cpp architecture"):
        export_gguf(type(source)(bert, source.tokenizer, "bert"), tmp_path / "b.gguf", "f32")
    with pytest.raises(ExportError, match="--quant 'q2_k' is not supported"):
        export_gguf(source, tmp_path / "b.gguf", "q2_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".lmcraft-tmp-*"))


def test_modelfile_templates(tmp_path: Path, tokenizer_dir) -> None:
    """A default system prompt becomes SYSTEM; a template of no known shape gets no TEMPLATE, and says why."""
    from lmcraft.gguf_modelfile import modelfile_text
    from lmcraft.tokenizer.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir[0])
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    text, conv = modelfile_text("m.gguf", tokenizer)
    assert conv.shape == "chatml" and 'SYSTEM """You are tiny."""' in text
    tokenizer.chat_template = "alpaca"
    text, conv = modelfile_text("m.gguf", tokenizer)
    assert conv.template is None and "TEMPLATE" not in text.replace("No TEMPLATE", "")
    assert "matches none of the known shapes (chatml, llama3, zephyr)" in text
    assert np.array_equal(text.count("PARAMETER stop"), 1)
