"""The building blocks every PEFT method shares: wrapper layers, prefix/prompt providers and `PeftModel`.

Two ways a method changes a model, and nothing else (no monkey patching):

- **Wrapper layers** (`AdapterLayer`): a module of the base model (a projection, a whole attention or MLP sub-layer,
  the head) is swapped for a wrapper that holds it as `base_layer` and adds its own parameters. Every adapter
  parameter lives in a container keyed by the adapter's name (`lora_A["default"]`), so one model can carry several
  named adapters and switch between them.
- **Providers**: prefix tuning and prompt tuning leave the modules alone and feed the model through its own
  contract: per-layer `prefix` key/values, or `inputs_embeds` with virtual tokens in front. `PeftModel.forward`
  (same signature as `LanguageModel.forward`) asks the active adapter's provider for them.

Names. An adapter tensor is named by the module path in the base model, without the `base_layer` hops of wrappers
and without the adapter name: `model.layers.0.self_attn.q_proj.lora_A.weight`. Those are Hugging Face PEFT's names
after its `base_model.model.` prefix, for the Llama family whose module names we share.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lmcraft.errors import LmcraftError
from lmcraft.models.model import ModelOutput, Prefix, default_position_ids

if TYPE_CHECKING:
    from lmcraft.peft.base import MethodConfig

PER_TOKEN_HEADS = frozenset({"lm", "mlm", "token_cls", "value"})


class PeftError(LmcraftError):
    """A PEFT configuration or adapter folder does not fit the model, or an operation is not possible."""


def clean_path(path: str) -> str:
    """A module path without the `base_layer` hops that wrappers insert."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


class AdapterLayer(nn.Module):
    """A module wrapping `base_layer`; subclasses keep per-adapter parameters in `adapter_containers`.

    Each container is an `nn.ModuleDict` or `nn.ParameterDict` keyed by adapter name. `active` names the adapter
    used in forward (None = behave exactly like `base_layer`).
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active: str | None = None

    def has_adapter(self, adapter: str) -> bool:
        return any(adapter in getattr(self, c) for c in self.adapter_containers)

    def adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name without the adapter key, parameter) for one adapter: `lora_A.weight`, `ia3_l`, ..."""
        for cname in self.adapter_containers:
            container = getattr(self, cname)
            if adapter not in container:
                continue
            item = container[adapter]
            if isinstance(item, nn.Parameter):
                yield cname, item
            else:
                for n, p in item.named_parameters():
                    yield f"{cname}.{n}", p

    def delete_adapter(self, adapter: str) -> None:
        for cname in self.adapter_containers:
            container = getattr(self, cname)
            if adapter in container:
                del container[adapter]

    def merged(self, adapter: str) -> nn.Module:
        """The module that replaces this wrapper once `adapter` is folded into the base weights."""
        if not self.has_adapter(adapter):
            return self.base_layer
        return self.merge_adapter(adapter)

    def merge_adapter(self, adapter: str) -> nn.Module:
        raise PeftError(f"{type(self).__name__} cannot be merged into the base weights: the adapter's function "
                        f"is not linear in the layer input; keep the adapter as a separate module instead.")


class ModulesToSave(AdapterLayer):
    """A trainable copy of a whole module (e.g. a task head) per adapter; the original stays frozen.

    Merging replaces the original with the adapter's copy.
    """

    adapter_containers = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add(self, adapter: str) -> None:
        self.modules_to_save[adapter] = copy.deepcopy(self.base_layer)

    def adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        if adapter in self.modules_to_save:
            yield from self.modules_to_save[adapter].named_parameters()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.modules_to_save[self.active] if self.active in self.modules_to_save else self.base_layer
        return module(*args, **kwargs)

    def merge_adapter(self, adapter: str) -> nn.Module:
        return self.modules_to_save[adapter]


class PrefixProvider(nn.Module):
    """Provides per-layer key/value prefixes: a list of L pairs (1, kv_heads, P, head_dim)."""

    num_virtual_tokens: int

    def prefix(self) -> Prefix:
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        """The prefix as one tensor (P, L * 2 * kv_heads * head_dim): PEFT's `prompt_embeddings` layout."""
        raise NotImplementedError

    def load_table(self, table: torch.Tensor) -> None:
        """Replace the provider by a plain trainable table (drops any reparameterisation)."""
        raise NotImplementedError

    def fold(self) -> None:
        """Fold any reparameterisation into a plain table (same outputs)."""
        self.load_table(self.table().detach())


