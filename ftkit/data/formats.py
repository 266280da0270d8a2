"""Row formats -> one canonical form per row.

Canonical rows are one of:
  {"messages": [{"role": ..., "content": ...}, ...]}   chat (alpaca, sharegpt, messages)
  {"prompt": str, "completion": str}                   completion
  {"text": str}                                        raw text (continued pretraining)
"""

from __future__ import annotations

from typing import Callable

from ftkit.data.sources import Row
from ftkit.errors import UserError

# The columns each format reads (format's own names; data.columns maps them to the user's).
FORMAT_COLUMNS: dict[str, dict[str, bool]] = {  # column -> required
    "messages": {"messages": True},
    "sharegpt": {"conversations": True, "system": False},
    "alpaca": {"instruction": True, "input": False, "output": True, "system": False, "history": False},
    "completion": {"prompt": True, "completion": True},
    "text": {"text": True},
}

ROLE_ALIASES = {
    "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
    "model": "assistant", "system": "system", "tool": "tool", "observation": "tool", "function": "tool",
    "function_call": "assistant",
}


def detect_format(row: Row, columns: dict[str, str]) -> str:
    have = set(row.data)
    for fmt in ("messages", "sharegpt", "alpaca", "completion", "text"):
        needed = [columns.get(c, c) for c, req in FORMAT_COLUMNS[fmt].items() if req]
        if all(c in have for c in needed):
            return fmt
    raise UserError(
        f"{row.where}: data.format is auto but the columns ({', '.join(sorted(have)) or 'none'}) match no format. "
        "Set data.format (messages | sharegpt | alpaca | completion | text) and, if your names differ, "
        "data.columns, e.g. columns: {instruction: question, output: answer}"
    )


def _get(row: Row, fmt: str, col: str, columns: dict[str, str]):
    name = columns.get(col, col)
    if name not in row.data or row.data[name] is None:
        if FORMAT_COLUMNS[fmt][col]:
            mapped = f" (data.columns.{col})" if col in columns else ""
            raise UserError(
                f"{row.where}: missing column {name!r}{mapped} needed by format {fmt}; "
                f"columns in this row: {', '.join(sorted(row.data)) or 'none'}"
            )
        return None
    return row.data[name]


def _text(row: Row, value, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{row.where}: {what} must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    return value


def _turn(row: Row, role, content, i: int) -> dict:
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        raise UserError(
            f"{row.where}: turn {i + 1} has unknown role {role!r}; known roles: {', '.join(sorted(ROLE_ALIASES))}"
        )
    return {"role": ROLE_ALIASES[role.lower()], "content": _text(row, content, f"turn {i + 1} content")}


def _from_messages(row: Row, columns: dict[str, str]) -> dict:
    msgs = _get(row, "messages", "messages", columns)
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{row.where}: turn {i + 1} must be an object with 'role' and 'content'")
        turns.append(_turn(row, m["role"], m["content"], i))
    return {"messages": turns}


def _from_sharegpt(row: Row, columns: dict[str, str]) -> dict:
    conv = _get(row, "sharegpt", "conversations", columns)
    if not isinstance(conv, list) or not conv:
        raise UserError(f"{row.where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    turns = []
    system = _get(row, "sharegpt", "system", columns)
    if system:
        turns.append({"role": "system", "content": _text(row, system, "system")})
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise UserError(f"{row.where}: conversation turn {i + 1} must be an object with 'from' and 'value'")
        turns.append(_turn(row, m["from"], m["value"], i))
    return {"messages": turns}


def _from_alpaca(row: Row, columns: dict[str, str]) -> dict:
    instruction = _text(row, _get(row, "alpaca", "instruction", columns), "instruction")
    extra = _get(row, "alpaca", "input", columns)
    output = _text(row, _get(row, "alpaca", "output", columns), "output")
    system = _get(row, "alpaca", "system", columns)
    history = _get(row, "alpaca", "history", columns) or []
    turns = [{"role": "system", "content": _text(row, system, "system")}] if system else []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(f"{row.where}: history item {i + 1} must be a [question, answer] pair")
        turns.append({"role": "user", "content": _text(row, pair[0], f"history[{i}][0]")})
        turns.append({"role": "assistant", "content": _text(row, pair[1], f"history[{i}][1]")})
    prompt = instruction if not extra else f"{instruction}\n\n{_text(row, extra, 'input')}"
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": turns}


def _from_completion(row: Row, columns: dict[str, str]) -> dict:
    return {
        "prompt": _text(row, _get(row, "completion", "prompt", columns), "prompt"),
        "completion": _text(row, _get(row, "completion", "completion", columns), "completion"),
    }


def _from_text(row: Row, columns: dict[str, str]) -> dict:
    return {"text": _text(row, _get(row, "text", "text", columns), "text")}


CONVERTERS: dict[str, Callable[[Row, dict], dict]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "completion": _from_completion,
    "text": _from_text,
}


def check_columns_mapping(columns: dict[str, str], fmt: str, where: str) -> None:
    unknown = [c for c in columns if c not in FORMAT_COLUMNS[fmt]]
    if unknown:
        raise UserError(
            f"{where}: data.columns maps {', '.join(map(repr, unknown))}, which format {fmt} does not read; "
            f"its columns: {', '.join(FORMAT_COLUMNS[fmt])}"
        )


def to_canonical(rows: list[Row], fmt: str, columns: dict[str, str], system: str | None,
                 recipe_where: str = "recipe") -> tuple[str, list[dict]]:
    """Convert rows; returns (format used, canonical rows with a 'where' key each)."""
    if fmt == "auto":
        fmt = detect_format(rows[0], columns)
    check_columns_mapping(columns, fmt, recipe_where)
    convert = CONVERTERS[fmt]
    out = []
    for row in rows:
        item = convert(row, columns)
        if "messages" in item:
            if system and item["messages"][0]["role"] != "system":
                item["messages"].insert(0, {"role": "system", "content": system})
            if not any(m["role"] == "assistant" for m in item["messages"]):
                raise UserError(f"{row.where}: the conversation has no assistant turn, so nothing to learn from")
        item["where"] = row.where
        out.append(item)
    return fmt, out


from ftkit.data import preference as _preference  # noqa: E402,F401  (registers preference, unpaired, prompt)
