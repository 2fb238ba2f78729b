"""GGUF -> HF folder: tiny GGUF files written with gguf.GGUFWriter, converted and checked.

The tiny model is written the way llama.cpp's converter writes real ones: q/k rows permuted for
its rope layout, a byte-level BPE tokenizer as token list + merges. The parity test loads the
converted folder in transformers and compares logits with the model the GGUF was made from.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from lmcraft.gguf_import import GGUFImportError, convert_gguf
from lmcraft.tokenizer.load import load_tokenizer

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 32, 4, 2, 2, 64
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and the dog's still there!",
    "Hello world, hello tokenizer: merges, bytes and numbers like 12345.",
    "naïve café, 東京, emoji 😀 and tabs\tand\nnewlines.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HF name suffix -> (GGUF name suffix, stored type in the "mixed" file)
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", Q.F32),
    "self_attn.q_proj.weight": ("attn_q.weight", Q.F32),
    "self_attn.k_proj.weight": ("attn_k.weight", Q.F32),
    "self_attn.v_proj.weight": ("attn_v.weight", Q.Q5_1),
    "self_attn.o_proj.weight": ("attn_output.weight", Q.F16),
    "post_attention_layernorm.weight": ("ffn_norm.weight", Q.F32),
    "mlp.gate_proj.weight": ("ffn_gate.weight", Q.Q4_0),
    "mlp.up_proj.weight": ("ffn_up.weight", Q.Q4_1),
    "mlp.down_proj.weight": ("ffn_down.weight", Q.Q5_0),
    "self_attn.q_proj.bias": ("attn_q.bias", Q.F32),
    "self_attn.k_proj.bias": ("attn_k.bias", Q.F32),
    "self_attn.v_proj.bias": ("attn_v.bias", Q.F32),
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
    "model.norm.weight": ("output_norm.weight", Q.F32),
    "lm_head.weight": ("output.weight", Q.BF16),
}


def train_tokenizer():
    """A small byte-level BPE with SmolLM's pre-tokenizer (single digits, then GPT-2 byte-level split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 10, trainer)
    return tok


