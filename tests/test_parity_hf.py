"""Parity with transformers: tiny random HF models load into lmcraft with the same logits, and the reverse.

Every family (llama, mistral with a sliding window that matters, qwen2 with q/k/v biases, gpt2, bert MLM
and sequence classification; roberta, distilbert, electra and modernbert with each of their heads; qwen3, olmo2,
granite, smollm3, phi3, gemma, gemma2, gemma3 text with each of their switches set so that it matters), RoPE
scaling (llama3, linear), tied/untied embeddings, GQA and shards; for the newer decoder families also saving back,
cached decoding and PEFT target names.
Weights are re-drawn with std 0.1 (norm gains 1 +- 0.1) so that logits are O(1) and 1e-4 is a real bound.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lmcraft import hub
from lmcraft.models import LanguageModel, ModelConfig, preset

pytestmark = pytest.mark.parity

TOL = 1e-4
V, T = 96, 12
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)
ROPE = dict(SMALL, num_key_value_heads=2, pad_token_id=0)
MEASURED: dict[str, float] = {}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter ~ N(0, 0.1); norm gains ~ N(1, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                is_gain = name == "weight" and p.ndim == 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_gain else 0.0))
    return model.eval()


def batch(padding: str | None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (2, T) avoiding the pad id 0, and a mask whose first row is padded on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, T), generator=g)
    if padding is None:
        return ids, None
    mask = torch.ones(2, T, dtype=torch.long)
    if padding == "left":
        mask[0, :5] = 0
    else:
        mask[0, -5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions counting real tokens only: what lmcraft uses by default for a padded batch."""
    return None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)


def diff(name: str, ours: torch.Tensor, theirs: torch.Tensor, where: torch.Tensor | None = None) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = (ours - theirs).detach().abs()
    if where is not None:
        err = err[where.bool()]
    value = float(err.max())
    MEASURED[name] = max(MEASURED.get(name, 0.0), value)
    assert value < TOL, f"{name}: max abs diff {value:.2e}"
    return value


def hf_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def our_logits(model: LanguageModel, ids: torch.Tensor, mask: torch.Tensor | None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


def compare_causal_lm(name: str, hf_model: nn.Module, ours: LanguageModel) -> None:
    for padding in (None, "left", "right"):
        ids, mask = batch(padding)
        theirs = hf_logits(hf_model, ids, mask, position_ids=positions(mask))
        where = None if mask is None else mask
        diff(name, our_logits(ours, ids, mask), theirs, where)


def hf_to_ours(tmp_path: Path, hf_model: nn.Module, **save_kw) -> LanguageModel:
    folder = tmp_path / "hf"
    randomize(hf_model).save_pretrained(folder, **save_kw)
    return hub.load_model(folder)


@pytest.fixture(scope="module")
def transformers():  # noqa: ANN201 - the module; imported here so that collecting this file stays cheap
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def report() -> None:
    yield
    print("\nmax abs logit diff vs transformers:", {k: f"{v:.1e}" for k, v in sorted(MEASURED.items())})


# ---- HF -> lmcraft ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama", "llama-tied", "llama-rope-llama3", "llama-rope-linear", "mistral",
                                  "qwen2"])
def test_rope_family_from_hf(transformers, tmp_path: Path, case: str) -> None:
    extra = {
        "llama": {},
        "llama-tied": {"tie_word_embeddings": True},
        "llama-rope-llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
        "llama-rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        "mistral": {"sliding_window": 4},
        "qwen2": {},
    }[case]
    family = case.split("-")[0]
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    hf_model = model_cls(config_cls(**ROPE, **extra))
    ours = hf_to_ours(tmp_path, hf_model)
    assert ours.config.model_type == family and ours.config.num_kv_heads == 2
    if case == "mistral":
        assert ours.config.sliding_window == 4  # T=12 > 4: the window changes the logits
    if case == "qwen2":
        assert ours.config.qkv_bias and not ours.config.out_bias
    if case == "llama-tied":
        assert ours.head.weight is ours.model.embed_tokens.weight
    compare_causal_lm(case, hf_model, ours)


