"""The building blocks every PEFT method shares: wrapper layers, prefix/prompt providers, and finding the modules
a method targets.

Two ways a method changes a model, and nothing else (no monkey patching):

- **Wrapper layers** (`AdapterLayer`): a module of the base model (a projection, a whole attention or MLP sub-layer,
  the head) is swapped for a wrapper that holds it as `base_layer` and adds its own parameters. Every adapter
  parameter lives in a container keyed by the adapter's name (`lora_A["default"]`), so one model can carry several
  named adapters and switch between them.
- **Providers**: prefix tuning and prompt tuning leave the modules alone and feed the model through its own
  contract: per-layer `prefix` key/values, or `inputs_embeds` with virtual tokens in front (see `PeftModel`).

Names. An adapter tensor is named by the module path in the base model, without the `base_layer` hops of wrappers
and without the adapter name: `model.layers.0.self_attn.q_proj.lora_A.weight`. `target_modules` may name modules
in our spelling or in the Hugging Face spelling of the model's family (`hub/names.py`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lmcraft.errors import LmcraftError
from lmcraft.hub.names import NAME_TABLES
from lmcraft.models.model import Prefix


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


def _matches(path: str, targets: str | list[str] | tuple[str, ...]) -> bool:
    """A list of names matches a path equal to one or ending with "." + one; a string is one regular expression
    matched against the whole path (PEFT's convention)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def hf_module_names(root: nn.Module) -> Callable[[str], str | None]:
    """Our module path -> its Hugging Face path in the family's name table (`hub/names.py`), None when it has none."""
    table = NAME_TABLES.get(getattr(getattr(root, "config", None), "model_type", ""))
    head = getattr(root, "head_kind", "lm")
    return lambda path: table.hf_module(path, head) if table is not None else None


def find_modules(root: nn.Module, targets: str | list[str] | tuple[str, ...],
                 accept: tuple[type, ...]) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Outermost modules of a type in `accept` whose clean path matches `targets`, in our names or in the Hugging
    Face names of the model's family (`query`, `c_attn`, `lm_head`, ...; a packed HF module such as GPT-2's
    `c_attn` names every projection it packs). Returns (parent, attribute, module, clean path).
    """
    hf_name = hf_module_names(root)
    found = []
    for path, module in base_modules(root):
        if not path or path.split(".")[-1] == "base_layer" or not isinstance(module, accept):
            continue
        cpath = clean_path(path)
        hf = hf_name(cpath)
        if _matches(cpath, targets) or (hf is not None and _matches(hf, targets)):
            parent_path, _, attr = path.rpartition(".")
            found.append((root.get_submodule(parent_path), attr, module, cpath))
    return found


def wrap_targets(root: nn.Module, targets: str | list[str] | tuple[str, ...], accept: tuple[type, ...],
                 wrapper: type[AdapterLayer], what: str) -> list[tuple[AdapterLayer, str]]:
    """Wrap every matching module in `wrapper` (reusing an existing one); returns (wrapper, clean path) pairs."""
    found = find_modules(root, targets, (*accept, AdapterLayer))
    for _, _, module, cpath in found:  # exact types: a LoRA variant's wrapper takes adapters of that variant only
        if isinstance(module, AdapterLayer) and type(module) is not wrapper and not isinstance(module, accept):
            raise PeftError(f"{what}: {cpath} already carries a {type(module).__name__} adapter of another method; "
                            f"methods that wrap the same module cannot be stacked.")
    if not found:
        hf_name = hf_module_names(root)
        paths = [clean_path(p) for p, m in base_modules(root) if p and isinstance(m, accept)]
        ours = sorted({p.rsplit(".", 1)[-1] for p in paths})
        hf = sorted({h.rsplit(".", 1)[-1] for h in map(hf_name, paths) if h is not None})
        raise PeftError(f"{what}: no module matches target_modules={targets!r}; modules of a suitable type here "
                        f"are named {', '.join(ours) or '(none)'} (lmcraft names) or "
                        f"{', '.join(hf) or '(none)'} (Hugging Face names).")
    out = []
    for parent, attr, module, cpath in found:
        if type(module) is not wrapper:
            module = wrapper(module)
            setattr(parent, attr, module)
        out.append((module, cpath))
    return out
