"""`PeftModel`: a base model plus named adapters, with the model's forward contract; its adapter state dicts.

Prefix-style adapters feed per-layer key/values through the model's `prefix` argument, prompt-style adapters put
virtual-token embeddings in front through `inputs_embeds`; wrapper layers (`layers.py`) need nothing here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmcraft.models.layers import KVCache
from lmcraft.models.model import ModelOutput, Prefix, default_position_ids, model_input
from lmcraft.peft.layers import (
    AdapterLayer,
    ModulesToSave,
    PeftError,
    PrefixProvider,
    PromptProvider,
    clean_path,
    wrap_targets,
)

if TYPE_CHECKING:
    from lmcraft.peft.registry import MethodConfig

PER_TOKEN_HEADS = frozenset({"lm", "mlm", "token_cls", "qa", "value", "rtd"})


class PeftModel(nn.Module):
    """A base `LanguageModel` plus named adapters; `forward` keeps the model's contract.

        model = lmcraft.peft.apply(base, {"method": "lora", "r": 8})
        out = model(input_ids)                      # adapter active
        with model.disable_adapters():              # the frozen base model (e.g. the DPO reference)
            ref = model(input_ids)
        model.set_adapter("other")                  # switch between named adapters

    Prefix-style adapters add their per-layer key/values through `prefix` and shift positions by P (the prefix
    occupies positions 0..P-1, as with Hugging Face PEFT). Prompt-style adapters put P virtual-token embeddings in
    front of the input embeddings and extend the attention mask; the returned logits and hidden states cover only
    the real tokens, so objectives use the unchanged labels. (PEFT instead returns P + T positions and pads the
    labels with -100, which also makes the last virtual token predict the first real one; here that first token is
    not a target, as in training without a prompt.) While decoding with a KV cache, `attention_mask` covers the
    real tokens (past + new); extra trailing columns are ignored.
    """

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.providers = nn.ModuleDict()
        self.peft_configs: dict[str, MethodConfig] = {}
        self.method_state: dict[str, Any] = {}  # per-adapter state that is not parameters (AdaLoRA importance)
        self.active_adapter: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- adapters --------------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def named_adapter_parameters(self, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(clean name, parameter) of one adapter (default: the active one)."""
        adapter = adapter or self.active_adapter
        for path, layer in self.adapter_layers():
            for local, p in layer.adapter_parameters(adapter):
                yield f"{clean_path(path)}.{local}", p
        if adapter in self.providers:
            for local, p in self.providers[adapter].named_parameters():
                yield f"provider.{local}", p

    def add_adapter(self, name: str, cfg: MethodConfig) -> None:
        """Build adapter `name` from `cfg`, make it the active one and the only trainable part."""
        if not name.isidentifier() or name in {"weight", "bias", "base_layer"}:
            raise PeftError(f"adapter name {name!r} must be a Python identifier other than weight/bias/base_layer")
        if name in self.peft_configs:
            raise PeftError(f"adapter {name!r} already exists; adapters here: {', '.join(self.peft_configs)}")
        cfg.inject(self, name)
        if cfg.modules_to_save:
            for layer, _ in wrap_targets(self.base_model, list(cfg.modules_to_save), (nn.Module,), ModulesToSave,
                                         "modules_to_save"):
                layer.add(name)
        self.peft_configs[name] = cfg
        self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        """Activate adapter `name`: its parameters train, everything else is frozen."""
        if name not in self.peft_configs:
            raise PeftError(f"no adapter named {name!r}; adapters here: {', '.join(self.peft_configs) or '(none)'}")
        self._activate(name)
        for p in self.parameters():
            p.requires_grad_(False)
        for _, p in self.named_adapter_parameters(name):
            if p.is_floating_point():
                p.requires_grad_(True)

    def _activate(self, name: str | None) -> None:
        self.active_adapter = name
        for _, layer in self.adapter_layers():
            layer.active = name

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the block the model computes exactly the frozen base model."""
        previous = self.active_adapter
        self._activate(None)
        try:
            yield
        finally:
            self._activate(previous)

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_configs:
            raise PeftError(f"no adapter named {name!r}")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(name)
        if name in self.providers:
            del self.providers[name]
        del self.peft_configs[name]
        self.method_state.pop(name, None)
        if self.active_adapter == name:
            self._activate(None)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        prefix: Prefix | None = None,
        use_cache: bool = False,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, past_key_values=past_key_values, prefix=prefix,
                      use_cache=use_cache, token_type_ids=token_type_ids, logits_to_keep=logits_to_keep)
        provider = self._active_provider()
        if provider is None:
            return self.base_model(**kwargs)
        if prefix is not None:
            raise PeftError("a prefix was passed to a model whose active adapter already provides one")
        if isinstance(provider, PrefixProvider):
            return self._forward_prefix(provider, **kwargs)
        return self._forward_prompt(provider, **kwargs)

    def _active_provider(self) -> PrefixProvider | PromptProvider | None:
        """The prefix or prompt provider of the active adapter (None: none active, or a method without one)."""
        return self.providers[self.active_adapter] if self.active_adapter in self.providers else None

    def _forward_prefix(self, provider: PrefixProvider, **kw: Any) -> ModelOutput:
        ref = model_input(kw["input_ids"], kw["inputs_embeds"])
        b, t = ref.shape[:2]
        p = provider.num_virtual_tokens
        if kw["position_ids"] is None:
            cache = kw["past_key_values"]
            past = cache.length if cache is not None else 0
            kw["position_ids"] = default_position_ids(kw["attention_mask"], b, t, past, ref.device) + p
        else:
            kw["position_ids"] = kw["position_ids"] + p
        kw["prefix"] = provider.prefix()
        return self.base_model(**kw)

    def _forward_prompt(self, provider: PromptProvider, **kw: Any) -> ModelOutput:
        ids, embeds, cache = kw["input_ids"], kw["inputs_embeds"], kw["past_key_values"]
        ref = model_input(ids, embeds)
        b, t = ref.shape[:2]
        p = provider.num_virtual_tokens
        decoding = cache is not None and cache.length > 0  # the virtual tokens are already in the cache
        mask = kw["attention_mask"]
        if mask is not None:
            if decoding:  # the mask covers the real tokens (past + new); trailing extra columns are ignored
                mask = mask[:, : cache.length - p + t]
            kw["attention_mask"] = torch.cat([mask.new_ones(b, p), mask], dim=1)
        if decoding:
            if kw["position_ids"] is not None:
                kw["position_ids"] = kw["position_ids"] + p
            return self.base_model(**kw)
        if embeds is None:
            embeds = self.base_model.get_input_embeddings()(ids)
        prompt = provider.embeddings().to(embeds.dtype)
        kw["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embeds], dim=1)
        kw["input_ids"] = None
        if kw["position_ids"] is not None:
            front = torch.arange(p, device=ref.device).expand(b, -1)
            kw["position_ids"] = torch.cat([front, kw["position_ids"] + p], dim=1)
        if kw["token_type_ids"] is not None:
            kw["token_type_ids"] = torch.cat([kw["token_type_ids"].new_zeros(b, p), kw["token_type_ids"]], dim=1)
        out = self.base_model(**kw)
        logits = out.logits
        if getattr(self.base_model, "head_kind", "lm") in PER_TOKEN_HEADS and logits.shape[1] > t:
            logits = logits[:, logits.shape[1] - t:]
        return ModelOutput(logits, out.hidden_states[:, p:], out.past_key_values, out.router)

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache with room for the virtual tokens of a prompt-style adapter as well."""
        provider = self._active_provider()
        extra = provider.num_virtual_tokens if isinstance(provider, PromptProvider) else 0
        return self.base_model.new_cache(batch_size, capacity + extra, dtype)


