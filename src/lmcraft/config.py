"""Stage configs: pydantic models read from YAML, with `dotted.key=value` overrides.

Every stage declares a `StageConfig` subclass. `load_config` reads the YAML file, applies the
command-line overrides, and validates everything before any work starts; any problem becomes a
`ConfigError` whose message names the key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from lmcraft.errors import ConfigError, InputFileError, LmcraftError
from lmcraft.io import excerpt, parse_yaml, read_yaml

__all__ = [
    "StageConfig",
    "Section",
    "ExistingPath",
    "ExistingFile",
    "OptionProblem",
    "OptionsError",
    "PeftOptions",
    "build_options",
    "check_options",
    "named_options",
    "unknown_name",
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


_NO_INPUT = "<no input>"  # a problem whose value is not worth quoting (a missing key, a whole block)


@dataclasses.dataclass(frozen=True)
class OptionProblem:
    """One problem of a "name -> options" block, at `key` (a path inside the block): an unknown key or name (with
    what is `allowed` there), a missing key, or an invalid value (`message`)."""

    key: tuple[str | int, ...]
    kind: Literal["unknown_key", "unknown_name", "missing", "invalid"]
    message: str = ""
    given: Any = _NO_INPUT
    allowed: tuple[str, ...] = ()


class OptionsError(ConfigError):
    """What a named-options builder refuses (`what`: e.g. "step 'c4'", "peft method 'lora'"). Alone it reads as one
    sentence; inside a config, `named_options` reports each problem at its full key in the config-error format."""

    def __init__(self, what: str, problems: list[OptionProblem]) -> None:
        self.what, self.problems = what, problems
        super().__init__(f"{what}: " + " ".join(f"{p.message}." if not p.key else _problem_line(p.key, p)
                                                  for p in problems))


def unknown_name(what: str, key: str, given: Any, known: Iterable[str]) -> OptionsError:
    """The error for a name (`method: loraa`, `type: min_lenght`) that is none of `known`."""
    return OptionsError(what, [OptionProblem((key,), "unknown_name", what, given, tuple(known))])


def build_options(cls: type, options: dict[str, Any], what: str) -> Any:
    """`cls` (a dataclass or pydantic model) built from `options` by pydantic; an unknown key (whatever `cls`
    itself says about extra keys) and whatever pydantic refuses raise `OptionsError`, each problem at its key."""
    allowed = _option_names(cls)
    unknown = [OptionProblem((key,), "unknown_key", allowed=allowed) for key in options if key not in allowed]
    if unknown:
        raise OptionsError(what, unknown)
    try:
        return TypeAdapter(cls).validate_python(options)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            loc = tuple(e["loc"])
            if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # in a nested options class
                problems.append(OptionProblem(loc, "unknown_key", allowed=_option_names(cls, loc[:-1])))
            elif e["type"] in ("missing", "missing_argument"):
                problems.append(OptionProblem(loc, "missing"))
            else:
                problems.append(OptionProblem(loc, "invalid", e["msg"].removeprefix("Value error, ").rstrip("."),
                                              e.get("input")))
        raise OptionsError(what, problems) from None


def _field_type(cls: Any, name: str) -> Any:
    """The annotation of option `name` of `cls` (a pydantic model or a dataclass), or None."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        field = cls.model_fields.get(name)
        return field.annotation if field is not None else None
    try:
        return get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
    except (NameError, TypeError):  # an annotation only a type checker can resolve: no options class to name
        return None


def _option_names(cls: Any, path: tuple[Any, ...] = ()) -> tuple[str, ...]:
    """The option names of `cls` (a dataclass or pydantic model), or of the options class at `path` inside it
    (to list the allowed keys beside an unknown one)."""
    for part in path:
        annotation = _field_type(cls, str(part))
        candidates = (annotation, *getattr(annotation, "__args__", ()))
        cls = next((c for c in candidates if isinstance(c, type) and (dataclasses.is_dataclass(c)
                                                                      or issubclass(c, BaseModel))), None)
        if cls is None:
            return ()
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return tuple(sorted(cls.model_fields))
    if dataclasses.is_dataclass(cls):
        return tuple(sorted(f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")))
    return ()


def named_options(builder: str) -> Any:
    """The type of a "name -> that thing's options" block (`peft: {method: lora, r: 8}`, a prepare step `{type: c4,
    min_sentences: 3}`), checked while the config loads by building the thing: `builder` is the dotted path
    `module:function` of the registry's constructor, imported only when a config is validated (so config classes
    stay torch-free). An `OptionsError` of the builder is reported problem by problem at the full key
    (`unknown key 'steps.1.min_wordz'. Did you mean 'min_words'? ...`); any other refusal becomes the block's
    error (`key 'peft': ...`). The config keeps the block as written; the library builds it again at run time."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        import importlib

        module, function = builder.split(":")
        check_options(lambda: getattr(importlib.import_module(module), function)(value))
        return value

    return Annotated[dict[str, Any], AfterValidator(check)]


def check_options(build: Callable[[], Any]) -> None:
    """Inside a pydantic validator: run `build` (a block's builder on its options); an `OptionsError` becomes the
    error that `load_config` reports problem by problem at the full key, any other refusal the block's error.
    `named_options` uses it; so does a section that keeps its options as attributes (`objective:`)."""
    try:
        build()
    except OptionsError as err:
        raise PydanticCustomError("named_options", "{summary}", {"summary": str(err), "problems": err.problems}
                                  ) from None
    except (LmcraftError, TypeError, ValueError) as err:
        raise ValueError(str(err).rstrip(".")) from None


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


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _problem_line(loc: tuple[Any, ...], problem: OptionProblem) -> str:
    """One sentence of the config-error format for a problem at `loc` (its key's full path)."""
    key = _dotted(loc)
    if problem.kind in ("unknown_key", "unknown_name"):
        given = str(loc[-1]) if problem.kind == "unknown_key" else str(problem.given)
        close = difflib.get_close_matches(given, problem.allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(problem.allowed)
        if problem.kind == "unknown_key":
            return f"unknown key {key!r}.{hint}" + (f" Allowed keys here: {allowed}." if allowed else "")
        return f"key {key!r}: unknown {problem.message} {problem.given!r}.{hint} Known: {allowed}."
    if problem.kind == "missing":
        return f"missing required key {key!r}."
    given = problem.given
    quoted = given is not _NO_INPUT and not isinstance(given, dict | list)
    return f"key {key!r}: {problem.message}" + (f" (given: {excerpt(repr(given))})" if quoted else "") + "."


def _format_validation_error(
    err: ValidationError, model: type[BaseModel], source: str, ignore: Callable[[dict], bool] | None = None
) -> str:
    lines = []
    for e in err.errors():
        if ignore is not None and ignore(e):
            continue
        loc = tuple(e["loc"])
        if e["type"] == "named_options":
            lines += [_problem_line(loc + p.key, p) for p in e["ctx"]["problems"]]
        elif e["type"] == "extra_forbidden":
            allowed = _option_names(model, loc[:-1])
            lines.append(_problem_line(loc, OptionProblem(loc, "unknown_key", allowed=allowed)))
        elif e["type"] == "missing":
            lines.append(_problem_line(loc, OptionProblem(loc, "missing")))
        else:
            lines.append(_problem_line(loc, OptionProblem(loc, "invalid", e["msg"], e.get("input"))))
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
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text)
    return re.sub(r"Annotated\[(.*?), AfterValidator\([^)]*\)\]", r"\1", text)


def _short(value: Any) -> str:
    text = str(value) if isinstance(value, Path) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
