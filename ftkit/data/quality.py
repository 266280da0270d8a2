"""Rows that would teach the wrong thing without failing: empty replies and exact duplicates.

A CSV row `What about returns?,` converts cleanly and trains the model to answer with nothing
(its end-of-turn token still carries loss). Such rows are dropped by default, each named by
file:line; exact duplicate rows are counted and named, not dropped (repeating a row is a
legitimate way to up-weight it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Screened:
    empty: list[str] = field(default_factory=list)  # where of rows with an empty or whitespace-only reply
    duplicates: list[str] = field(default_factory=list)  # where of rows equal to an earlier row
    dropped: int = 0

    def as_dict(self) -> dict:
        return {"empty_replies": len(self.empty), "duplicate_rows": len(self.duplicates),
                "dropped_empty_replies": self.dropped}


def _replies(row: dict) -> list:
    if "messages" in row:
        # A turn that calls a tool or only reasons before one is not an empty reply; an untrained turn
        # (train: false) teaches nothing either way.
        return [m for m in row["messages"] if m.get("role") == "assistant" and m.get("train", True)
                and not m.get("tool_calls") and not m.get("reasoning")]
    if "completion" in row:
        return [{"content": row["completion"]}]
    if "text" in row:
        return [{"content": row["text"]}]
    return []


def has_empty_reply(row: dict) -> bool:
    return any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in _replies(row))


def screen(rows: list[dict], keep_empty: bool) -> tuple[list[dict], Screened]:
    """The rows to train on, and what was found (in file order)."""
    found, seen, kept = Screened(), set(), []
    for row in rows:
        key = json.dumps({k: v for k, v in row.items() if k != "where"}, sort_keys=True, ensure_ascii=False,
                         default=str)
        if key in seen:
            found.duplicates.append(row["where"])
        seen.add(key)
        if has_empty_reply(row):
            found.empty.append(row["where"])
            if not keep_empty:
                found.dropped += 1
                continue
        kept.append(row)
    return kept, found


def describe(found: Screened, field_name: str = "data.keep_empty_replies") -> list[str]:
    """Warning lines (rich markup), empty when nothing was found."""
    lines = []
    if found.empty:
        what = (f"dropped (set {field_name}: true to keep them)" if found.dropped
                else "kept, as data.keep_empty_replies says")
        lines.append(f"[yellow]warning:[/] {len(found.empty)} rows have an empty reply, {what}: "
                     f"{_list(found.empty)}")
    if found.duplicates:
        lines.append(f"[yellow]note:[/] {len(found.duplicates)} rows repeat an earlier row exactly: "
                     f"{_list(found.duplicates)}")
    return lines


def _list(places: list[str], most: int = 5) -> str:
    return ", ".join(places[:most]) + (f" (+{len(places) - most} more)" if len(places) > most else "")
