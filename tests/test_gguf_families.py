"""GGUF import of the newer decoder families (qwen3, olmo2, granite, phi3, gemma, gemma2, gemma3) on tiny random
transformers models.

Each model is written as llama.cpp's `convert_hf_to_gguf.py` writes that architecture: its tensor names, q/k rows
permuted for Granite (its converter is Llama's), every Gemma `*norm.weight` stored as `w + 1`, the hyper-parameters
it writes and none of the ones llama.cpp's loader fixes (Gemma's layer pattern, query scale, local rope base), and
a SentencePiece vocabulary. lmcraft's exporter does not write these families yet, so the file is written here; where
transformers reads the architecture from GGUF itself (qwen3, phi3, gemma2, gemma3), its loader is the check that the
file follows llama.cpp's conventions. The import must give back the source model's logits, in transformers (the
converted folder) and in lmcraft.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmcraft.gguf_import import convert_gguf
from lmcraft.gguf_layout import ARCHITECTURES, gguf_name, permute_qk
from test_gguf_sentencepiece import metadata as spm_metadata

pytestmark = [pytest.mark.parity, pytest.mark.slow]
TINY = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, rms_norm_eps=1e-6)


def _family(arch: str):
    """(transformers model class, its config) of a tiny model of GGUF architecture `arch`."""
    import transformers as tf

    if arch == "qwen3":
        # head_dim 128: transformers' GGUF loader does not read qwen3.attention.key_length and assumes Qwen3's 128
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**{**TINY, "head_dim": 128}, num_hidden_layers=2,
                                                   tie_word_embeddings=False)
    if arch == "olmo2":
        return tf.Olmo2ForCausalLM, tf.Olmo2Config(**TINY, num_hidden_layers=2, pad_token_id=0)
    if arch == "granite":
        return tf.GraniteForCausalLM, tf.GraniteConfig(**TINY, num_hidden_layers=2, embedding_multiplier=3.0,
                                                       residual_multiplier=0.5, attention_multiplier=0.2,
                                                       logits_scaling=4.0, tie_word_embeddings=True)
    if arch == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(**TINY, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
                                                 eos_token_id=2, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaForCausalLM, tf.GemmaConfig(**TINY, num_hidden_layers=2, hidden_activation="gelu_pytorch_tanh")
    # Gemma 2/3: head_dim = query_pre_attn_scalar = 256 and Gemma 2's default soft caps (50, 30), the values
    # transformers' GGUF loader assumes (it reads neither key); llama.cpp scores by 1/sqrt(head_dim) too
    gemma = {**TINY, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4}
    if arch == "gemma2":
        return tf.Gemma2ForCausalLM, tf.Gemma2Config(**gemma, num_hidden_layers=2)
    return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**gemma, num_hidden_layers=6, rope_theta=1e6,
                                                    rope_local_base_freq=1e4)


def _hyper_parameters(writer, arch: str, cfg) -> None:
    """The `{arch}.*` keys llama.cpp's converter writes for this architecture."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_global_theta(cfg))
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if not arch.startswith("gemma"):
        writer.add_rope_dimension_count(cfg.head_dim)
    if arch == "granite":
        writer.add_attention_scale(cfg.attention_multiplier)
        writer.add_embedding_scale(cfg.embedding_multiplier)
        writer.add_residual_scale(cfg.residual_multiplier)
        writer.add_logit_scale(cfg.logits_scaling)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)


def _global_theta(cfg) -> float:
    """The RoPE base of the full-attention layers (transformers 5 keeps one rope dict per layer kind for Gemma 3)."""
    params = cfg.rope_parameters
    return float(params["full_attention"]["rope_theta"] if "full_attention" in params else params["rope_theta"])


def _write(path: Path, arch: str, model, meta: dict) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    _hyper_parameters(writer, arch, cfg)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_scores(meta["tokenizer.ggml.scores"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(not arch.startswith("gemma"))
    spec = ARCHITECTURES[arch]
    heads = {"rope_q": cfg.num_attention_heads, "rope_k": cfg.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname, layout = gguf_name(arch, name)
        x = tensor.float().numpy()
        if layout.startswith("rope") and spec.rope_permuted:
            x = permute_qk(x, heads[layout])
        if name.endswith("norm.weight"):
            x = x + np.float32(spec.norm_shift)
        writer.add_tensor(gname, np.ascontiguousarray(x))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "granite", "phi3", "gemma", "gemma2", "gemma3"])
def test_family_imports_with_the_source_logits(tmp_path: Path, arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lmcraft.hub import load_model

    meta = spm_metadata(prefix=not arch.startswith("gemma"), shuffle_scores=False)
    model_class, config = _family(arch)
    config.vocab_size = len(meta["tokenizer.ggml.tokens"])
    torch.manual_seed(0)
    source = model_class(config).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.1)
    _write(tmp_path / "tiny.gguf", arch, source, meta)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)

    ids = torch.randint(5, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(ids).logits
        imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(imported) is model_class
        torch.testing.assert_close(imported(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_model(out, head="lm", dtype=torch.float32).eval()(ids).logits, expected,
                                   rtol=1e-4, atol=1e-4)
        if arch in ("qwen3", "phi3", "gemma2", "gemma3"):  # transformers reads these GGUF architectures itself
            reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
            torch.testing.assert_close(reference.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)
