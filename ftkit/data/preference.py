"""Preference-style row formats and the TRL datasets built from them.

  preference  prompt + chosen + rejected   (rm, dpo, orpo)
  unpaired    prompt + completion + label  (kto; label true = desirable)
  prompt      prompt only                  (rl; other scalar columns reach reward functions)

Each text field is a string or a list of {role, content} messages. Canonical rows keep
messages; a row that was all strings is marked `plain` and stays raw text when the
tokenizer has no chat template (a base model), as TRL's non-conversational datasets do.
"""

from __future__ import annotations

from ftkit.data.registry import ROLE_ALIASES, advice_of, get_column, register_format
from ftkit.data.sources import Row
from ftkit.errors import UserError

_COLUMNS = {
    "preference": {"prompt": False, "chosen": True, "rejected": True},
    "unpaired": {"prompt": True, "completion": True, "label": True},
    "prompt": {"prompt": True},
}

_TRUE = {"true", "1", "yes", "good", "desirable"}
_FALSE = {"false", "0", "no", "bad", "undesirable"}


def _messages(row: Row, value, column: str, default_role: str, roles: dict) -> tuple[list[dict], bool]:
    """A string or a message list -> (messages, was_plain_string)."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{row.where}: {column!r} is empty")
        return [{"role": default_role, "content": value}], True
    if not isinstance(value, list) or not value:
        raise UserError(f"{row.where}: {column!r} must be a string or a non-empty list of {{role, content}} "
                        f"messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{row.where}: {column!r} message {i + 1} must be an object with 'role' and 'content'")
        role = m["role"]
        if isinstance(role, str) and role in roles:  # data.roles maps the user's own role names
            role = roles[role]
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise UserError(f"{row.where}: {column!r} message {i + 1} has unknown role {role!r}; "
                            f"known roles: {', '.join(sorted(ROLE_ALIASES))}")
        if not isinstance(m["content"], str):
            raise UserError(f"{row.where}: {column!r} message {i + 1} content must be a string")
        out.append({"role": ROLE_ALIASES[role.lower()], "content": m["content"]})
    return out, False


def _responses(row: Row, value, column: str, columns) -> tuple[list[dict], bool]:
    msgs, plain = _messages(row, value, column, "assistant", getattr(columns, "roles", {}))
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{row.where}: {column!r} must end with an assistant message (the reply being judged)")
    return msgs, plain


def _prompt(row: Row, fmt: str, columns: dict) -> tuple[list[dict], bool]:
    value = get_column(row, fmt, "prompt", columns)
    msgs, plain = _messages(row, value, "prompt", "user", getattr(columns, "roles", {}))
    if msgs[-1]["role"] == "assistant":
        raise UserError(f"{row.where}: 'prompt' ends with an assistant message; the reply belongs in the "
                        "response column")
    return msgs, plain


def _from_preference(row: Row, columns: dict) -> dict:
    chosen, p1 = _responses(row, get_column(row, "preference", "chosen", columns), "chosen", columns)
    rejected, p2 = _responses(row, get_column(row, "preference", "rejected", columns), "rejected", columns)
    if get_column(row, "preference", "prompt", columns) is None:
        # Implicit prompt: whole conversations that share their opening turns.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0 or p1 or p2:
            raise UserError(f"{row.where}: no 'prompt' column, and chosen/rejected are not conversations sharing "
                            f"their opening turns; add a prompt column (or map one: {advice_of(columns).map_column('prompt')})")
        prompt, chosen, rejected, p0 = chosen[:n], chosen[n:], rejected[n:], False
    else:
        prompt, p0 = _prompt(row, "preference", columns)
    if chosen == rejected:
        raise UserError(f"{row.where}: chosen and rejected are identical, so the pair says nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "plain": p0 and p1 and p2}


def _label(row: Row, value, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise UserError(f"{row.where}: {column!r} must be true or false (desirable or not), got {value!r}")


def _from_unpaired(row: Row, columns: dict) -> dict:
    prompt, p0 = _prompt(row, "unpaired", columns)
    completion, p1 = _responses(row, get_column(row, "unpaired", "completion", columns), "completion", columns)
    label = _label(row, get_column(row, "unpaired", "label", columns), columns.get("label", "label"))
    return {"prompt": prompt, "completion": completion, "label": label, "plain": p0 and p1}


def _from_prompt(row: Row, columns: dict) -> dict:
    prompt, plain = _prompt(row, "prompt", columns)
    prompt_col = columns.get("prompt", "prompt")
    # Other scalar columns (e.g. a reference answer) are passed to reward functions by TRL.
    extra = {k: v for k, v in row.data.items() if k != prompt_col and isinstance(v, (str, int, float, bool))}
    return {"prompt": prompt, "plain": plain, "extra": extra}


# Not auto-detected for sft data: each preference stage names its format in the stage registry.
for _name, _convert in (("preference", _from_preference), ("unpaired", _from_unpaired), ("prompt", _from_prompt)):
    register_format(_name, _COLUMNS[_name], _convert, auto=False)


# ---------------------------------------------------------------------------- to TRL datasets


def _text(msgs: list[dict]) -> str:
    return "".join(m["content"] for m in msgs)


def to_trl_rows(rows: list[dict], conversational: bool, system: str | None) -> list[dict]:
    """Canonical rows -> TRL's dataset columns (conversational message lists, or plain strings)."""
    out = []
    for row in rows:
        conv = conversational or not row["plain"]
        item = {}
        for key in ("prompt", "chosen", "rejected", "completion"):
            if key not in row:
                continue
            value = row[key]
            if key == "prompt" and conv and system and value[0]["role"] != "system":
                value = [{"role": "system", "content": system}] + value
            item[key] = value if conv else _text(value)
        if "label" in row:
            item["label"] = row["label"]
        item.update(row.get("extra", {}))
        out.append(item)
    kinds = {isinstance(r["prompt"], list) for r in out}
    if len(kinds) > 1:
        first_plain = next(r["where"] for r, o in zip(rows, out) if not isinstance(o["prompt"], list))
        raise UserError(f"{first_plain}: this file mixes plain-string rows with message-list rows and the "
                        "tokenizer has no chat template to render them alike; set data.template: chatml")
    return out


def check_extra_columns(rows: list[dict]) -> None:
    """A prompt dataset's extra columns must be present, with one type, in every row (one table)."""
    if not rows:
        return
    keys = set(rows[0].get("extra", {}))
    for row in rows[1:]:
        have = set(row.get("extra", {}))
        if have != keys:
            diff = sorted(have ^ keys)
            raise UserError(f"{row['where']}: columns {', '.join(diff)} appear in some rows but not others; "
                            "every row of a prompt file needs the same columns")
