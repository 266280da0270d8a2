"""Docs generated from the recipe schema, so the README's reference cannot drift from the code.

    python -m ftkit.docs --write README.md   # refresh the block between the markers
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from ftkit.recipe import Recipe

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann) if a is not type(None)) + (
            " \\| null" if type(None) in typing.get_args(ann) else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(ann))}]"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "{}" if value == {} else ("[]" if value == [] else "(section)")
    if field.default is None:
        return "null"
    value = str(field.default).lower() if isinstance(field.default, bool) else field.default
    return f"`{value}`"


def _desc(field) -> str:
    return (field.description or "").replace("|", "\\|")


def recipe_reference() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in Recipe.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub, sf in ann.model_fields.items():
                rows.append(f"| `{name}.{sub}` | {_type_name(sf.annotation)} | {_default(sf)} | {_desc(sf)} |")
        else:
            rows.append(f"| `{name}` | {_type_name(ann)} | {_default(field)} | {_desc(field)} |")
    return "\n".join(rows)


def block() -> str:
    return f"{BEGIN}\n{recipe_reference()}\n{END}"


def write(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + block() + text[end:]
    path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        print("updated" if write(Path(sys.argv[2])) else "unchanged")
    else:
        print(block())
