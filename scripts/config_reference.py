"""Write ``docs/config_reference.md``: every YAML key of the panel, gating, QC and training configs.

The page is generated from the typed config models (:mod:`blinaprofile.config`): each key's
type, default, constraints, description and, for a fixed set of choices, what each choice
is for. ``tests/test_config.py`` renders it again and compares it with the committed file,
so the page cannot go stale; after changing a model, run::

    .venv/bin/python scripts/config_reference.py

``--check`` exits 1 (and writes nothing) when the committed page differs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from blinaprofile.config import (
    AdaptiveSpec,
    GateSpec,
    GatingConfig,
    ModelSpec,
    PanelChannel,
    PanelConfig,
    PromotionRule,
    QCConfig,
    RangeSpec,
    ThresholdRule,
    TrainConfig,
    TransformSpec,
    choice_notes,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config_reference.md"

#: (title, where the files live, the top-level model, the models nested in it)
SECTIONS: tuple[tuple[str, str, type[BaseModel], tuple[type[BaseModel], ...]], ...] = (
    ("Panel", "configs/panels/*.yaml", PanelConfig, (PanelChannel,)),
    (
        "Gating strategy",
        "configs/gating/*.yaml",
        GatingConfig,
        (TransformSpec, GateSpec, RangeSpec, AdaptiveSpec),
    ),
    ("QC", "configs/qc.yaml", QCConfig, ()),
    ("Training", "configs/train/*.yaml", TrainConfig, (ModelSpec, ThresholdRule, PromotionRule)),
)

_SIMPLE = {str: "text", int: "integer", float: "number", bool: "true/false", Any: "any"}


def _anchor(model: type[BaseModel]) -> str:
    return f"[{model.__name__}](#{model.__name__.lower()})"


def type_text(annotation: Any) -> str:
    """A YAML-minded name of a type (``list of GateSpec``, ``number or null``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin is typing.Union or origin is types.UnionType:
        parts = [type_text(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _anchor(annotation)
    return _SIMPLE.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _metadata(info: FieldInfo) -> list[Any]:
    """Constraints of a field: its own and those inside an ``Annotated`` type."""
    out = list(info.metadata)
    stack = [info.annotation]
    while stack:
        t = stack.pop()
        origin = typing.get_origin(t)
        if origin is Annotated:
            args = typing.get_args(t)
            stack.append(args[0])
            for extra in args[1:]:
                out += extra.metadata if isinstance(extra, FieldInfo) else [extra]
        elif origin is typing.Union or origin is types.UnionType:
            stack += list(typing.get_args(t))
    return out


def constraints_text(info: FieldInfo) -> str:
    """``> 0``, ``<= 100``, ``at least 1 item``, ``pattern ...`` of a field."""
    out = []
    for m in _metadata(info):
        if isinstance(m, at.Gt):
            out.append(f"> {m.gt:g}")
        elif isinstance(m, at.Ge):
            out.append(f">= {m.ge:g}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt:g}")
        elif isinstance(m, at.Le):
            out.append(f"<= {m.le:g}")
        elif isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length}")
        elif isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length}")
        elif getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(dict.fromkeys(out))


def _value(v: Any) -> str:
    if isinstance(v, BaseModel):
        return "see below"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        return f"`{v:g}`" if abs(v) < 1e6 else f"`{v:.0f}`"
    return f"`{json.dumps(v)}`"


def default_text(info: FieldInfo) -> str:
    """The default as YAML would write it, or ``required``."""
    if info.default_factory is not None:
        return _value(info.default_factory())  # type: ignore[call-arg]
    if info.default is PydanticUndefined:
        return "required"
    return _value(info.default)


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def model_table(model: type[BaseModel]) -> list[str]:
    """One Markdown section for a model: its docstring and a row per key."""
    doc = inspect.cleandoc(model.__doc__ or "").replace("``", "`")
    lines = [f"### {model.__name__}", "", doc, ""] if doc else [f"### {model.__name__}", ""]
    lines += [
        "| key | type | default | constraints | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, info in model.model_fields.items():
        desc = info.description or ""
        notes = choice_notes(info)
        if notes:
            desc += ": " + "; ".join(f"`{k}` {v}" for k, v in notes.items())
        row = (
            f"`{name}`",
            type_text(info.annotation),
            default_text(info),
            constraints_text(info),
            desc,
        )
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return [*lines, ""]


def render() -> str:
    """The whole reference page."""
    lines = [
        "# Configuration reference",
        "",
        "Every key of the panel, gating, QC and training YAML files, generated from the typed",
        "config models in `src/blinaprofile/config/` by `scripts/config_reference.py` (do not",
        "edit by hand: `tests/test_config.py` renders the page again and fails when it differs).",
        "",
        "Unknown keys are errors; a misspelt key names the closest known one (`compensaton` ->",
        '"did you mean `compensation`?"), and a value outside a fixed set of choices lists the',
        "choices and what each is for. Every error names the file and the key",
        "(`gates.3.ranges.CD3.min`).",
        "",
    ]
    for title, where, top, nested in SECTIONS:
        lines += [f"## {title} (`{where}`)", ""]
        for model in (top, *nested):
            lines += model_table(model)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) ``docs/config_reference.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if same else 'stale; run scripts/config_reference.py'}")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