def require_adapter(model: nn.Module, adapter: str | None) -> str:
    """The name of adapter `adapter` (default: the active one) of `model`, checked to exist."""
    if not isinstance(model, PeftModel):
        raise PeftError(f"expected a model returned by lmcraft.peft.apply, got {type(model).__name__}")
    adapter = adapter or model.active_adapter
    if adapter not in model.peft_configs:
        raise PeftError(f"no adapter named {adapter!r}; adapters here: {', '.join(model.peft_configs) or '(none)'}")
    return adapter


def adapter_state_dict(model: PeftModel, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under clean names (`model.layers.0.self_attn.q_proj.lora_A.weight`, `provider.*`)."""
    adapter = require_adapter(model, adapter)
    return {n: p.detach() for n, p in model.named_adapter_parameters(adapter)}


def load_adapter_state_dict(model: PeftModel, state: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Copy `state` (clean names) into the adapter's parameters; every name must match in both directions."""
    adapter = require_adapter(model, adapter)
    params = dict(model.named_adapter_parameters(adapter))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise PeftError(f"adapter tensors do not fit adapter {adapter!r}: missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if value.shape != p.shape:
                raise PeftError(f"adapter tensor {name}: shape {tuple(value.shape)} in the file, "
                                f"{tuple(p.shape)} in the model")
            p.copy_(value.to(p.dtype))
