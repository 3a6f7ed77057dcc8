"""Reading a config: strict YAML parsing and validation errors that name the key.

Problems raise :class:`~blinaprofile.errors.ConfigError` naming the file and the key
(``gates.3.dims: field required``); a misspelt key gets the closest known one
(``compensaton: unknown key; did you mean `compensation`?``) and a value outside a fixed set
of choices gets the choices and what each is for.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import Composer

from blinaprofile.errors import ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "STRICT_LOADER",
    "PythonStrictLoader",
    "choice_notes",
    "load_config",
    "parse_yaml",
    "validate_config",
]


def _inner(annotation: Any) -> list[Any]:
    """The types an annotation allows (``Annotated``, ``Optional`` and unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _inner(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for a in typing.get_args(annotation) for t in _inner(a)]
    return [annotation]


def _annotation_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation of the value at ``loc`` inside ``model`` (``None`` if unknown)."""
    current: Any = model
    for part in loc:
        nxt = None
        for t in _inner(current):
            origin = typing.get_origin(t)
            if isinstance(t, type) and issubclass(t, BaseModel) and isinstance(part, str):
                f = t.model_fields.get(part)
                nxt = f.annotation if f is not None else None
            elif origin in (list, tuple) and isinstance(part, int):
                nxt = typing.get_args(t)[0]
            elif origin is dict and isinstance(part, str):
                nxt = typing.get_args(t)[1]
            if nxt is not None:
                break
        if nxt is None:
            return None
        current = nxt
    return current


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The pydantic ``FieldInfo`` of the key at ``loc`` (``None`` if ``loc`` is no field)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    for t in _inner(_annotation_at(model, loc[:-1])):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t.model_fields.get(loc[-1])
    return None


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """``unknown key``, with the closest key the model knows there."""
    keys = [
        k
        for t in _inner(_annotation_at(model, loc[:-1]))
        if isinstance(t, type) and issubclass(t, BaseModel)
        for k in t.model_fields
    ]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return f"unknown key; did you mean `{close[0]}`?" if close else "unknown key"


def choice_notes(info: Any) -> dict[str, str]:
    """``choice -> what it is for`` of a field with a fixed set of choices (may be empty)."""
    extra = getattr(info, "json_schema_extra", None)
    notes = extra.get("choices") if isinstance(extra, dict) else None
    return {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


def _bad_choice(model: type[BaseModel], e: Any) -> str:
    """A value outside a ``Literal``: the choices, the closest one and what each is for."""
    loc = tuple(e["loc"])
    choices = [str(a) for t in _inner(_annotation_at(model, loc)) for a in typing.get_args(t)] or [
        c.strip("'") for c in str(e.get("ctx", {}).get("expected", "")).split("' or '")
    ]
    value = e.get("input")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    quoted = [f"`{c}`" for c in choices]
    use = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    text = f"{shown} is not allowed{hint}: use {use}"
    notes = choice_notes(_field_at(model, loc))
    if notes:
        text += "; " + ", ".join(f"`{k}` {v}" for k, v in notes.items())
    return text


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(model, tuple(e["loc"]))
        elif e["type"] in ("literal_error", "enum"):
            msg = _bad_choice(model, e)
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_config[M: BaseModel](
    model: type[M], data: Any, *, source: str | os.PathLike[str] | None = None
) -> M:
    """Validate an already-parsed mapping, raising :class:`ConfigError` naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(data).__name__}", path=source
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid {model.__name__}: {_format_validation_error(err, model)}", path=source
        ) from None


#: Largest configuration file accepted (configs are a few kB; this stops accidents).
MAX_CONFIG_BYTES = 1_000_000


class PythonStrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (Python scanner and parser) refusing duplicate keys."""


def _strict_loader() -> type[yaml.SafeLoader] | type[yaml.CSafeLoader]:
    """The strict loader on ``yaml.CSafeLoader`` (libyaml's C scanner and parser), or
    :class:`PythonStrictLoader` when PyYAML was built without libyaml."""
    if not hasattr(yaml, "CSafeLoader"):
        return PythonStrictLoader

    class CStrictLoader(Composer, yaml.CSafeLoader):
        """``yaml.CSafeLoader`` refusing duplicate keys, with PyYAML's Python composer.

        libyaml scans and parses; nodes are composed (:class:`yaml.composer.Composer`,
        first in the method order) and constructed in Python, so a document nested too
        deeply raises ``RecursionError``: libyaml's own composer recurses in C and would
        crash the process instead.
        """

        def __init__(self, stream: str) -> None:
            yaml.CSafeLoader.__init__(self, stream)
            Composer.__init__(self)

    return CStrictLoader


def _construct_mapping(
    loader: yaml.SafeLoader | yaml.CSafeLoader, node: yaml.MappingNode
) -> dict[Any, Any]:
    # keys written in this mapping (not brought in by a ``<<: *anchor`` merge, which they
    # may override as YAML allows)
    explicit = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    written: set[Any] = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in written and id(key_node) in explicit
        except TypeError:  # an unhashable key (a list or mapping used as a key)
            raise yaml.constructor.ConstructorError(
                None, None, "a list or mapping cannot be a key", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        if id(key_node) in explicit:
            written.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


#: The loader :func:`parse_yaml` uses (safe: no Python tags; no duplicate keys).
STRICT_LOADER = _strict_loader()
PythonStrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)
if STRICT_LOADER is not PythonStrictLoader:
    STRICT_LOADER.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
    )


def parse_yaml(text: str, *, source: str | os.PathLike[str] | None = None) -> Any:
    """Parse YAML text safely (no Python tags, no duplicate keys).

    Raises
    ------
    ConfigError
        Naming ``source`` and the line of the problem.
    """
    try:
        return yaml.load(text, Loader=STRICT_LOADER)  # safe construction only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(err.problem or err.context or "syntax error").split())
        raise ConfigError(f"not valid YAML{where}: {what}", path=source) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}", path=source) from None
    except RecursionError:
        raise ConfigError("not valid YAML: nested too deeply", path=source) from None
    except (ValueError, TypeError, OverflowError) as err:
        # e.g. a date-like value that is not a real date (2024-13-45)
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}", path=source) from None


def load_config[M: BaseModel](model: type[M], path: str | os.PathLike[str]) -> M:
    """Read a YAML file and validate it as ``model``.

    Raises
    ------
    ConfigError
        The file is missing, is not valid YAML, or does not match the model; the
        message names the file and the offending key.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ConfigError("not a regular file (a folder?)", path=p)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file is {size} bytes; configs are small YAML files "
                f"(limit {MAX_CONFIG_BYTES})",
                path=p,
            )
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("config file not found", path=p) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", path=p) from None
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror or err}", path=p) from None
    data = parse_yaml(text, source=p)
    return validate_config(model, data, source=p)
