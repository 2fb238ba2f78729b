"""One config for every model lmcraft builds: decoders (Llama, Mistral, Qwen2/3, Qwen3-MoE, Phi-3, Granite, OLMo 2,
SmolLM3, Gemma 1/2/3, GPT-2) and encoders (BERT, RoBERTa, DistilBERT, ELECTRA).

The families differ only in switches: which norm, where it sits (pre/post/sandwich), the MLP shape (dense, or a
sparse mixture of experts on some layers), how
positions enter (rotary, learned, or none on some layers), which projections carry biases, q/k norms,
scalar multipliers and soft caps, per-layer sliding windows, and whether embeddings are tied.
`lmcraft.hub` maps each family's Hugging Face `config.json` onto these fields and back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["decoder", "encoder"]
ModelType = Literal["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "granite", "smollm3", "phi3", "gemma",
                    "gemma2", "gemma3_text", "gpt2", "bert", "roberta", "distilbert", "electra", "modernbert"]
LayerType = Literal["full_attention", "sliding_attention"]


@dataclass
class ModelConfig:
    """Hyper-parameters of a transformer.

    `head_dim` defaults to `hidden_size // num_heads`; `num_kv_heads` < `num_heads` is grouped-query
    attention (each key/value head serves `num_heads // num_kv_heads` query heads).

    Where the norms sit in a block (f = attention or MLP, n = a norm, n' = a norm of the sub-layer's output):
    `pre_norm`: x + f(n x) (Llama); `pre_norm` + `post_norms`: x + n'(f(n x)) (Gemma 2/3 "sandwich");
    `post_norms` alone: x + n'(f(x)) (OLMo 2); neither: n(x + f(x)) (BERT's post-LN).
    `layer_types` gives each layer full or sliding-window attention (None: `sliding_window`, if set, applies
    to every layer); `nope_layers` are layers whose attention has no rotary positions (SmolLM3).

    Mixture of experts (Qwen3-MoE): with `num_experts` > 0, layer i's MLP is a sparse MoE (`models.moe`) unless i is
    in `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`; each token goes to its
    `num_experts_per_tok` best experts (gated MLPs of width `moe_intermediate_size`), weighted by their router
    probabilities (renormalised over the chosen ones with `norm_topk_prob`). `router_aux_loss_coef` weighs the
    load-balancing loss in training.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    arch: Arch = "decoder"
    model_type: ModelType = "llama"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    # layout switches
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # False = post-LN (BERT): x = LN(x + f(x))
    final_norm: bool = True  # a norm after the last block (pre-LN models)
    mlp: Literal["gated", "plain"] = "gated"  # gated: down(act(gate x) * up x); plain: down(act(up x))
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm has a bias (RMSNorm never does)
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    type_vocab_size: int = 0  # BERT token types (segment A/B)
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    post_norms: bool = False  # a norm on each sub-layer's output before the residual add (see above)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + w) instead of w (Gemma)
    qk_norm: Literal["head", "full"] | None = None  # RMSNorm of q and k: per head (Qwen3, Gemma 3) or whole (OLMo 2)
    layer_types: tuple[LayerType, ...] | None = None
    nope_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3); None: rope_theta
    # mixture of experts (Qwen3-MoE); 0 experts = every MLP dense
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # scalar multipliers and soft caps (Granite, Gemma)
    embedding_multiplier: float = 1.0  # h_0 = m * E[x]
    residual_multiplier: float = 1.0  # x = x + m * f(x)
    attention_scale: float | None = None  # softmax(scale * q k^T); None: 1 / sqrt(head_dim)
    attn_logit_softcap: float | None = None  # scores = c * tanh(scores / c) before the mask (Gemma 2)
    logits_scaling: float = 1.0  # LM head logits = W h / s (Granite)
    final_logit_softcap: float | None = None  # LM head logits = c * tanh(logits / c) (Gemma 2)
    # encoder families beyond BERT
    embedding_size: int | None = None  # embedding width E when it differs from hidden_size: h_0 = W_p LN(emb) + b_p
    position_offset: int = 0  # learned positions look up E_pos[p + offset] (RoBERTa: padding_idx + 1)
    pooler_activation: Literal["tanh", "gelu", "relu"] = "tanh"  # encoder cls head: act(W_p h[:, 0] + b_p)
    pooler_dropout: bool = False  # encoder cls head: dropout before W_p too (RoBERTa, ELECTRA)
    mlm_activation: Literal["silu", "gelu", "gelu_tanh", "relu"] | None = None  # MLM head's; None: `activation`
    # ModernBERT (with `layer_types`, `rope_local_theta` and a bidirectional `sliding_window`)
    first_attn_norm: bool = True  # False: layer 0 feeds the embeddings' norm straight into attention
    cls_pooling: Literal["first", "mean"] = "first"  # encoder cls head pools h[:, 0] or the mean of real tokens
    head_norm: bool = False  # encoder cls/token_cls heads: norm(act(W_p h + b_p)) before the classifier
    head_bias: bool = True  # the bias of the MLM transform and of that W_p (ModernBERT's classifier_bias)
    mlm_decoder_bias: bool = True  # the MLM output bias b
    # regularisation and init
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    # tokens and heads
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_labels: int = 2
    classifier_dropout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we keep verbatim for saving

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.nope_layers = tuple(self.nope_layers)
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ValueError(f"unknown layer_types {sorted(unknown)}; use full_attention or sliding_attention")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"nope_layers {list(self.nope_layers)} name layers outside 0..{self.num_layers - 1}")
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be at least 1")

    @property
    def expert_size(self) -> int:
        """The intermediate width of one expert."""
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is a sparse mixture of experts."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None = full attention)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def is_causal(self) -> bool:
        return self.arch == "decoder"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**data)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the backbone + LM head, computed from the shapes (no model built)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        mlp = h * self.intermediate_size * (3 if self.mlp == "gated" else 2)
        moe = self.num_experts * 3 * h * self.expert_size + self.num_experts * h  # experts + router
        total = sum(attn + (moe if self.is_moe_layer(i) else mlp) + 2 * h for i in range(self.num_layers))
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
            if self.position == "learned":
                total += self.max_position_embeddings * h
        return total


PRESETS: dict[str, dict[str, Any]] = {
    # ~14M-parameter Llama used by tests, recipes and the generation benchmark
    "llama-14m": dict(vocab_size=8192, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2,
                      intermediate_size=896, max_position_embeddings=1024),
    "gpt2-tiny": dict(model_type="gpt2", vocab_size=8192, hidden_size=256, num_layers=6, num_heads=8,
                      intermediate_size=1024, norm="layernorm", mlp="plain", activation="gelu_tanh",
                      position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, max_position_embeddings=512),
    # a seconds-per-step Qwen3-MoE (8 experts, top-2) for the MoE recipe and its load-balance experiment
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", qk_norm="head", vocab_size=8192, hidden_size=128, num_layers=4,
                           num_heads=4, num_kv_heads=2, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=64, norm_topk_prob=True, router_aux_loss_coef=0.01,
                           max_position_embeddings=1024),
    "bert-tiny": dict(arch="encoder", model_type="bert", vocab_size=8192, hidden_size=256, num_layers=4,
                      num_heads=4, intermediate_size=1024, norm="layernorm", norm_eps=1e-12, pre_norm=False,
                      final_norm=False, mlp="plain", activation="gelu", position="learned", qkv_bias=True,
                      out_bias=True, mlp_bias=True, type_vocab_size=2, embed_norm=True, dropout=0.1,
                      attention_dropout=0.1, max_position_embeddings=512),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named model size (see PRESETS), with any field overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