class PromptProvider(nn.Module):
    """Provides P virtual-token embeddings (P, hidden) placed in front of the input embeddings."""

    num_virtual_tokens: int

    def embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        return self.embeddings()

    def load_table(self, table: torch.Tensor) -> None:
        raise NotImplementedError

    def fold(self) -> None:
        self.load_table(self.table().detach())


def base_modules(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) over the base model's modules, wrappers included, but not the adapters' own internals."""
    yield path, module
    children = [("base_layer", module.base_layer)] if isinstance(module, AdapterLayer) else module.named_children()
    for name, child in children:
        yield from base_modules(child, f"{path}.{name}" if path else name)


def find_modules(root: nn.Module, targets: str | list[str] | tuple[str, ...],
                 accept: tuple[type, ...]) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Outermost modules of a type in `accept` whose clean path matches `targets`.

    `targets` is a list of names (a path matches when it equals one or ends with "." + one) or one regular
    expression matched against the whole path (PEFT's convention). Returns (parent, attribute, module, clean path).
    """
    found = []
    for path, module in base_modules(root):
        if not path or path.split(".")[-1] == "base_layer" or not isinstance(module, accept):
            continue
        cpath = clean_path(path)
        if isinstance(targets, str):
            ok = re.fullmatch(targets, cpath) is not None
        else:
            ok = any(cpath == t or cpath.endswith("." + t) for t in targets)
        if ok:
            parent_path, _, attr = path.rpartition(".")
            found.append((root.get_submodule(parent_path), attr, module, cpath))
    return found


def wrap_targets(root: nn.Module, targets: str | list[str] | tuple[str, ...], accept: tuple[type, ...],
                 wrapper: type[AdapterLayer], what: str) -> list[tuple[AdapterLayer, str]]:
    """Wrap every matching module in `wrapper` (reusing an existing one); returns (wrapper, clean path) pairs."""
    found = find_modules(root, targets, (*accept, AdapterLayer))
    for _, _, module, cpath in found:
        if isinstance(module, AdapterLayer) and not isinstance(module, (wrapper, *accept)):
            raise PeftError(f"{what}: {cpath} already carries a {type(module).__name__} adapter of another method; "
                            f"methods that wrap the same module cannot be stacked.")
    if not found:
        names = sorted({clean_path(p).rsplit(".", 1)[-1] for p, m in base_modules(root) if p and isinstance(m, accept)})
        raise PeftError(f"{what}: no module matches target_modules={targets!r}; modules of a suitable type here "
                        f"are named: {', '.join(names) or '(none)'}.")
    out = []
    for parent, attr, module, cpath in found:
        if not isinstance(module, wrapper):
            module = wrapper(module)
            setattr(parent, attr, module)
        out.append((module, cpath))
    return out


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
        past_key_values: Any = None,
        prefix: Prefix | None = None,
        use_cache: bool = False,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, past_key_values=past_key_values, prefix=prefix,
                      use_cache=use_cache, token_type_ids=token_type_ids, logits_to_keep=logits_to_keep)
        provider = self.providers[self.active_adapter] if self.active_adapter in self.providers else None
        if provider is None:
            return self.base_model(**kwargs)
        if prefix is not None:
            raise PeftError("a prefix was passed to a model whose active adapter already provides one")
        if isinstance(provider, PrefixProvider):
            return self._forward_prefix(provider, **kwargs)
        return self._forward_prompt(provider, **kwargs)

    def _forward_prefix(self, provider: PrefixProvider, **kw: Any) -> ModelOutput:
        ref = kw["input_ids"] if kw["input_ids"] is not None else kw["inputs_embeds"]
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
        ref = ids if ids is not None else embeds
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
        return ModelOutput(logits, out.hidden_states[:, p:], out.past_key_values)

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> Any:
        """A KV cache with room for the virtual tokens of a prompt-style adapter as well."""
        provider = self.providers[self.active_adapter] if self.active_adapter in self.providers else None
        extra = provider.num_virtual_tokens if isinstance(provider, PromptProvider) else 0
        return self.base_model.new_cache(batch_size, capacity + extra, dtype)