def test_sliding_window_matters() -> None:
    """Guards the mistral case above: the same weights without the window give different logits."""
    cfg = ModelConfig(model_type="mistral", vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, sliding_window=4, tie_word_embeddings=False)
    windowed = randomize(LanguageModel(cfg))
    full = LanguageModel(ModelConfig(**{**cfg.to_dict(), "sliding_window": None})).eval()
    full.load_state_dict(windowed.state_dict())
    ids, _ = batch(None)
    assert (our_logits(windowed, ids, None) - our_logits(full, ids, None)).abs().max() > 1e-2


def test_gpt2_from_hf(transformers, tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                  eos_token_id=2)
    hf_model = transformers.GPT2LMHeadModel(cfg)
    ours = hf_to_ours(tmp_path, hf_model)
    assert ours.config.activation == "gelu_tanh" and ours.config.intermediate_size == 256
    compare_causal_lm("gpt2", hf_model, ours)


def bert_config(transformers, **kw) -> object:  # noqa: ANN001
    return transformers.BertConfig(**{**SMALL, "type_vocab_size": 2, **kw})


def compare_bert(name: str, hf_model: nn.Module, ours: LanguageModel) -> None:
    for padding in (None, "right"):
        ids, mask = batch(padding)
        types = torch.zeros_like(ids)
        types[:, T // 2:] = 1
        theirs = hf_logits(hf_model, ids, mask, token_type_ids=types)
        mine = our_logits(ours, ids, mask, token_type_ids=types)
        diff(name, mine, theirs, mask if mine.dim() == 3 and mask is not None else None)


@pytest.mark.parametrize("tied", [True, False])
def test_bert_mlm_from_hf(transformers, tmp_path: Path, tied: bool) -> None:
    hf_model = transformers.BertForMaskedLM(bert_config(transformers, tie_word_embeddings=tied))
    ours = hf_to_ours(tmp_path, hf_model)
    assert ours.head_kind == "mlm"
    assert (ours.head.decoder.weight is ours.model.embed_tokens.weight) == tied
    compare_bert("bert-mlm" + ("" if tied else "-untied"), hf_model, ours)


def test_bert_classifier_from_hf(transformers, tmp_path: Path) -> None:
    hf_model = transformers.BertForSequenceClassification(bert_config(transformers, num_labels=3))
    ours = hf_to_ours(tmp_path, hf_model)
    assert ours.head_kind == "cls" and ours.config.num_labels == 3
    compare_bert("bert-cls", hf_model, ours)


def test_bert_question_answering_both_ways(transformers, tmp_path: Path) -> None:
    """`BertForQuestionAnswering` loads as a `qa` head with the same start/end logits, and ours saves as one."""
    hf_model = transformers.BertForQuestionAnswering(bert_config(transformers))
    ours = hf_to_ours(tmp_path, hf_model)
    assert ours.head_kind == "qa"
    for padding in (None, "right"):
        ids, mask = batch(padding)
        with torch.no_grad():
            theirs = hf_model(input_ids=ids, attention_mask=mask)
        mine = our_logits(ours, ids, mask)
        diff("bert-qa", mine, torch.stack([theirs.start_logits, theirs.end_logits], -1), mask)
    hub.save_model(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == "BertForQuestionAnswering"
    ids, mask = batch("right")
    with torch.no_grad():
        theirs = again(input_ids=ids, attention_mask=mask)
    diff("save:bert-qa", our_logits(ours, ids, mask), torch.stack([theirs.start_logits, theirs.end_logits], -1), mask)


def test_bare_bert_gets_new_classifier(transformers, tmp_path: Path) -> None:
    """BertModel has no head: lmcraft keeps its pooler, adds a fresh classifier and says so."""
    hf_model = randomize(transformers.BertModel(bert_config(transformers)))
    hf_model.save_pretrained(tmp_path / "bare")
    with pytest.warns(hub.HubWarning, match="newly initialised.*head.classifier.weight"):
        ours = hub.load_model(tmp_path / "bare")
    assert ours.head_kind == "cls"
    ids, mask = batch("right")
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask)
        mine = ours(ids, attention_mask=mask)
    diff("bert-bare-hidden", mine.hidden_states, theirs.last_hidden_state, mask)
    pooled = torch.tanh(ours.head.pooler(mine.hidden_states[:, 0]))
    diff("bert-bare-pooler", pooled, theirs.pooler_output)


def test_decoder_classifier_from_hf(transformers, tmp_path: Path) -> None:
    hf_model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**ROPE, num_labels=3))
    ours = hf_to_ours(tmp_path, hf_model)
    assert ours.head_kind == "cls"
    for padding in (None, "right"):
        ids, mask = batch(padding)
        diff("llama-cls", our_logits(ours, ids, mask), hf_logits(hf_model, ids, mask))


