"""GGUF export of the newer decoder families (qwen3, qwen3_moe, olmo2, granite, smollm3, phi3, gemma, gemma2, gemma3)
on tiny random lmcraft models (built from a Hugging Face config.json dict, so transformers is not needed).

References nobody here wrote: gguf-py's `TensorNameMap` (the names llama.cpp's converter gives each HF tensor) and
its `MODEL_TENSORS` (the tensors llama.cpp's loader expects per architecture); llama.cpp itself through
llama-cpp-python, where installed (CI does not have it: those tests skip and say why). Each exported file is
(a) imported back by lmcraft's importer: equal logits (float32, max relative difference 1e-4, measured 0), and
(b) run in llama.cpp: 16 greedy tokens equal to lmcraft's and logits within 5e-3 of the source model's relative to
the largest logit (llama.cpp keeps its KV cache in f16; measured at most 1.3e-3, on gemma3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import save_chat_tokenizer
from lmcraft.generate.llamacpp_backend import llama_cpp_available

pytestmark = pytest.mark.slow  # a few seconds per family (export, import, llama.cpp)
TEXTS = ["The quick brown fox jumps over the lazy dog. Rivers carry water to the sea.", "Hello world 12345, café"] * 20
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)
# config.json of each family; head_dim 16 with 64 = 4 x 16, windows of 8 tokens so the probe texts slide
FAMILIES: dict[str, dict] = {
    "qwen3": dict(model_type="qwen3"),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "olmo2": dict(model_type="olmo2"),
    "granite": dict(model_type="granite", embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                    logits_scaling=4.0),
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4),  # layer 3 has no RoPE
    "phi3": dict(model_type="phi3", sliding_window=None),
    "gemma": dict(model_type="gemma"),
    "gemma2": dict(model_type="gemma2", query_pre_attn_scalar=16, sliding_window=8),
    "gemma3_text": dict(model_type="gemma3_text", query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=6,
                        rope_theta=1e6, rope_local_base_freq=1e4),
}
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama_cpp is not importable (pip install 'lmcraft[llamacpp]')")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("tok")
    return folder, save_chat_tokenizer(folder, TEXTS, 300)


def _model(family: str, vocab_size: int, **changes):
    import torch

    from lmcraft.hub.hf_config import config_from_hf
    from lmcraft.models import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(config_from_hf({**BASE, "vocab_size": vocab_size, **FAMILIES[family], **changes}), "lm")
    with torch.no_grad():  # every weight random, norms included (Gemma's 1 + w must be exported as such)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _source(root: Path, tokenizer_dir: tuple[Path, int], family: str, name: str = "source", **changes):
    from lmcraft.gguf_export import load_source
    from lmcraft.hub import save_model

    folder = root / name  # the source's name becomes the file's general.name
    save_model(_model(family, tokenizer_dir[1], **changes), folder, tokenizer_dir=tokenizer_dir[0])
    return load_source(str(folder))


def _check(checks, name: str):
    return next(c for c in checks if c.name.startswith(name))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_names_are_llama_cpps(tokenizer_dir, family: str) -> None:
    """Every tensor gets the name gguf-py's TensorNameMap gives the HF tensor, and is one llama.cpp's loader
    expects for the architecture (gguf-py's MODEL_TENSORS)."""
    import gguf

    from lmcraft.gguf_export import gguf_tensors
    from lmcraft.gguf_layout import GGUF_ARCH_OF, gguf_name
    from lmcraft.hub.save import hf_state_dict

    model = _model(family, tokenizer_dir[1])
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[GGUF_ARCH_OF[model.config.model_type]]
    names = gguf.get_tensor_name_map(arch, model.config.num_layers)
    for hf in hf_state_dict(model):
        ours = gguf_name(GGUF_ARCH_OF[model.config.model_type], hf)[0]
        merged = ".".join(p for i, p in enumerate(hf.split(".")) if not (i == 5 and "experts" in hf))
        theirs = names.get_name(merged.removesuffix(".weight"))  # per-expert names: the converter's stacked one
        assert theirs is not None and ours == f"{theirs}.weight", (hf, ours, theirs)
    expected = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch]
                for i in range(model.config.num_layers)}
    written = {n.removesuffix(".weight") for n, _ in gguf_tensors(model)}
    assert written <= expected, written - expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_reimports_with_the_source_logits(tmp_path: Path, tokenizer_dir, family: str) -> None:
    from lmcraft.gguf_export import export_gguf
    from lmcraft.gguf_verify import verify_export

    source = _source(tmp_path, tokenizer_dir, family)
    counts = export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    assert set(counts) == {"F32"}
    checks = verify_export(tmp_path / "m.gguf", source)
    assert not [c for c in checks if c.failed], checks
    assert _check(checks, "file").status == "ok" and _check(checks, "tokenizer").status == "ok"
    assert float(_check(checks, "logits (probe)").value) <= 1e-4