def _merges(tok) -> list[str]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def hf_weights(vocab: int, tied: bool, seed: int = 0, qkv_bias: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "input_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "post_attention_layernorm.weight": (HIDDEN,),
        "mlp.gate_proj.weight": (FFN, HIDDEN),
        "mlp.up_proj.weight": (FFN, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FFN),
    }
    if qkv_bias:
        shapes.update(
            {f"self_attn.{p}_proj.bias": (n * HEAD_DIM,) for p, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))}
        )
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)), "model.norm.weight": 1 + rng.random(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, HIDDEN))
    for i in range(LAYERS):
        for suffix, shape in shapes.items():
            norm = suffix.endswith("layernorm.weight")
            w[f"model.layers.{i}.{suffix}"] = 1 + 0.1 * rng.random(shape) if norm else rng.normal(0, 0.2, shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k (its rope rotates adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)


def write_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    tok,
    mixed: bool = True,
    arch: str = "llama",
    pre: str = "smollm",
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write a llama GGUF like llama.cpp does; return GGUF name -> stored tensor data."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(_merges(tok))
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    stored = {}
    for hf_name, x in weights.items():
        if hf_name.startswith("model.layers."):
            _, _, i, suffix = hf_name.split(".", 3)
            gguf_suffix, qtype = LAYER_TENSORS[suffix]
            name = f"blk.{i}.{gguf_suffix}"
            if arch == "llama" and suffix.startswith("self_attn.q_proj"):  # weight and bias alike
                x = _llama_cpp_permute(x, HEADS)
            elif arch == "llama" and suffix.startswith("self_attn.k_proj"):
                x = _llama_cpp_permute(x, KV_HEADS)
        else:
            name, qtype = GLOBAL_TENSORS[hf_name]
        qtype = qtype if mixed else Q.F32
        stored[name] = _encode(x, qtype)
        w.add_tensor(name, stored[name], raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_convert_mixed_types(tmp_path: Path, tokenizer) -> None:
    weights = hf_weights(tokenizer.get_vocab_size(), tied=False)
    stored = write_gguf(tmp_path / "m.gguf", weights, tokenizer)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    vocab = tokenizer.get_vocab()
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (32, 4, 2)
    assert (config["num_hidden_layers"], config["intermediate_size"], config["head_dim"]) == (2, 64, 8)
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == tokenizer.get_vocab_size()
    assert config["bos_token_id"] == vocab["<|im_start|>"] and config["eos_token_id"] == vocab["<|im_end|>"]

    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(weights)
    for hf_name, x in weights.items():
        gguf_name = next(n for n in stored if _gguf_name(hf_name) == n)
        qtype = (LAYER_TENSORS.get(hf_name.split(".", 3)[-1]) or GLOBAL_TENSORS[hf_name])[1]
        if qtype == Q.F32:  # q/k included: exact after undoing llama.cpp's permutation
            np.testing.assert_array_equal(tensors[hf_name], x, err_msg=hf_name)
        elif qtype == Q.F16:
            np.testing.assert_array_equal(tensors[hf_name], x.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(tensors[hf_name], gguf.quants.dequantize(stored[gguf_name], qtype))


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, i, suffix = hf_name.split(".", 3)
        return f"blk.{i}.{LAYER_TENSORS[suffix][0]}"
    return GLOBAL_TENSORS[hf_name][0]


def test_tokenizer_encodes_like_the_original(tmp_path: Path, tokenizer) -> None:
    write_gguf(tmp_path / "m.gguf", hf_weights(tokenizer.get_vocab_size(), tied=True), tokenizer)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    rebuilt = load_tokenizer(out)
    samples = [*TEXT, "Digits 9876543210 split one by one", "<|im_start|>user\nhi<|im_end|>", "  spaces   "]
    for text in samples:
        assert rebuilt.encode(text) == tokenizer.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.encode("<|im_end|>") == [tokenizer.token_to_id("<|im_end|>")]  # control tokens stay whole
    assert rebuilt.encode("2024") == [tokenizer.token_to_id(c) for c in "2024"]
    assert rebuilt.bos_token == "<|im_start|>" and rebuilt.eos_token_ids == [tokenizer.token_to_id("<|im_end|>")]
    assert rebuilt.chat_template == CHAT_TEMPLATE
    prompt = rebuilt.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tied_embeddings_and_bf16_output(tmp_path: Path, tokenizer) -> None:
    weights = hf_weights(tokenizer.get_vocab_size(), tied=True)
    write_gguf(tmp_path / "m.gguf", weights, tokenizer, mixed=False)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="bfloat16", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    import torch
    from safetensors.torch import load_file as load_torch

    tensors = load_torch(out / "model.safetensors")
    assert "lm_head.weight" not in tensors
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16
    expected = torch.from_numpy(weights["model.layers.1.self_attn.q_proj.weight"]).to(torch.bfloat16)
    assert torch.equal(q, expected)  # round-to-nearest-even, like torch


def test_errors_are_clear(tmp_path: Path, tokenizer) -> None:
    weights = hf_weights(tokenizer.get_vocab_size(), tied=True)
    write_gguf(tmp_path / "m.gguf", weights, tokenizer, mixed=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(GGUFImportError, match="not empty"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "keep.txt").exists()
    convert_gguf(tmp_path / "m.gguf", tmp_path / "busy", overwrite=True, progress=False)
    assert (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "config.json").exists()  # never deleted

    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "o1", progress=False)

    write_gguf(tmp_path / "gpt.gguf", weights, tokenizer, mixed=False, arch="gptneox")
    with pytest.raises(GGUFImportError, match="architecture 'gptneox' is not supported"):
        convert_gguf(tmp_path / "gpt.gguf", tmp_path / "o2", progress=False)

    extra = {"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)}
    write_gguf(tmp_path / "r.gguf", weights, tokenizer, mixed=False, extra=extra)
    with pytest.raises(GGUFImportError, match="rope_freqs"):
        convert_gguf(tmp_path / "r.gguf", tmp_path / "o3", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_unknown_pre_tokenizer_warns_and_falls_back(tmp_path: Path, tokenizer) -> None:
    write_gguf(tmp_path / "m.gguf", hf_weights(tokenizer.get_vocab_size(), tied=True), tokenizer, pre="mystery")
    with pytest.warns(UserWarning, match="pre-tokenizer 'mystery'"):
        out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    assert load_tokenizer(out).encode("hello world") == tokenizer.encode("hello world").ids


def test_cli_convert(tmp_path: Path, tokenizer, capsys) -> None:
    from lmcraft.cli import main

    write_gguf(tmp_path / "m.gguf", hf_weights(tokenizer.get_vocab_size(), tied=True), tokenizer)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--quiet"]) == 0  # same run: redone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "mine"), "--quiet", "--overwrite"]) == 2
    assert "already holds files that lmcraft did not write (notes.txt)" in " ".join(capsys.readouterr().err.split())
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_qwen2_keeps_qk_order_and_biases(tmp_path: Path, tokenizer) -> None:
    weights = hf_weights(tokenizer.get_vocab_size(), tied=True, qkv_bias=True)
    write_gguf(tmp_path / "q.gguf", weights, tokenizer, mixed=False, arch="qwen2", pre="qwen2")
    out = convert_gguf(tmp_path / "q.gguf", tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(weights)
    for name, x in weights.items():
        np.testing.assert_array_equal(tensors[name], x, err_msg=name)


@pytest.mark.parity
def test_split_regexes_match_transformers() -> None:
    """The llama3 / qwen2 pre-tokenizer regexes are the ones transformers' own tokenizers use."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from lmcraft import gguf_layout

    assert gguf_layout.LLAMA3_REGEX == _LLAMA3_SPLIT
    assert gguf_layout.QWEN2_REGEX == PRETOKENIZE_REGEX


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_logits_match_source_model(tmp_path: Path, tokenizer, arch: str) -> None:
    """The rope layout check: llama.cpp-permuted q/k (llama), converted back, give transformers' logits exactly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    vocab = tokenizer.get_vocab_size()
    cfg = config_class(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    source = model_class(cfg).eval()
    with torch.no_grad():  # non-zero biases, so that a lost or misplaced bias shows
        for name, p in source.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    weights = {k: v.detach().numpy().copy() for k, v in source.state_dict().items()}
    write_gguf(
        tmp_path / "m.gguf", weights, tokenizer, mixed=False, arch=arch, pre=arch if arch == "qwen2" else "smollm"
    )
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    converted = model_class.from_pretrained(out).eval()
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = source(ids).logits, converted(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