def test_sharded_hf_checkpoint(transformers, tmp_path: Path) -> None:
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ROPE))
    ours = hf_to_ours(tmp_path, hf_model, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    compare_causal_lm("llama-sharded", hf_model, ours)


# ---- newer families: HF -> lmcraft -> HF, cached decoding, PEFT target names ----------------------------

_WINDOWED = ("full_attention", "sliding_attention")  # layer 0 global, layer 1 a 4-token window (T = 12)
_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# case: (HF config class, HF causal-LM class, config keys beyond ROPE, what lmcraft must read, PEFT targets)
FAMILY_CASES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1),
              dict(qk_norm="head", layer_types=_WINDOWED), _PROJECTIONS),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(eos_token_id=2),
              dict(qk_norm="full", pre_norm=False, post_norms=True), _PROJECTIONS),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_scale=0.1, logits_scaling=4.0),
                _PROJECTIONS),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4, bos_token_id=1,
                     eos_token_id=2),
                dict(nope_layers=(1,), layer_types=_WINDOWED), _PROJECTIONS),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(eos_token_id=2), dict(qkv_bias=False),
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16),
              dict(norm_unit_offset=True, embedding_multiplier=8.0, activation="gelu_tanh"), _PROJECTIONS),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0),
               dict(post_norms=True, attention_scale=24**-0.5, attn_logit_softcap=2.0, final_logit_softcap=3.0,
                    layer_types=_WINDOWED[::-1]), _PROJECTIONS),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24, layer_types=list(_WINDOWED[::-1])),
               dict(qk_norm="head", post_norms=True, rope_theta=1e6, rope_local_theta=1e4), _PROJECTIONS),
}


