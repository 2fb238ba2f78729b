"""Load a Hugging Face-layout model folder (config.json + safetensors) into a `LanguageModel`.

The model is built with its parameters on the meta device (no memory, no init), every checkpoint tensor
is read once (plain reads, no memory map: the weights are held once while loading) into the target dtype and
device, renamed/split by the family's name table and assigned in place (`load_state_dict(assign=True)`); then
tied weights are re-tied. Head weights a checkpoint lacks (a classifier on a bare BertModel) are freshly
initialised and reported; missing backbone weights are an error.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from lmcraft.errors import ModelLoadError
from lmcraft.hub.files import TensorInfo, common_float_dtype, index_tensors, open_tensors
from lmcraft.hub.hf_config import config_from_hf, default_head, head_from_config, read_config_json
from lmcraft.hub.names import NAME_TABLES, Entry, plan
from lmcraft.io import listing
from lmcraft.models.config import ModelConfig
from lmcraft.models.heads import make_head
from lmcraft.models.model import LanguageModel


class HubWarning(UserWarning):
    """Something in a checkpoint was skipped or newly initialised; the model still loaded."""


class ParametersOnMeta(TorchFunctionMode):
    """Build a model whose parameters live on the meta device (no memory, no init), all else for real.

    Parameters come from torch.empty/ones/zeros without a device (nn.Linear, nn.Embedding, norms), which
    are sent to meta; weight initialisation is skipped (meta tensors hold no values, and a meta `normal_`
    would import torch._dynamo, ~3 s). Buffers such as the rotary tables are computed normally.
    """

    FACTORIES = frozenset({torch.empty, torch.ones, torch.zeros})
    INITS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
                       nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.trunc_normal_,
                       nn.init.zeros_, nn.init.ones_})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch protocol
        kwargs = dict(kwargs or {})
        if func in self.INITS:
            return args[0] if args else kwargs["tensor"]
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16.")
    return value


def _fresh_head(model: LanguageModel, names: list[str], dtype: torch.dtype, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """Randomly initialised tensors (the model's init) for the given head parameter names."""
    with torch.device(device):
        head = make_head(model.head_kind, model.config)
    head.apply(model._init_weights)
    params = dict(head.named_parameters())
    return {name: params[name.removeprefix("head.")].detach().to(dtype) for name in names}


def _check_shapes(sources: dict[Entry, str], found: dict[str, TensorInfo], shapes: dict[str, torch.Size],
                  folder: Path) -> None:
    wrong = []
    for e, key in sources.items():
        if tuple(found[key].shape) != e.hf_shape(shapes):
            wrong.append(f"{key} is {list(found[key].shape)}, config.json implies {list(e.hf_shape(shapes))}")
    if wrong:
        raise ModelLoadError(f"{folder}: {len(wrong)} tensor(s) do not match config.json: {listing(wrong, 5)}.")


def folder_spec(path: str | Path, head: str | None = None, dtype: torch.dtype | str | None = None
                ) -> tuple[ModelConfig, str, torch.dtype]:
    """(config, head, dtype) that `load_model` builds for the folder `path`, from config.json and the safetensors
    headers only (no weights are read); the defaults are `load_model`'s."""
    folder = Path(path)
    hf_config = read_config_json(folder)
    cfg = config_from_hf(hf_config, str(folder / "config.json"))
    return (cfg, head or head_from_config(hf_config) or default_head(cfg.arch),
            _as_dtype(dtype) or common_float_dtype(index_tensors(folder)))


def model_on_meta(cfg: ModelConfig, head: str, dtype: torch.dtype) -> LanguageModel:
    """A `LanguageModel` whose parameters are on the meta device in `dtype` (shapes, no memory; buffers real):
    what `lmcraft plan` counts without loading a checkpoint."""
    with ParametersOnMeta():
        model = LanguageModel(cfg, head)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model.eval()


def load_model(path: str | Path, head: str | None = None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> LanguageModel:
    """A `LanguageModel` from a Hugging Face folder of a supported family, in eval mode.

    head:   lm | mlm | cls | token_cls | value | reward; None takes the checkpoint's (from `architectures`),
            or for a bare backbone `lm` (decoders) / `cls` (encoders, with a new classifier).
    dtype:  default: the checkpoint's storage dtype. device: default cpu.
    Raises ModelLoadError for an unsupported family, missing/mis-shaped tensors or corrupt files; warns
    (HubWarning) about unused checkpoint tensors and newly initialised head weights.
    """
    folder = Path(path)
    hf_config = read_config_json(folder)
    cfg = config_from_hf(hf_config, str(folder / "config.json"))
    checkpoint_head = head_from_config(hf_config)
    head = head or checkpoint_head or default_head(cfg.arch)
    table = NAME_TABLES[cfg.model_type]
    found_raw = index_tensors(folder)
    spelled = table.normalise(found_raw)  # file key -> rule spelling
    found = {spelled[k]: info for k, info in found_raw.items()}
    original = {v: k for k, v in spelled.items()}
    dtype = _as_dtype(dtype) or common_float_dtype(found_raw)
    device = torch.device(device or "cpu")

    with ParametersOnMeta():
        model = LanguageModel(cfg, head)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    entries = plan(table, head, shapes, cfg.model_type)
    sources = {e: key for e in entries for key in reversed(e.hf_keys) if key in found}  # first present key wins
    absent = [e for e in entries if e not in sources]
    fresh = [o for e in absent for o in e.ours if head != checkpoint_head and o.startswith("head.")]
    missing = [e.hf for e in absent if not all(o in fresh for o in e.ours)]
    if missing:
        raise ModelLoadError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) that its {cfg.model_type} config.json "
            f"needs with a {head!r} head: {listing(missing)}. The weights may be truncated or belong to "
            "another architecture.")
    _check_shapes(sources, found, shapes, folder)

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[Entry]] = defaultdict(list)
    for e, key in sources.items():
        by_file[found[key].file].append(e)
    with tqdm(total=len(sources), desc=f"loading {folder.name}", unit="tensor", leave=False,
              disable=None) as bar:
        for file, file_entries in by_file.items():
            with open_tensors(file) as f:
                for e in file_entries:
                    # read into a fresh tensor of its own (not a view into a file buffer, whose unaligned addresses
                    # make matmuls slower and their sums differ in the last bit), converted/moved only if needed
                    tensor = f.get_tensor(original[sources[e]]).to(dtype=dtype, device=device)
                    e.put(tensor, shapes, state)
                    del tensor
                    bar.update()
    if fresh:
        state.update(_fresh_head(model, fresh, dtype, device))
        warnings.warn(f"{folder}: newly initialised (not in the checkpoint): {listing(fresh)}; train them before "
                      "use.", HubWarning, stacklevel=2)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)  # the buffers (rotary tables); parameters are there already
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"lmcraft bug: {left} were not loaded")

    used = {key for e in entries for key in e.hf_keys}
    tied_key = table.tied.get(head) if cfg.tie_word_embeddings else None
    unexpected = [original[k] for k in found if k not in used and k != tied_key and not table.is_ignored(k)]
    if unexpected:
        warnings.warn(f"{folder}: {len(unexpected)} checkpoint tensor(s) unused by the {head!r} model: "
                      f"{listing(sorted(unexpected))}.", HubWarning, stacklevel=2)
    return model.eval()
