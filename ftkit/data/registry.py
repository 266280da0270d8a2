"""The row-format registry: each format's columns and its converter to canonical rows.

Converter modules (formats.py: chat and text formats; preference.py: preference, unpaired, prompt)
register here; readers look formats up here, so no converter module imports another.
"""

from __future__ import annotations

from typing import Callable

from ftkit.data.sources import Row
from ftkit.errors import UserError


class Advice:
    """How a data error words its fix: in a recipe's keys (the default) or in the flags of the command
    that was run (`ftkit eval --column`, `ftkit data convert --from`), so the advice applies to it."""

    def __init__(self, format: str = "data.format", columns: str = "data.columns", roles: str = "data.roles"):
        self.format, self.columns, self.roles = format, columns, roles
        self.flags = columns.startswith("--")

    def map_column(self, col: str, name: str = "<name>") -> str:
        return f"{self.columns} {col}={name}" if self.flags else f"{self.columns}: {{{col}: {name}}}"

    def map_role(self, role: str, to: str = "assistant") -> str:
        return f"{self.roles} {role}={to}" if self.flags else f"{self.roles}, e.g. roles: {{{role}: {to}}}"

    def mapped(self, col: str, name: str) -> str:
        return f"{self.columns} {col}={name}" if self.flags else f"{self.columns}.{col}"


RECIPE_ADVICE = Advice()
CANONICAL_ROLES = ("user", "assistant", "system", "tool")


def flag_columns(column: list[str] | None, role: list[str] | None, format_flag: str) -> "Columns":
    """Columns from a command's `--column format_col=your_col` and `--role your_role=user|...` flags,
    whose errors advise those flags."""
    roles = _flag_pairs(role, "--role")
    bad = [f"{k}={v}" for k, v in roles.items() if v not in CANONICAL_ROLES]
    if bad:
        raise UserError(f"--role {bad[0]}: map onto {', '.join(CANONICAL_ROLES[:-1])} or {CANONICAL_ROLES[-1]}")
    return Columns(_flag_pairs(column, "--column"), roles, Advice(format_flag, "--column", "--role"))


def _flag_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{flag} {item!r}: expected name=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


class Columns(dict):
    """data.columns (format column -> user column) plus data.roles (user role -> canonical role).

    A dict, so converters can keep calling `columns.get(col, col)`; `advice` words the fixes."""

    def __init__(self, columns: dict[str, str] | None = None, roles: dict[str, str] | None = None,
                 advice: Advice = RECIPE_ADVICE):
        super().__init__(columns or {})
        self.roles = dict(roles or {})
        self.advice = advice


# format -> {column: required}; data.columns maps these names to the user's.
FORMAT_COLUMNS: dict[str, dict[str, bool]] = {}
# format -> keys inside list items that data.columns may rename too (e.g. role/content of each message).
INNER_KEYS: dict[str, tuple[str, ...]] = {}
CONVERTERS: dict[str, Callable[[Row, Columns], dict]] = {}
# Formats `auto` tries, in order (the first whose required columns are all present wins).
AUTO_ORDER: list[str] = []


def register_format(name: str, columns: dict[str, bool], converter: Callable[[Row, Columns], dict],
                    inner: tuple[str, ...] = (), auto: bool = True) -> None:
    FORMAT_COLUMNS[name] = columns
    INNER_KEYS[name] = inner
    CONVERTERS[name] = converter
    if auto and name not in AUTO_ORDER:
        AUTO_ORDER.append(name)


ROLE_ALIASES = {
    "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
    "model": "assistant", "system": "system", "tool": "tool", "observation": "tool", "function": "tool",
    "function_call": "assistant", "ipython": "tool",
}


def advice_of(columns: dict) -> Advice:
    return getattr(columns, "advice", RECIPE_ADVICE)


def detect_format(row: Row, columns: dict[str, str]) -> str:
    have = set(row.data)
    for fmt in AUTO_ORDER:
        needed = [columns.get(c, c) for c, req in FORMAT_COLUMNS[fmt].items() if req]
        if all(c in have for c in needed):
            return fmt
    fix = advice_of(columns)
    example = (f"{fix.map_column('instruction', 'question')} {fix.map_column('output', 'answer')}" if fix.flags
               else "data.columns, e.g. columns: {instruction: question, output: answer}")
    raise UserError(
        f"{row.where}: {fix.format} is auto but the columns ({', '.join(sorted(have)) or 'none'}) match no format. "
        f"Set {fix.format} ({' | '.join(FORMAT_COLUMNS)}) and, if your names differ, {example}"
    )


def get_column(row: Row, fmt: str, col: str, columns: dict[str, str]):
    name = columns.get(col, col)
    if name not in row.data or row.data[name] is None:
        if FORMAT_COLUMNS[fmt].get(col, False):
            fix = advice_of(columns)
            mapped = f" ({fix.mapped(col, name)})" if col in columns else ""
            hint = "" if col in columns else f"; if yours is named differently, set {fix.map_column(col)}"
            raise UserError(
                f"{row.where}: missing column {name!r}{mapped} needed by format {fmt}; "
                f"columns in this row: {', '.join(sorted(row.data)) or 'none'}{hint}"
            )
        return None
    return row.data[name]