def cached_logits(model: LanguageModel, ids: torch.Tensor, mask: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a prefill of `prompt` tokens, then one cached step per token, through the decode fast path."""
    from lmcraft.generate import fast_decoding

    cache = model.new_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad(), fast_decoding(model):
        out = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache).logits]
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
    return torch.cat(out, dim=1)


def hf_lora_modules(transformers, hf_model: nn.Module, targets: list[str]) -> set[str]:  # noqa: ANN001
    """The modules PEFT (the reference) wraps in the HF model for these target names."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(hf_model, peft.LoraConfig(r=2, target_modules=targets)).base_model.model
    return {name for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_parity(transformers, tmp_path: Path, case: str) -> None:
    from lmcraft import peft
    from lmcraft.generate import GenerationConfig, generate
    from lmcraft.peft.layers import hf_module_names

    config_name, model_name, keys, switches, targets = FAMILY_CASES[case]
    hf_model = getattr(transformers, model_name)(getattr(transformers, config_name)(**ROPE, **keys))
    ours = hf_to_ours(tmp_path, hf_model)
    assert {k: getattr(ours.config, k) for k in switches} == switches
    compare_causal_lm(case, hf_model, ours)

    # saved by lmcraft, read by transformers, logits equal; and read back by lmcraft unchanged
    hub.save_model(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(hf_model)
    compare_causal_lm(f"save:{case}", again, ours)
    reread = hub.load_model(tmp_path / "out").config
    assert {**reread.to_dict(), "extra": {}} == {**ours.config.to_dict(), "extra": {}}  # extra gains id2label

    # the KV cache (prefill 6, then 6 single-token steps, window 4) computes what the full forward does
    ids, mask = batch("left")
    diff(f"cache:{case}", cached_logits(ours, ids, mask, 6), our_logits(ours, ids, mask), mask)
    # greedy generation (cached) = transformers' greedy tokens
    prompt = batch(None)[0][1:, :6]
    tokens = generate(ours, prompt, GenerationConfig(max_new_tokens=5, eos_token_ids=())).tokens[0]
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, 6:]
    assert tokens == expected.tolist()

    # PEFT target names: the HF names lmcraft wraps are the modules PEFT wraps in the HF model
    hf_names = hf_module_names(ours)
    lora = peft.apply(ours, {"method": "lora", "r": 2, "target_modules": targets})
    mine = {hf_names(path.replace(".base_layer", "")) for path, _ in lora.adapter_layers()}
    assert mine == hf_lora_modules(transformers, hf_model, targets)


@pytest.mark.parametrize("switch", ["qk_norm", "post_norms", "norm_unit_offset", "nope_layers", "rope_local_theta",
                                    "embedding_multiplier", "residual_multiplier", "attention_scale",
                                    "attn_logit_softcap", "logits_scaling", "final_logit_softcap", "layer_types"])
def test_switches_matter(switch: str) -> None:
    """Guards the family cases above: each switch, on the same weights, changes the logits."""
    base = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                sliding_window=4, layer_types=("full_attention", "full_attention"))
    value = {"qk_norm": "head", "post_norms": True, "norm_unit_offset": True, "nope_layers": (1,),
             "rope_local_theta": 50.0, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
             "attention_scale": 0.5, "attn_logit_softcap": 1.0, "logits_scaling": 4.0, "final_logit_softcap": 1.0,
             "layer_types": _WINDOWED}[switch]
    if switch == "rope_local_theta":
        base["layer_types"] = _WINDOWED
        base["sliding_window"] = 64  # a window that masks nothing: only the local RoPE base differs
    on = randomize(LanguageModel(ModelConfig(**{**base, switch: value})))
    off = LanguageModel(ModelConfig(**base)).eval()
    state = on.state_dict()
    off.load_state_dict({k: v for k, v in state.items() if k in off.state_dict()})
    ids, _ = batch(None)
    assert (our_logits(on, ids, None) - our_logits(off, ids, None)).abs().max() > 1e-2


# ---- lmcraft -> HF ---------------------------------------------------------------------------------------

TINY = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=None, head_dim=None,
            intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
REVERSE = {
    "llama": (dict(TINY, num_kv_heads=2, tie_word_embeddings=False), "lm"),
    "llama-tied": (dict(TINY, num_kv_heads=2, tie_word_embeddings=True), "lm"),
    "llama-biases": (dict(TINY, qkv_bias=True, out_bias=True, mlp_bias=True), "lm"),
    "llama-rope-llama3": (dict(TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                          "lm"),
    "mistral": (dict(TINY, model_type="mistral", num_kv_heads=2, sliding_window=4, tie_word_embeddings=False), "lm"),
    "qwen2": (dict(TINY, model_type="qwen2", num_kv_heads=2, qkv_bias=True), "lm"),
    "llama-cls": (dict(TINY, num_labels=3), "cls"),
    "llama-reward": (dict(TINY), "reward"),
    "llama-token-cls": (dict(TINY, num_labels=5), "token_cls"),
    "gpt2": ({**preset("gpt2-tiny").to_dict(), **TINY, "tie_word_embeddings": True}, "lm"),
    "bert-mlm": ({**preset("bert-tiny").to_dict(), **TINY}, "mlm"),
    "bert-mlm-untied": ({**preset("bert-tiny").to_dict(), **TINY, "tie_word_embeddings": False}, "mlm"),
    "bert-cls": ({**preset("bert-tiny").to_dict(), **TINY, "num_labels": 3}, "cls"),
}
AUTO = {"lm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "cls": "AutoModelForSequenceClassification",
        "reward": "AutoModelForSequenceClassification", "token_cls": "AutoModelForTokenClassification"}


@pytest.mark.parametrize("case", list(REVERSE))
def test_lmcraft_to_hf(transformers, tmp_path: Path, case: str) -> None:
    fields, head = REVERSE[case]
    ours = randomize(LanguageModel(ModelConfig(**fields), head))
    hub.save_model(ours, tmp_path / "out", max_shard_size="30KB" if case == "llama" else "2GB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = getattr(transformers, AUTO[head]).from_pretrained(tmp_path / "out").eval()
    ids, mask = batch("right" if ours.config.arch == "encoder" or head != "lm" else "left")
    kw = {} if ours.config.arch == "encoder" else {"position_ids": positions(mask)}
    theirs = hf_logits(theirs_model, ids, mask, **kw)
    mine = our_logits(ours, ids, mask)
    if head == "reward":
        theirs = theirs.squeeze(-1)
    diff(f"save:{case}", mine, theirs, mask if mine.dim() == 3 else None)
    ids, _ = batch(None)
    diff(f"save:{case}", our_logits(ours, ids, None), hf_logits(theirs_model, ids, None).reshape(
        our_logits(ours, ids, None).shape))
    # and back: what we wrote loads into lmcraft unchanged
    again = hub.load_model(tmp_path / "out")
    assert again.head_kind == head
    assert torch.equal(our_logits(again, ids, None), our_logits(ours, ids, None))


# ---- real checkpoints (assets) ---------------------------------------------------------------------------


def encode(folder: Path, texts: list[str], side: str, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenizers import Tokenizer

    rows = [Tokenizer.from_file(str(folder / "tokenizer.json")).encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append(row + [pad] * fill if side == "right" else [pad] * fill + row)
        mask.append([1] * len(row) + [0] * fill if side == "right" else [0] * fill + [1] * len(row))
    return torch.tensor(ids), torch.tensor(mask)


TEXTS = ["The capital of France is Paris.", "Hello world"]


@pytest.mark.slow
def test_real_minilm_bert(transformers, tmp_path: Path) -> None:
    from lmcraft.assets import fetch

    folder = fetch("minilm-l6", progress=False)
    with pytest.warns(hub.HubWarning, match="newly initialised"):
        ours = hub.load_model(folder)  # a bare BertModel: encoder + pooler, new classifier
    theirs = transformers.BertModel.from_pretrained(folder).eval()
    ids, mask = encode(folder, TEXTS, "right", 0)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        diff("minilm-l6-hidden", ours(ids, attention_mask=mask).hidden_states, expected, mask)
    hub.save_model(ours, tmp_path / "cls", tokenizer_dir=folder)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    diff("minilm-l6-cls-saved", our_logits(ours, ids, mask), hf_logits(reloaded, ids, mask))


@pytest.mark.slow
def test_real_smollm2_llama(transformers) -> None:
    from lmcraft.assets import fetch

    folder = fetch("smollm2-135m-instruct", progress=False)
    ours = hub.load_model(folder)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids, mask = encode(folder, TEXTS, "left", ours.config.pad_token_id)
    expected = hf_logits(theirs, ids, mask, position_ids=positions(mask))
    mine = our_logits(ours, ids, mask)
    err = float((mine - expected).abs()[mask.bool()].max())
    MEASURED["smollm2-135m"] = err
    assert err < 1e-3 * float(expected.abs().max()), err  # logits reach ~30: a relative bound


# ---- encoder families beyond BERT: roberta, distilbert, electra (HF -> lmcraft -> HF) -------------------

MODERNBERT = dict(SMALL, num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=6, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
ENCODER_CLASSES = {"mlm": "ForMaskedLM", "cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
                   "rtd": "ForPreTraining"}
ENCODER_CASES = ["roberta-mlm", "roberta-mlm-untied", "roberta-cls", "roberta-token_cls", "distilbert-mlm",
                 "distilbert-cls", "distilbert-token_cls", "electra-rtd", "electra-mlm", "electra-cls",
                 "electra-token_cls", "electra-rtd-same-width", "roberta-mlm-relu", "electra-mlm-relu",
                 "modernbert-mlm", "modernbert-cls", "modernbert-cls-mean", "modernbert-token_cls",
                 "modernbert-mlm-biases"]


def encoder_model(transformers, case: str) -> nn.Module:  # noqa: ANN001
    """A tiny random HF model of the case's family and head; pad id 0 (the padding `batch` writes)."""
    family, head = case.split("-")[:2]
    kw = {"num_labels": 3 if head == "cls" else 5, "pad_token_id": 0, "tie_word_embeddings": "untied" not in case}
    if case.endswith("relu"):  # the body's activation; RoBERTa's and ELECTRA's MLM heads keep GELU
        kw["hidden_act"] = "relu"
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                               max_position_embeddings=64, **kw)
        prefix = "DistilBert"
    elif family == "roberta":
        config = transformers.RobertaConfig(**SMALL, type_vocab_size=2, **kw)
        prefix = "Roberta"
    elif family == "modernbert":  # T=12 > local_attention // 2 = 3: the local window changes the logits
        biases = dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True) \
            if "biases" in case else {}
        pooling = "mean" if "mean" in case else "cls"
        config = transformers.ModernBertConfig(**{**MODERNBERT, **kw, **biases}, classifier_pooling=pooling)
        prefix = "ModernBert"
    else:  # narrower embeddings, projected to the hidden width (embeddings_project), unless same-width
        config = transformers.ElectraConfig(**SMALL, embedding_size=64 if "same-width" in case else 32, **kw)
        prefix = "Electra"
    return getattr(transformers, prefix + ENCODER_CLASSES[head])(config)


def compare_encoder(name: str, hf_model: nn.Module, ours: LanguageModel) -> None:
    """Unpadded and right-padded rows; token types (segment B in the second half) where the family has them."""
    for padding in (None, "right"):
        ids, mask = batch(padding)
        kw = {}
        if ours.config.type_vocab_size:
            kw["token_type_ids"] = torch.zeros_like(ids)
            kw["token_type_ids"][:, T // 2:] = 1
        theirs = hf_logits(hf_model, ids, mask, **kw)
        mine = our_logits(ours, ids, mask, **kw)
        diff(name, mine, theirs, mask if mine.dim() >= 2 and mine.shape[1] == T and mask is not None else None)


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_encoder_family_both_ways(transformers, tmp_path: Path, case: str) -> None:
    """HF -> lmcraft with the same logits; lmcraft -> HF opens as the same class with the same logits; our Linear
    modules carry the HF module names (PEFT target_modules) of modules that exist in the HF model."""
    from lmcraft.peft.layers import hf_module_names

    family, head = case.split("-")[:2]
    hf_model = encoder_model(transformers, case)
    ours = hf_to_ours(tmp_path, hf_model)
    assert (ours.config.model_type, ours.head_kind) == (family, head)
    if family == "roberta":
        assert ours.config.position_offset == 1  # padding_idx 0 + 1
    if case.startswith("electra") and "same-width" not in case:
        assert ours.config.embedding_size == 32 and hasattr(ours.model, "embed_proj")
    if head == "mlm":
        assert (ours.head.decoder.weight is ours.model.embed_tokens.weight) == ("untied" not in case)
    if family == "modernbert":
        full, local = "full_attention", "sliding_attention"
        assert ours.config.layer_types == (full, local, full) and ours.config.sliding_window == 6
        assert (ours.config.rope_theta, ours.config.rope_local_theta) == (160000.0, 10000.0)
        global_only = LanguageModel(ModelConfig(**{**ours.config.to_dict(), "layer_types": None,
                                                   "sliding_window": None}), head).eval()
        global_only.load_state_dict(ours.state_dict())
        ids, _ = batch(None)  # the local window and the local RoPE base both change the logits
        assert (our_logits(global_only, ids, None) - our_logits(ours, ids, None)).abs().max() > 1e-3
    compare_encoder(case, hf_model, ours)

    hub.save_model(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(hf_model).from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == type(hf_model).__name__
    compare_encoder(f"save:{case}", again, ours)
    assert torch.equal(our_logits(hub.load_model(tmp_path / "out"), *batch("right")),
                       our_logits(ours, *batch("right")))

    hf_modules = dict(hf_model.named_modules())
    names = hf_module_names(ours)
    linears = [path for path, m in ours.named_modules() if isinstance(m, nn.Linear)]
    for path in linears:
        assert isinstance(hf_modules.get(names(path)), nn.Linear), (path, names(path))


def test_electra_objective_saves_its_discriminator(transformers, tmp_path: Path) -> None:
    """`rtd` pre-training of a BERT-layout config keeps a discriminator that opens as `ElectraForPreTraining` with
    the same per-token logits."""
    from lmcraft.objectives.electra import ReplacedTokenDetection
    from lmcraft.objectives.mlm import MaskingConfig

    objective = ReplacedTokenDetection(MaskingConfig(vocab_size=V, mask_token_id=3))
    cfg = ModelConfig(**{**preset("bert-tiny").to_dict(), **TINY})
    kept = randomize(objective.kept_model(objective.build_model(cfg)))
    assert (kept.config.model_type, kept.head_kind) == ("electra", "rtd")
    hub.save_model(kept, tmp_path / "disc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "disc").eval()
    assert type(theirs).__name__ == "ElectraForPreTraining"
    compare_encoder("save:electra-rtd-objective", theirs, kept)


@pytest.mark.parametrize(("case", "targets"), [("roberta-mlm", ["query", "value", "dense"]),
                                               ("distilbert-token_cls", ["q_lin", "v_lin", "lin1"]),
                                               ("electra-rtd", ["query", "embeddings_project", "dense_prediction"]),
                                               ("modernbert-mlm", ["Wo", "head.dense"])])
def test_encoder_lora_in_hf_names_opens_in_peft(transformers, tmp_path: Path, case: str, targets: list[str]) -> None:
    """LoRA on modules named the Hugging Face way, saved by lmcraft, gives the same logits under `peft`."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from lmcraft import peft as lm_peft

    hf_model = encoder_model(transformers, case)
    lora = {"method": "lora", "r": 4, "target_modules": targets, "init_lora_weights": False}
    if case.endswith("cls"):  # PEFT's TOKEN_CLS/SEQ_CLS adapters carry the task head (its modules_to_save)
        lora["modules_to_save"] = ["classifier"]
    ours = lm_peft.apply(hf_to_ours(tmp_path, hf_model), lora)
    with torch.no_grad():
        for _, p in ours.named_adapter_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_folder = tmp_path / "hf"
    lm_peft.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(hf_folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(type(hf_model).from_pretrained(hf_folder), tmp_path / "adapter").eval()
    ids, mask = batch("right")
    mine = our_logits(ours.eval(), ids, mask)
    assert (mine - hf_logits(hf_model, ids, mask)).abs().max() > 1e-2  # the adapter changes the output
    diff(f"lora:{case}", mine, hf_logits(theirs, ids, mask), mask)
