"""safetensors files of a model folder: find and index them, read tensors, write (sharded) ones atomically.

Only safetensors are read: a pickle checkpoint (`pytorch_model.bin`) can run code when opened, so a folder
holding only that is refused with instructions to convert it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmcraft.errors import ModelLoadError
from lmcraft.io import read_json, staged_files, write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch cannot hold (e.g. F8 variants of old builds)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    index = folder / INDEX
    if index.is_file():
        data = read_json(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index}: not a safetensors index (expected a 'weight_map' object of tensor name "
                                 "-> shard file name).")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        outside = [str(f.relative_to(folder)) for f in files if f.resolve().parent != folder.resolve()]
        if outside:
            raise ModelLoadError(f"{index}: weight_map names file(s) outside the model folder ({', '.join(outside)}); "
                                 "shards must sit in the folder itself.")
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} lists shard(s) missing from the folder: {', '.join(absent)}.")
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); lmcraft loads safetensors only, since "
            "opening a pickle can run code. Convert once with transformers, e.g. AutoModelForCausalLM."
            "from_pretrained(folder).save_pretrained(out_folder) (it writes model.safetensors).")
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise ModelLoadError(f"{folder}: no {SINGLE} or {INDEX} (found: {found}).")


def index_tensors(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's safetensors file(s): key -> file, shape, dtype (headers only; no data read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder.")
    out: dict[str, TensorInfo] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = f.get_slice(key)
                    out[key] = TensorInfo(file, tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e}). Re-download or re-save "
                                 "the model.") from None
    return out


def common_float_dtype(tensors: dict[str, TensorInfo]) -> torch.dtype:
    """The floating dtype holding most of the parameters (the checkpoint's storage dtype)."""
    counts: Counter[torch.dtype] = Counter()
    for info in tensors.values():
        if info.dtype is not None and info.dtype.is_floating_point:
            counts[info.dtype] += int(torch.Size(info.shape).numel())
    return counts.most_common(1)[0][0] if counts else torch.float32


class TensorReader:
    """Reads tensors of one safetensors file with plain positioned reads into freshly allocated tensors.

    Each tensor gets storage of its own (aligned, as a fresh tensor's; the same matmul sums as any other tensor),
    and the file is never memory-mapped, so loading holds the model's weights once: a mapped file's touched pages
    count as resident memory beside the copies until it is closed, which doubled the peak while loading.
    Layout: 8 bytes little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets: [b, e]}},
    then the data; offsets count from the end of the header.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self.fh = open(file, "rb")  # noqa: SIM115 - closed by __exit__
        try:
            n = int.from_bytes(self.fh.read(8), "little")
            self.header = json.loads(self.fh.read(n))
            self.base = 8 + n
        except (ValueError, UnicodeDecodeError) as e:
            self.fh.close()
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e}).") from None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self.header[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.file}: tensor {key} has dtype {info['dtype']}, which lmcraft cannot load.")
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if end - begin != nbytes:
            raise ModelLoadError(f"{self.file}: tensor {key} holds {end - begin} bytes, its shape and dtype need "
                                 f"{nbytes}; the file is corrupt.")
        self.fh.seek(self.base + begin)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        if nbytes and self.fh.readinto(view) != nbytes:
            raise ModelLoadError(f"{self.file}: truncated safetensors file (tensor {key} ends past the end).")
        return out


def open_tensors(file: Path) -> TensorReader:
    """A `TensorReader` on `file` (errors name the file); use as a context manager."""
    return TensorReader(file)


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "2GB" (decimal, as Hugging Face) or "1GiB" (binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {size!r}; write e.g. 500MB, 2GB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    """Write tensors in order into shards of at most `max_bytes` (a bigger tensor gets a shard of its own).

    One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus the index
    `model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: file}}).
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
    write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX]


def _is_weight_file(name: str) -> bool:
    return name == INDEX or (name.startswith("model") and name.endswith(".safetensors"))


def staged_folder(out_dir: Path) -> AbstractContextManager[Path]:
    """`io.staged_files` for a model folder: a new one appears whole; into an existing one the files move in one by
    one (config.json last), weight files of an earlier save that the new one lacks (other shards) go, and any
    other file in the folder stays."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelLoadError(f"{out_dir} exists and is not a folder.")
    return staged_files(out_dir, stale=_is_weight_file, last="config.json")
