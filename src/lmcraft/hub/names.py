"""Parameter names: Hugging Face checkpoint keys <-> lmcraft keys, one template table per family.

A `Rule` pairs one HF key template with one or more of our key templates. `{name}` placeholders match
one dotted component and carry over to the other side. Most rules are renames; a rule with several of
our keys fuses them: HF stores them concatenated along dim 0 (GPT-2's `c_attn` holds q, k, v stacked).
`transpose` marks GPT-2's Conv1D weights, stored (in, out) where nn.Linear stores (out, in), so

    ours = split_0(hf^T)        hf = cat_0(ours)^T

`aliases` are further HF keys holding the same tensor: all are written, the first one present is read
(BERT's MLM bias is both `cls.predictions.bias` and `cls.predictions.decoder.bias`).

`chunk=(k, n)` marks a stacked tensor of ours, (E, ...) with one slice per expert, that HF stores per expert under
a key with `{e}`: HF tensor e is chunk k of n of our slice e along its first dim (Qwen3-MoE's
`experts.{e}.gate_proj`/`up_proj` are the two halves of our `experts.gate_up_proj[e]`):

    hf_e = chunk_k(ours[e], n)          ours[e] = cat_k(hf_e of every rule with that chunk)

Every family uses this one mechanism in both directions; `plan` expands a table over a concrete model.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from lmcraft.errors import ModelLoadError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@functools.cache
def _compile(template: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(template)  # literal, name, literal, name, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^.]+)" for i, p in enumerate(parts))
    return re.compile(regex)


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    hf: str
    transpose: bool = False
    aliases: tuple[str, ...] = ()
    chunk: tuple[int, int] | None = None

    def match(self, name: str) -> dict[str, str] | None:
        for template in self.ours:
            m = _compile(template).fullmatch(name)
            if m:
                return m.groupdict()
        return None


def rule(ours: str | tuple[str, ...], hf: str, transpose: bool = False, aliases: tuple[str, ...] = (),
         chunk: tuple[int, int] | None = None) -> Rule:
    return Rule(ours if isinstance(ours, tuple) else (ours,), hf, transpose, aliases, chunk)


@dataclass(frozen=True)
class Entry:
    """One HF tensor and the parameter(s) of ours it holds (or, with `expert`, the slice of our stacked one)."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False
    aliases: tuple[str, ...] = ()
    expert: int | None = None
    chunk: tuple[int, int] = (0, 1)

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return (self.hf, *self.aliases)

    def hf_shape(self, shapes: Mapping[str, torch.Size]) -> tuple[int, ...]:
        """The shape the HF tensor must have, given the shapes of our parameters."""
        if self.expert is not None:
            rows, *rest = shapes[self.ours[0]][1:]
            return (rows // self.chunk[1], *rest)
        first = tuple(shapes[self.ours[0]])
        shape = (sum(shapes[o][0] for o in self.ours), *first[1:])
        return tuple(reversed(shape)) if self.transpose else shape

    def to_ours(self, tensor: torch.Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        t = tensor.t() if self.transpose else tensor
        if len(self.ours) == 1:
            return {self.ours[0]: t.contiguous()}
        parts = t.split([shapes[o][0] for o in self.ours], dim=0)
        return {o: p.clone(memory_format=torch.contiguous_format) for o, p in zip(self.ours, parts, strict=True)}

    def put(self, tensor: torch.Tensor, shapes: Mapping[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
        """Store the HF `tensor` in `state` under our name(s): an expert slice goes into our stacked tensor."""
        if self.expert is None:
            state.update(self.to_ours(tensor, shapes))
            return
        name = self.ours[0]
        if name not in state:
            state[name] = tensor.new_empty(shapes[name])
        state[name][self.expert].chunk(self.chunk[1])[self.chunk[0]].copy_(tensor)

    def to_hf(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.expert is not None:
            return tensors[self.ours[0]][self.expert].chunk(self.chunk[1])[self.chunk[0]].contiguous()
        parts = [tensors[o] for o in self.ours]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return (t.t() if self.transpose else t).contiguous()


@dataclass(frozen=True)
class NameTable:
    """A family's key layout."""

    prefix: str  # backbone prefix in checkpoints with a head; bare backbones (LlamaModel, BertModel) omit it
    backbone: tuple[Rule, ...]
    heads: dict[str, tuple[Rule, ...]]
    tied: dict[str, str] = field(default_factory=dict)  # head -> HF key of the output matrix tied to the embedding
    ignored: tuple[str, ...] = ()  # regexes of HF keys holding buffers or duplicates, never loaded
    legacy: tuple[tuple[str, str], ...] = ()  # regex renames of old HF key spellings, applied when loading

    def normalise(self, keys: Iterable[str]) -> dict[str, str]:
        """Checkpoint key -> the spelling the rules use (legacy names fixed, backbone prefix added if absent)."""
        keys = list(keys)
        bare = not any(k.startswith(self.prefix) for k in keys)
        out = {}
        for key in keys:
            name = key
            for pattern, repl in self.legacy:
                name = re.sub(pattern, repl, name)
            out[key] = self.prefix + name if bare else name
        return out

    def is_ignored(self, hf_key: str) -> bool:
        return any(re.fullmatch(p, hf_key) for p in self.ignored)

    def hf_module(self, module: str, head: str) -> str | None:
        """Our module path -> the path of the HF module holding its parameters (None when the layout has none).

        `model.layers.0.attn_norm` -> `model.layers.0.input_layernorm` (Llama), `head` -> `lm_head`;
        a module packed into a larger HF one maps to that one (GPT-2's q/k/v projections -> `...attn.c_attn`).
        """
        rules = self.backbone + self.heads.get(head, ())
        for param in ("weight", "bias"):
            for r in rules:
                groups = r.match(f"{module}.{param}")
                if groups is not None:
                    return r.hf.format(**groups).rpartition(".")[0]
        return None


def plan(table: NameTable, head: str, shapes: Mapping[str, torch.Size], family: str) -> list[Entry]:
    """The HF tensors for a model whose (deduplicated) parameters have these shapes, in model order."""
    if head not in table.heads:
        raise ModelLoadError(f"a {head!r} head has no Hugging Face {family} layout; heads that do: "
                             f"{', '.join(table.heads)}.")
    rules = table.backbone + table.heads[head]
    names = list(shapes)
    present, entries, seen = set(names), [], set()
    for name in names:
        for r in rules:
            groups = r.match(name)
            if groups is not None:
                break
        else:
            raise ModelLoadError(f"parameter {name!r} has no place in the Hugging Face {family} layout (merge or "
                                 "remove adapters before saving, or pick a head the family supports).")
        if r.chunk is not None:  # one entry per expert and chunk, from every chunk rule of this name
            parts = [c for c in rules if c.chunk is not None and c.match(name) is not None]
            entries += [Entry(c.hf.format(**groups, e=e), (name,), expert=e, chunk=c.chunk)
                        for e in range(shapes[name][0]) for c in parts]
            continue
        hf = r.hf.format(**groups)
        if hf in seen:
            continue
        ours = tuple(t.format(**groups) for t in r.ours)
        absent = [o for o in ours if o not in present]
        if absent:
            raise ModelLoadError(f"{hf} packs {', '.join(ours)}, but the model lacks {', '.join(absent)}.")
        seen.add(hf)
        entries.append(Entry(hf, ours, r.transpose, tuple(a.format(**groups) for a in r.aliases)))
    return entries


_L = "model.layers.{i}"


def _rope_table(norms: dict[str, str], *fused: Rule) -> NameTable:
    """The Llama-like layout: HF names equal ours except the block norms (`norms`: ours -> HF, per layer) and the
    heads; `fused` rules (tried first) pack several of our projections into one HF matrix."""
    return NameTable(
        prefix="model.",
        backbone=(
            rule("model.embed_tokens.weight", "model.embed_tokens.weight"),
            *(rule(f"{_L}.{ours}.weight", f"{_L}.{hf}.weight") for ours, hf in norms.items()),
            *fused,
            rule(f"{_L}.{{block}}.{{proj}}.{{param}}", f"{_L}.{{block}}.{{proj}}.{{param}}"),  # q/k norms too
            rule("model.norm.weight", "model.norm.weight"),
        ),
        heads={
            "lm": (rule("head.weight", "lm_head.weight"),),
            "cls": (rule("head.classifier.weight", "score.weight"),),
            "reward": (rule("head.score.weight", "score.weight"),),
            "token_cls": (rule("head.classifier.{param}", "score.{param}"),),
            "value": (rule("head.score.{param}", "score.{param}"),),
        },
        tied={"lm": "lm_head.weight"},
        ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    )


# Llama, Mistral, Qwen2/3, Granite, SmolLM3 and Gemma share their names with ours except the two norms and the heads.
ROPE_FAMILY = _rope_table({"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"})
# OLMo 2 norms the sub-layer outputs only.
OLMO2 = _rope_table({"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"})
# Gemma 2/3 sandwich each sub-layer between two norms.
GEMMA2 = _rope_table({"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
                      "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"})
# Qwen3-MoE: a MoE layer's router is `mlp.gate` (our name too); HF stores each expert's projections separately
# (`mlp.experts.{e}.gate_proj.weight`, ...), lmcraft (like transformers 5 in memory) stacks them over experts.
_X = f"{_L}.mlp.experts"
QWEN3_MOE = _rope_table(
    {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    rule(f"{_X}.gate_up_proj", f"{_X}.{{e}}.gate_proj.weight", chunk=(0, 2)),
    rule(f"{_X}.gate_up_proj", f"{_X}.{{e}}.up_proj.weight", chunk=(1, 2)),
    rule(f"{_X}.down_proj", f"{_X}.{{e}}.down_proj.weight", chunk=(0, 1)),
)
# Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (rows stacked in that order); lmcraft
# splits them on load and stacks them on save, and PEFT's `qkv_proj`/`gate_up_proj` name the projections they pack.
PHI3 = _rope_table(
    {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    rule(tuple(f"{_L}.self_attn.{p}_proj.weight" for p in "qkv"), f"{_L}.self_attn.qkv_proj.weight"),
    rule((f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"), f"{_L}.mlp.gate_up_proj.weight"),
)

_H = "transformer.h.{i}"
GPT2 = NameTable(
    prefix="transformer.",
    backbone=(
        rule("model.embed_tokens.weight", "transformer.wte.weight"),
        rule("model.embed_positions.weight", "transformer.wpe.weight"),
        rule(f"{_L}.attn_norm.{{param}}", f"{_H}.ln_1.{{param}}"),
        rule(f"{_L}.mlp_norm.{{param}}", f"{_H}.ln_2.{{param}}"),
        rule(tuple(f"{_L}.self_attn.{p}_proj.weight" for p in "qkv"), f"{_H}.attn.c_attn.weight", transpose=True),
        rule(tuple(f"{_L}.self_attn.{p}_proj.bias" for p in "qkv"), f"{_H}.attn.c_attn.bias"),
        rule(f"{_L}.self_attn.o_proj.weight", f"{_H}.attn.c_proj.weight", transpose=True),
        rule(f"{_L}.self_attn.o_proj.bias", f"{_H}.attn.c_proj.bias"),
        rule(f"{_L}.mlp.up_proj.weight", f"{_H}.mlp.c_fc.weight", transpose=True),
        rule(f"{_L}.mlp.up_proj.bias", f"{_H}.mlp.c_fc.bias"),
        rule(f"{_L}.mlp.down_proj.weight", f"{_H}.mlp.c_proj.weight", transpose=True),
        rule(f"{_L}.mlp.down_proj.bias", f"{_H}.mlp.c_proj.bias"),
        rule("model.norm.{param}", "transformer.ln_f.{param}"),
    ),
    heads={
        "lm": (rule("head.weight", "lm_head.weight"),),
        "cls": (rule("head.classifier.weight", "score.weight"),),
        "reward": (rule("head.score.weight", "score.weight"),),
        "token_cls": (rule("head.classifier.{param}", "classifier.{param}"),),
        "value": (rule("head.score.{param}", "classifier.{param}"),),
    },
    tied={"lm": "lm_head.weight"},
    ignored=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),  # causal-mask buffers of old checkpoints
)


def _bert_backbone(root: str) -> tuple[Rule, ...]:
    """BERT's backbone names under `root` (bert, roberta, electra share them)."""
    b = f"{root}.encoder.layer.{{i}}"
    return (
        rule("model.embed_tokens.weight", f"{root}.embeddings.word_embeddings.weight"),
        rule("model.embed_positions.weight", f"{root}.embeddings.position_embeddings.weight"),
        rule("model.embed_types.weight", f"{root}.embeddings.token_type_embeddings.weight"),
        rule("model.embed_norm.{param}", f"{root}.embeddings.LayerNorm.{{param}}"),
        rule(f"{_L}.self_attn.q_proj.{{param}}", f"{b}.attention.self.query.{{param}}"),
        rule(f"{_L}.self_attn.k_proj.{{param}}", f"{b}.attention.self.key.{{param}}"),
        rule(f"{_L}.self_attn.v_proj.{{param}}", f"{b}.attention.self.value.{{param}}"),
        rule(f"{_L}.self_attn.o_proj.{{param}}", f"{b}.attention.output.dense.{{param}}"),
        rule(f"{_L}.attn_norm.{{param}}", f"{b}.attention.output.LayerNorm.{{param}}"),
        rule(f"{_L}.mlp.up_proj.{{param}}", f"{b}.intermediate.dense.{{param}}"),
        rule(f"{_L}.mlp.down_proj.{{param}}", f"{b}.output.dense.{{param}}"),
        rule(f"{_L}.mlp_norm.{{param}}", f"{b}.output.LayerNorm.{{param}}"),
    )


def _mlm_head(transform: str, norm: str, decoder: str, bias_aliases: tuple[str, ...] = ()) -> tuple[Rule, ...]:
    """An encoder's MLM head under HF's module names: `transform` (dense) and `norm` (their weight and bias), and
    `decoder`, the vocabulary projection (its weight tied to the embeddings, its bias the vocabulary bias)."""
    return (
        rule("head.transform.{param}", f"{transform}.{{param}}"),
        rule("head.norm.{param}", f"{norm}.{{param}}"),
        rule("head.bias", f"{decoder}.bias", aliases=bias_aliases),
        rule("head.decoder.weight", f"{decoder}.weight"),
    )


BERT = NameTable(
    prefix="bert.",
    backbone=_bert_backbone("bert"),
    heads={
        "mlm": _mlm_head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                         "cls.predictions.decoder", bias_aliases=("cls.predictions.bias",)),
        "cls": (
            rule("head.pooler.{param}", "bert.pooler.dense.{param}"),
            rule("head.classifier.{param}", "classifier.{param}"),
        ),
        "token_cls": (rule("head.classifier.{param}", "classifier.{param}"),),
        "qa": (rule("head.qa_outputs.{param}", "qa_outputs.{param}"),),
    },
    tied={"mlm": "cls.predictions.decoder.weight"},
    ignored=(r"bert\.embeddings\.position_ids",),  # a buffer
    legacy=((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")),
)

# ---- encoder families beyond BERT: RoBERTa (BERT's names, own heads), DistilBERT, ELECTRA ----
# RoBERTa and ELECTRA classify from h[:, 0] through `classifier.dense` + `classifier.out_proj` (no pooler).
_ENCODER_CLS = (rule("head.pooler.{param}", "classifier.dense.{param}"),
                rule("head.classifier.{param}", "classifier.out_proj.{param}"))
_TOKEN_CLS = (rule("head.classifier.{param}", "classifier.{param}"),)
_QA = (rule("head.qa_outputs.{param}", "qa_outputs.{param}"),)

ROBERTA = NameTable(
    prefix="roberta.",
    backbone=_bert_backbone("roberta"),
    heads={
        "mlm": _mlm_head("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder",
                         bias_aliases=("lm_head.bias",)),  # decoder.bias is the one used
        "cls": _ENCODER_CLS, "token_cls": _TOKEN_CLS, "qa": _QA,
    },
    tied={"mlm": "lm_head.decoder.weight"},
    ignored=(r"roberta\.embeddings\.(position_ids|token_type_ids)",),
)

_D = "distilbert.transformer.layer.{i}"
DISTILBERT = NameTable(
    prefix="distilbert.",
    backbone=(
        rule("model.embed_tokens.weight", "distilbert.embeddings.word_embeddings.weight"),
        rule("model.embed_positions.weight", "distilbert.embeddings.position_embeddings.weight"),
        rule("model.embed_norm.{param}", "distilbert.embeddings.LayerNorm.{param}"),
        rule(f"{_L}.self_attn.q_proj.{{param}}", f"{_D}.attention.q_lin.{{param}}"),
        rule(f"{_L}.self_attn.k_proj.{{param}}", f"{_D}.attention.k_lin.{{param}}"),
        rule(f"{_L}.self_attn.v_proj.{{param}}", f"{_D}.attention.v_lin.{{param}}"),
        rule(f"{_L}.self_attn.o_proj.{{param}}", f"{_D}.attention.out_lin.{{param}}"),
        rule(f"{_L}.attn_norm.{{param}}", f"{_D}.sa_layer_norm.{{param}}"),
        rule(f"{_L}.mlp.up_proj.{{param}}", f"{_D}.ffn.lin1.{{param}}"),
        rule(f"{_L}.mlp.down_proj.{{param}}", f"{_D}.ffn.lin2.{{param}}"),
        rule(f"{_L}.mlp_norm.{{param}}", f"{_D}.output_layer_norm.{{param}}"),
    ),
    heads={
        "mlm": _mlm_head("vocab_transform", "vocab_layer_norm", "vocab_projector"),
        "cls": (rule("head.pooler.{param}", "pre_classifier.{param}"),
                rule("head.classifier.{param}", "classifier.{param}")),
        "token_cls": _TOKEN_CLS, "qa": _QA,
    },
    tied={"mlm": "vocab_projector.weight"},
    ignored=(r"distilbert\.embeddings\.position_ids",),
)

ELECTRA = NameTable(
    prefix="electra.",
    backbone=(*_bert_backbone("electra"), rule("model.embed_proj.{param}", "electra.embeddings_project.{param}")),
    heads={
        "rtd": (rule("head.dense.{param}", "discriminator_predictions.dense.{param}"),
                rule("head.dense_prediction.{param}", "discriminator_predictions.dense_prediction.{param}")),
        "mlm": _mlm_head("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head"),
        "cls": _ENCODER_CLS, "token_cls": _TOKEN_CLS, "qa": _QA,
    },
    tied={"mlm": "generator_lm_head.weight"},
    ignored=(r"electra\.embeddings\.(position_ids|token_type_ids)",),
)

_MB = "model.layers.{i}"
MODERNBERT = NameTable(
    prefix="model.",
    backbone=(
        rule("model.embed_tokens.weight", "model.embeddings.tok_embeddings.weight"),
        rule("model.embed_norm.{param}", "model.embeddings.norm.{param}"),
        rule(tuple(f"{_L}.self_attn.{p}_proj.{{param}}" for p in "qkv"), f"{_MB}.attn.Wqkv.{{param}}"),
        rule(f"{_L}.self_attn.o_proj.{{param}}", f"{_MB}.attn.Wo.{{param}}"),
        rule(f"{_L}.attn_norm.{{param}}", f"{_MB}.attn_norm.{{param}}"),
        rule(f"{_L}.mlp_norm.{{param}}", f"{_MB}.mlp_norm.{{param}}"),
        rule((f"{_L}.mlp.gate_proj.{{param}}", f"{_L}.mlp.up_proj.{{param}}"), f"{_MB}.mlp.Wi.{{param}}"),
        rule(f"{_L}.mlp.down_proj.{{param}}", f"{_MB}.mlp.Wo.{{param}}"),
        rule("model.norm.{param}", "model.final_norm.{param}"),
    ),
    heads={
        "mlm": _mlm_head("head.dense", "head.norm", "decoder"),
        "cls": (rule("head.pooler.{param}", "head.dense.{param}"), rule("head.pool_norm.{param}", "head.norm.{param}"),
                rule("head.classifier.{param}", "classifier.{param}")),
        "token_cls": (rule("head.dense.{param}", "head.dense.{param}"), rule("head.norm.{param}", "head.norm.{param}"),
                      rule("head.classifier.{param}", "classifier.{param}")),
    },
    tied={"mlm": "decoder.weight"},
)

# model_type -> its table (the rope-family table also stands for models of an unknown type)
NAME_TABLES: dict[str, NameTable] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "gemma"), ROPE_FAMILY),
    "qwen3_moe": QWEN3_MOE, "olmo2": OLMO2, "phi3": PHI3, "gemma2": GEMMA2, "gemma3_text": GEMMA2, "gpt2": GPT2,
    "bert": BERT,
    # encoder families beyond BERT
    "roberta": ROBERTA, "distilbert": DISTILBERT, "electra": ELECTRA, "modernbert": MODERNBERT,
}
