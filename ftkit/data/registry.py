"""The row-format registry: each format's columns and its converter to canonical rows.

Converter modules (formats.py: chat and text formats; preference.py: preference, unpaired, prompt)
register here; readers look formats up here, so no converter module imports another.
"""

from __future__ import annotations

from typing import Callable

from ftkit.data.sources import Row
from ftkit.errors import UserError


class Columns(dict):
    """data.columns (format column -> user column) plus data.roles (user role -> canonical role).

    A dict, so converters can keep calling `columns.get(col, col)`."""

    def __init__(self, columns: dict[str, str] | None = None, roles: dict[str, str] | None = None):
        super().__init__(columns or {})
        self.roles = dict(roles or {})


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


def detect_format(row: Row, columns: dict[str, str]) -> str:
    have = set(row.data)
    for fmt in AUTO_ORDER:
        needed = [columns.get(c, c) for c, req in FORMAT_COLUMNS[fmt].items() if req]
        if all(c in have for c in needed):
            return fmt
    raise UserError(
        f"{row.where}: data.format is auto but the columns ({', '.join(sorted(have)) or 'none'}) match no format. "
        f"Set data.format ({' | '.join(FORMAT_COLUMNS)}) and, if your names differ, "
        "data.columns, e.g. columns: {instruction: question, output: answer}"
    )


def get_column(row: Row, fmt: str, col: str, columns: dict[str, str]):
    name = columns.get(col, col)
    if name not in row.data or row.data[name] is None:
        if FORMAT_COLUMNS[fmt].get(col, False):
            mapped = f" (data.columns.{col})" if col in columns else ""
            hint = "" if col in columns else f"; if yours is named differently, set data.columns: {{{col}: <name>}}"
            raise UserError(
                f"{row.where}: missing column {name!r}{mapped} needed by format {fmt}; "
                f"columns in this row: {', '.join(sorted(row.data)) or 'none'}{hint}"
            )
        return None
    return row.data[name]