@needs_llama_cpp
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_runs_the_export(tmp_path: Path, tokenizer_dir, family: str) -> None:
    import torch

    from lmcraft.generate.llamacpp_backend import LlamaCppModel
    from lmcraft.gguf_export import export_gguf
    from lmcraft.gguf_verify import HELD_TEXT, verify_export

    source = _source(tmp_path, tokenizer_dir, family)
    export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    checks = verify_export(tmp_path / "m.gguf", source)
    assert _check(checks, "llama.cpp greedy tokens").status == "ok", checks
    ids = torch.tensor([source.tokenizer.encode(HELD_TEXT)])  # 60+ tokens: past every sliding window
    llama = LlamaCppModel(tmp_path / "m.gguf", source.model.config)
    try:
        with torch.no_grad():
            theirs, ours = llama(ids).logits[0].float().numpy(), source.model(ids).logits[0].float().numpy()
    finally:
        llama.close()
    assert float(np.abs(theirs - ours).max()) / max(1.0, float(np.abs(ours).max())) <= 5e-3


@pytest.mark.parametrize(("family", "changes", "message"), [
    ("gemma2", dict(layer_types=["full_attention", "sliding_attention"]), "the last layer of every 2 global"),
    ("gemma2", dict(query_pre_attn_scalar=64), r"scales attention scores by 1/sqrt\(16\)"),
    ("gemma3_text", dict(rope_local_base_freq=5e4), "local RoPE base is 10000"),
    ("gemma2", dict(attn_logit_softcapping=None), "always soft-caps attention scores and logits"),
    ("gemma3_text", dict(final_logit_softcapping=30.0), r"applies no soft caps, this model caps at \(None, 30.0\)"),
    ("smollm3", dict(no_rope_layers=[1, 1, 1, 1]), "leaves RoPE out of the last layer of every 4"),
    ("qwen3_moe", dict(norm_topk_prob=False), "renormalises the top-k router weights"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), "has dense ones"),
])
def test_what_llama_cpp_would_override_is_refused(tmp_path: Path, tokenizer_dir, family: str, changes: dict,
                                                  message: str) -> None:
    from lmcraft.gguf_export import ExportError, export_gguf

    source = _source(tmp_path, tokenizer_dir, family, **changes)
    with pytest.raises(ExportError, match=message):
        export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parity
def test_transformers_reads_the_qwen3moe_export(tmp_path: Path, tokenizer_dir) -> None:
    """transformers' own GGUF loader (its qwen3moe name map, expert un-stacking, norm_topk_prob=True default) gives
    the source model's logits. It does not read expert_feed_forward_length and assumes Qwen3-MoE's 768."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmcraft.gguf_export import export_gguf

    source = _source(tmp_path, tokenizer_dir, "qwen3_moe", moe_intermediate_size=768)
    export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.tensor([source.tokenizer.encode("Hello world 12345, the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("quant", "expected"), [
    ("q8_0", {"F32": 11, "Q8_0": 16}),
    # 2 layers: use_more_bits picks layer 1, whose attn_v and ffn_down_exps are Q6_K, as is the output matrix
    ("q4_k_m", {"F32": 11, "Q4_K": 13, "Q6_K": 3}),
])
def test_quantised_qwen3moe_export(tmp_path: Path, tokenizer_dir, quant: str, expected: dict) -> None:
    """Rows of 256 values, so the stacked experts are really K-quantised, blocked along each expert's rows."""
    from lmcraft.gguf_export import export_gguf
    from lmcraft.gguf_verify import verify_export

    source = _source(tmp_path, tokenizer_dir, "qwen3_moe", hidden_size=256, head_dim=64, moe_intermediate_size=256,
                     tie_word_embeddings=False)
    assert export_gguf(source, tmp_path / "m.gguf", quant, progress=False) == expected
    checks = verify_export(tmp_path / "m.gguf", source)  # perplexity within 2% (q8_0) / 15% (q4_k_m), llama.cpp's too
    assert not [c for c in checks if c.failed], checks


def test_a_phi3_name_without_phi3_tokens_is_respelled(tmp_path: Path, tokenizer_dir) -> None:
    """llama.cpp looks up <unk>, <s> and <|endoftext|> in any model whose general.name contains "phi3"/"phi-3"
    (case-insensitive) and fails to load one without them: the name is written as "phi_3", and a note says why."""
    import gguf

    from lmcraft.gguf_export import export_gguf

    source = _source(tmp_path, tokenizer_dir, "phi3", name="My-Phi-3-tune")
    export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "My-Phi_3-tune"
    assert "<unk>, <s>, <|endoftext|>" in source.notes[-1]
    if llama_cpp_available():
        from lmcraft.generate.llamacpp_backend import LlamaCppModel

        LlamaCppModel(tmp_path / "m.gguf", source.model.config).close()  # loads


