"""Row formats -> one canonical form per row (and back, for `ftkit data convert`).

Canonical rows are one of:
  {"messages": [{"role": ..., "content": ...}, ...]}   chat (alpaca, sharegpt, messages)
  {"prompt": str, "completion": str}                   completion
  {"text": str}                                        raw text (continued pretraining)

Formats live in a registry (ftkit/data/registry.py), so a module can add its own (preference,
unpaired, prompt in ftkit/data/preference.py) without touching this file.
"""

from __future__ import annotations

import json

from ftkit.data.chat import norm_tools, turn_extras
from ftkit.data.registry import (AUTO_ORDER, CONVERTERS, FORMAT_COLUMNS, INNER_KEYS, ROLE_ALIASES,  # noqa: F401
                                 Advice, Columns, advice_of, detect_format, flag_columns,
                                 get_column, register_format)
from ftkit.data.sources import Row
from ftkit.errors import UserError


def _text(row: Row, value, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{row.where}: {what} must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    return value


def _role(row: Row, role, i: int, columns: Columns) -> str:
    roles = getattr(columns, "roles", {})
    if isinstance(role, str) and role in roles:
        return roles[role]
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        known = sorted(set(ROLE_ALIASES) | set(roles))
        raise UserError(
            f"{row.where}: turn {i + 1} has unknown role {role!r}; known roles: {', '.join(known)}. "
            f"Map yours with {advice_of(columns).map_role(role if isinstance(role, str) else 'name')}"
        )
    return ROLE_ALIASES[role.lower()]


def _turns(row: Row, items, fmt: str, list_col: str, role_key: str, content_key: str, columns: Columns) -> list[dict]:
    role_name, content_name = columns.get(role_key, role_key), columns.get(content_key, content_key)
    if not isinstance(items, list) or not items:
        raise UserError(f"{row.where}: {columns.get(list_col, list_col)!r} must be a non-empty list of "
                        f"{{{role_name}, {content_name}}} objects (format {fmt})")
    turns = []
    for i, m in enumerate(items):
        # A tool-call turn may have no content (OpenAI writes null).
        if not isinstance(m, dict) or role_name not in m or (content_name not in m and not m.get("tool_calls")):
            have = ", ".join(sorted(m)) if isinstance(m, dict) else type(m).__name__
            raise UserError(f"{row.where}: turn {i + 1} must be an object with {role_name!r} and {content_name!r} "
                            f"(it has: {have or 'nothing'})")
        content = m.get(content_name)
        content = "" if content is None and m.get("tool_calls") else content
        role = _role(row, m[role_name], i, columns)
        turns.append(turn_extras(row.where, i, m, role, str(m[role_name]),
                                 _text(row, content, f"turn {i + 1} content")))
    return turns


def _with_tools(row: Row, fmt: str, item: dict, columns: Columns) -> dict:
    tools = norm_tools(row.where, get_column(row, fmt, "tools", columns))
    if tools:
        item["tools"] = tools
    return item


def _from_messages(row: Row, columns: Columns) -> dict:
    msgs = get_column(row, "messages", "messages", columns)
    return _with_tools(row, "messages", {"messages": _turns(row, msgs, "messages", "messages", "role", "content",
                                                            columns)}, columns)


def _from_sharegpt(row: Row, columns: Columns) -> dict:
    conv = get_column(row, "sharegpt", "conversations", columns)
    turns = _turns(row, conv, "sharegpt", "conversations", "from", "value", columns)
    system = get_column(row, "sharegpt", "system", columns)
    if system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": _text(row, system, "system")})
    return _with_tools(row, "sharegpt", {"messages": turns}, columns)


def _from_alpaca(row: Row, columns: Columns) -> dict:
    instruction = _text(row, get_column(row, "alpaca", "instruction", columns), "instruction")
    extra = get_column(row, "alpaca", "input", columns)
    output = _text(row, get_column(row, "alpaca", "output", columns), "output")
    system = get_column(row, "alpaca", "system", columns)
    history = get_column(row, "alpaca", "history", columns) or []
    if not isinstance(history, list):
        raise UserError(f"{row.where}: history must be a list of [question, answer] pairs")
    turns = [{"role": "system", "content": _text(row, system, "system")}] if system else []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(f"{row.where}: history item {i + 1} must be a [question, answer] pair")
        turns.append({"role": "user", "content": _text(row, pair[0], f"history[{i}][0]")})
        turns.append({"role": "assistant", "content": _text(row, pair[1], f"history[{i}][1]")})
    prompt = instruction if not extra else f"{instruction}\n\n{_text(row, extra, 'input')}"
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": turns}


def _from_completion(row: Row, columns: Columns) -> dict:
    return {
        "prompt": _text(row, get_column(row, "completion", "prompt", columns), "prompt"),
        "completion": _text(row, get_column(row, "completion", "completion", columns), "completion"),
    }


def _from_text(row: Row, columns: Columns) -> dict:
    return {"text": _text(row, get_column(row, "text", "text", columns), "text")}


register_format("messages", {"messages": True, "tools": False}, _from_messages, inner=("role", "content"))
register_format("sharegpt", {"conversations": True, "system": False, "tools": False}, _from_sharegpt, inner=("from", "value"))
register_format("alpaca", {"instruction": True, "input": False, "output": True, "system": False, "history": False},
                _from_alpaca)
register_format("completion", {"prompt": True, "completion": True}, _from_completion)
register_format("text", {"text": True}, _from_text)


def check_columns_mapping(columns: dict[str, str], fmt: str, where: str) -> None:
    known = list(FORMAT_COLUMNS[fmt]) + list(INNER_KEYS.get(fmt, ()))
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UserError(
            f"{where}: {advice_of(columns).columns} maps {', '.join(map(repr, unknown))}, which format {fmt} "
            f"does not read; its columns: {', '.join(known)}"
        )


def to_canonical(rows: list[Row], fmt: str, columns: dict[str, str], system: str | None,
                 recipe_where: str = "recipe", roles: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    """Convert rows; returns (format used, canonical rows with a 'where' key each).

    `recipe_where` prefixes mapping errors; a Columns' `advice` words their fixes (recipe keys or flags)."""
    cols = columns if isinstance(columns, Columns) and roles is None else Columns(columns, roles, advice_of(columns))
    if fmt == "auto":
        fmt = detect_format(rows[0], cols)
        # Mixed sources may each have another format: a mapping only has to fit some format.
        everything = {c for f in FORMAT_COLUMNS for c in (*FORMAT_COLUMNS[f], *INNER_KEYS.get(f, ()))}
        stray = [c for c in cols if c not in everything]
        if stray:
            check_columns_mapping(Columns({c: cols[c] for c in stray}, advice=cols.advice), fmt, recipe_where)
    elif fmt not in CONVERTERS:
        raise UserError(f"{recipe_where}: unknown {cols.advice.format} {fmt!r}; one of: {', '.join(CONVERTERS)}")
    else:
        check_columns_mapping(cols, fmt, recipe_where)
    convert = CONVERTERS[fmt]
    out = []
    for row in rows:
        item = convert(row, cols)
        if "messages" in item:
            if system and item["messages"][0]["role"] != "system":
                item["messages"].insert(0, {"role": "system", "content": system})
            if not any(m["role"] == "assistant" for m in item["messages"]):
                raise UserError(
                    f"{row.where}: the conversation has no assistant turn, so there is nothing to learn from "
                    f"(roles: {', '.join(m['role'] for m in item['messages'])}); if your assistant role has "
                    f"another name, map it with {cols.advice.map_role('<your_role>')}"
                )
        item["where"] = row.where
        out.append(item)
    return fmt, out


# ---------------------------------------------------------------------------- canonical -> a format


SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


def _need_chat(item: dict, to: str) -> list[dict]:
    if "messages" in item:
        return item["messages"]
    if "prompt" in item:
        return [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["completion"]}]
    raise UserError(f"{item['where']}: raw text rows cannot become {to} rows (they have no turns)")


def _export_turn(m: dict) -> dict:
    out = {k: v for k, v in m.items() if k != "reasoning"}
    if "reasoning" in m:
        out["reasoning_content"] = m["reasoning"]
    return out


def from_canonical(item: dict, to: str) -> dict:
    """One canonical row as a row of format `to`, or a UserError naming the row when it cannot be expressed."""
    tools = {"tools": item["tools"]} if item.get("tools") else {}
    if to == "messages":
        return {"messages": [_export_turn(m) for m in _need_chat(item, to)], **tools}
    if to == "sharegpt":
        conv = []
        for m in _need_chat(item, to):
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in m["tool_calls"]]
                conv.append({"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls)})
            else:
                conv.append({"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]})
        return {"conversations": conv, **({"tools": json.dumps(item["tools"])} if tools else {})}
    if to == "alpaca":
        msgs = list(_need_chat(item, to))
        out: dict = {}
        if msgs and msgs[0]["role"] == "system":
            out["system"] = msgs.pop(0)["content"]
        roles = [m["role"] for m in msgs]
        if len(msgs) < 2 or len(msgs) % 2 or roles != ["user", "assistant"] * (len(msgs) // 2):
            raise UserError(f"{item['where']}: only alternating user/assistant turns ending with the assistant "
                            f"fit alpaca (this row has: {', '.join(roles)})")
        pairs = [[msgs[i]["content"], msgs[i + 1]["content"]] for i in range(0, len(msgs) - 2, 2)]
        out.update({"instruction": msgs[-2]["content"], "input": "", "output": msgs[-1]["content"]})
        if pairs:
            out["history"] = pairs
        return out
    if to == "completion":
        if "prompt" in item:
            return {"prompt": item["prompt"], "completion": item["completion"]}
        msgs = item.get("messages") or []
        if [m["role"] for m in msgs] != ["user", "assistant"]:
            raise UserError(f"{item['where']}: only single-turn user/assistant conversations fit completion rows")
        return {"prompt": msgs[0]["content"], "completion": msgs[1]["content"]}
    if to == "text":
        if "text" in item:
            return {"text": item["text"]}
        if "prompt" in item:
            return {"text": item["prompt"] + item["completion"]}
        raise UserError(f"{item['where']}: chat rows become text only through a chat template; "
                        "train on them as chat instead")
    raise UserError(f"--to {to}: unknown format; one of: messages, sharegpt, alpaca, completion, text")
