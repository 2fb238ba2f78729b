"""Stage configs: pydantic models read from YAML, with `dotted.key=value` overrides.

Every stage declares a `StageConfig` subclass. `load_config` reads the YAML file, applies the
command-line overrides, and validates everything before any work starts; any problem becomes a
`ConfigError` whose message names the key, what was given and what is allowed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from lmcraft.errors import ConfigError, InputFileError, LmcraftError
from lmcraft.io import excerpt, parse_yaml, read_yaml

__all__ = [
    "StageConfig",
    "Section",
    "ExistingPath",
    "ExistingFile",
    "PeftOptions",
    "named_options",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "validate_config",
]

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """A nested block of a config: unknown keys are errors, values are checked on assignment, and no number may be
    infinite or NaN (`trainer.lr=.inf` would train an all-NaN model)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class StageConfig(Section):
    """Top-level config of one CLI stage."""


def _must_exist(path: Path) -> Path:
    if not Path(path).expanduser().exists():
        raise ValueError(f"path does not exist: {path}")
    return Path(path).expanduser()


def _must_be_file(path: Path) -> Path:
    path = _must_exist(path)
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    return path


ExistingPath = Annotated[Path, AfterValidator(_must_exist)]
ExistingFile = Annotated[Path, AfterValidator(_must_be_file)]


def named_options(builder: str) -> Any:
    """The type of a "name -> that thing's options" block (`peft: {method: lora, r: 8}`), checked while the config
    loads by building the thing: `builder` is the dotted path `module:function` of the registry's constructor,
    imported only when a config is validated (so config classes stay torch-free). Whatever the builder refuses
    becomes the key's error in the one config-error format (`key 'peft': ...`)."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        import importlib

        module, function = builder.split(":")
        try:
            getattr(importlib.import_module(module), function)(value)
        except (LmcraftError, TypeError, ValueError) as err:
            raise ValueError(str(err).rstrip(".")) from None
        return value

    return Annotated[dict[str, Any], AfterValidator(check)]


# A PEFT method and its options (`lmcraft.peft`'s registry), in every stage that trains with one.
PeftOptions = named_options("lmcraft.peft.registry:check_stage_options")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "c=[x, y]"]` into `{"a.b": 1, "c": ["x", "y"]}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.lr=3e-4)")
        try:
            out[key.strip()] = parse_yaml(raw, f"override {key.strip()}=") if raw.strip() else ""
        except InputFileError as err:
            raise ConfigError(f"override {excerpt(item)}: {err.expected}") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key in a nested dict, creating intermediate dicts as needed."""
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}={value!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at `loc`, to suggest the right key for a typo."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
        else:
            return []
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _format_validation_error(
    err: ValidationError, model: type[BaseModel], source: str, ignore: Callable[[dict], bool] | None = None
) -> str:
    lines = []
    for e in err.errors():
        if ignore is not None and ignore(e):
            continue
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {key!r}.{hint} Allowed keys here: {', '.join(allowed)}.")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}.")
        else:
            given = e.get("input")
            given_txt = f" (given: {excerpt(repr(given))})" if not isinstance(given, dict | list) else ""
            lines.append(f"key {key!r}: {e['msg']}{given_txt}.")
    return f"invalid config {source}: " + " ".join(lines) if lines else ""


def validate_config(cls: type[C], data: dict[str, Any], source: str = "") -> C:
    """Validate a plain dict against a config class, raising `ConfigError` with readable text."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, cls, source or cls.__name__)) from None


def precheck_config(cls: type[BaseModel], data: dict[str, Any], source: str,
                    pending_paths: Callable[[str], bool]) -> None:
    """Validate now a config whose files may only exist later: missing paths for which `pending_paths(path)`
    is true (outputs of earlier pipeline stages) are accepted; any other problem raises `ConfigError`."""

    def later(e: dict) -> bool:
        return "does not exist" in str(e.get("msg", "")) and pending_paths(str(e.get("input", "")))

    try:
        cls.model_validate(data)
    except ValidationError as err:
        message = _format_validation_error(err, cls, source, ignore=later)
        if message:
            raise ConfigError(message) from None


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read `path` (YAML) if given, apply `key=value` overrides, validate as `cls`."""
    data: dict[str, Any] = {}
    source = "(overrides)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = read_yaml(p, "config")
        except InputFileError as err:
            raise ConfigError(f"config {p}, {err.where}: {err.expected}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {p} must be a mapping of keys to values, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, parse_overrides(overrides or []))
    return validate_config(cls, data, source)


def describe_config(cls: type[BaseModel], indent: int = 2) -> str:
    """Every key of a config class as an indented tree: `key: type = default  description` (for --help)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], depth: int) -> None:
        for name, info in model.model_fields.items():
            nested = _section_type(info.annotation)
            pad = " " * (indent * depth)
            if nested is not None:
                many = "list of" if "list[" in str(info.annotation) else ""
                doc = f"  # {info.description}" if info.description else ""
                lines.append(f"{pad}{name}: {many}{doc}".rstrip())
                walk(nested, depth + 1)
                continue
            name = info.alias or name
            default = "required" if info.is_required() else f"= {_short(info.get_default(call_default_factory=True))}"
            doc = f"  # {info.description}" if info.description else ""
            lines.append(f"{pad}{name}: {_type_name(info.annotation)} {default}{doc}")

    walk(cls, 1)
    return "config keys:\n" + "\n".join(lines)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "")
    return re.sub(r"Annotated\[(\w+), .*?\]\]?", r"\1", text)


def _short(value: Any) -> str:
    text = str(value) if isinstance(value, Path) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