@pytest.mark.parity
@pytest.mark.parametrize("family", ["qwen3_moe", "smollm3"])
def test_imported_folder_opens_in_transformers(tmp_path: Path, tokenizer_dir, family: str) -> None:
    """The importer's config.json and tensors (Qwen3-MoE's experts split per expert, SmolLM3's NoPE layers from
    llama.cpp's fixed interval) give transformers the source model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmcraft.gguf_export import export_gguf
    from lmcraft.gguf_import import convert_gguf

    source = _source(tmp_path, tokenizer_dir, family)
    export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)
    folder = convert_gguf(tmp_path / "m.gguf", tmp_path / "imported", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([source.tokenizer.encode("Hello world 12345, the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source.model(ids).logits, rtol=1e-4, atol=1e-4)


# ---- SentencePiece vocabularies ---------------------------------------------------------------------------------
SPM_SAMPLES = ["the and that", " leading space", "hello  there<tag>and </s>the", "ñandú 東京 😀", "ingers theand\nx"]


@pytest.mark.parametrize("prefix", [False, True])
def test_sentencepiece_tokenizer_exports_as_llama_vocabulary(tmp_path: Path, prefix: bool) -> None:
    """A byte-fallback BPE over `▁`-spaced text (what a GGUF SentencePiece vocabulary imports as) exports as
    llama.cpp's `llama` tokenizer model: pieces, scores from the merge ranks, `<0xNN>` byte pieces, control and
    user-defined types, add_space_prefix. llama.cpp's SentencePiece algorithm (transcribed in
    test_gguf_sentencepiece) on the exported vocabulary, and llama.cpp itself where installed, give lmcraft's ids."""
    import gguf

    from conftest import build_tiny_model
    from lmcraft.gguf_export import export_gguf, load_source
    from lmcraft.gguf_import import build_tokenizer, read_gguf
    from lmcraft.hub import save_model
    from lmcraft.tokenizer.load import Tokenizer
    from test_gguf_sentencepiece import llama_cpp_spm, metadata

    meta = metadata(prefix, shuffle_scores=True)
    backend = build_tokenizer(meta, tmp_path / "source.gguf")
    Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save(tmp_path / "tok")
    model = build_tiny_model(vocab_size=len(meta["tokenizer.ggml.tokens"]) + 3)  # 3 padding rows: unused tokens
    save_model(model, tmp_path / "source", tokenizer_dir=tmp_path / "tok")
    source = load_source(str(tmp_path / "source"))
    export_gguf(source, tmp_path / "m.gguf", "f32", progress=False)

    exported, _ = read_gguf(tmp_path / "m.gguf")
    assert exported["tokenizer.ggml.model"] == "llama" and exported["tokenizer.ggml.add_space_prefix"] == prefix
    assert exported["tokenizer.ggml.token_type"][-3:] == [5, 5, 5]
    assert exported["tokenizer.ggml.token_type"][5:261] == [6] * 256  # <0x00> .. <0xFF>
    tokens, scores, types = (list(exported[f"tokenizer.ggml.{k}"]) for k in ("tokens", "scores", "token_type"))
    llama = None
    if llama_cpp_available():
        import llama_cpp

        llama = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in SPM_SAMPLES:
        ours = source.tokenizer.encode(text, add_special_tokens=False)
        assert llama_cpp_spm(text, tokens, scores, types, prefix) == ours, text
        assert build_tokenizer(exported, tmp_path / "m.gguf").encode(text, add_special_tokens=False).ids == ours
        if llama is not None:
            assert llama.tokenize(text.encode(), add_bos=False, special=True) == ours, text
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.add_bos_token"].contents() is True


@pytest.mark.slow
def test_gemma3_270m_real_weights_export_runs_in_llama_cpp(tmp_path: Path) -> None:
    """The real Gemma 3 270M (imported from its Q4_K_M GGUF, SentencePiece vocabulary of 262,144 pieces) exported as
    f16: llama.cpp tokenizes like lmcraft and continues "The capital of France is" with lmcraft's greedy tokens."""
    if not llama_cpp_available():
        pytest.skip("llama_cpp is not importable (pip install 'lmcraft[llamacpp]')")
    import llama_cpp

    from lmcraft.generate import GenerationConfig, generate
    from lmcraft.generate.llamacpp_backend import LlamaCppModel
    from lmcraft.gguf_export import export_gguf, load_source

    source = load_source("gemma3-270m")
    export_gguf(source, tmp_path / "gemma3.gguf", "f16", progress=False)
    vocab = llama_cpp.Llama(str(tmp_path / "gemma3.gguf"), vocab_only=True, verbose=False)
    for text in ["The capital of France is", "Rivers carry water\n\nto the sea.  Naïve café 東京 😀 <start_of_turn>"]:
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == source.tokenizer.encode(text), text
    prompt = source.tokenizer.encode("The capital of France is")
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=())
    llama = LlamaCppModel(tmp_path / "gemma3.gguf", source.model.config)
    try:
        theirs = generate(llama, [prompt], config).tokens[0]
    finally:
        llama.close()
    assert theirs == generate(source.model, [prompt], config).tokens[0]
