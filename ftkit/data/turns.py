"""The trained character spans of one chat row: per-turn `train: false`, reasoning with or without
loss, and templates that rewrite earlier turns (one sample per turn group, see `per_turn_samples`)."""

from __future__ import annotations

from ftkit.data.chat import for_template
from ftkit.data.render import RewritesTurns, per_turn_samples
from ftkit.errors import UserError


def chat_samples(finder, row: dict, train_on: str, train_on_reasoning: bool = True) -> list[tuple[str, list]]:
    """[(text, [(start, end)])] for one canonical chat row: usually one sample, several when the
    template rewrites earlier turns (e.g. drops old reasoning) and responses only are trained."""
    try:
        samples = _samples(finder, row, train_on)
    except UserError:
        raise
    except Exception as exc:  # the template's own checks, e.g. "only one tool call per turn" (raise_exception)
        raise UserError(f"{row['where']}: the chat template rejected this conversation: {exc}") from None
    return [(text, trained_spans(text, spans, row["messages"], train_on_reasoning)) for text, spans in samples]


def _samples(finder, row: dict, train_on: str) -> list[tuple[str, list[tuple[int, int, int]]]]:
    msgs = for_template(row["messages"], finder.template)
    tools = row.get("tools")
    try:
        text, spans = finder(msgs, row["where"], tools)
    except RewritesTurns:
        if train_on == "all":  # every token of the final rendering; nothing to place
            text = finder.render(msgs, tools=tools)
            return [(text, [(-1, 0, len(text))])]
        return per_turn_samples(finder.render, msgs, row["where"], tools)
    assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    return [(text, [(i, a, b) for i, (a, b) in zip(assistants, spans)])]


def trained_spans(text: str, spans: list[tuple[int, int, int]], messages: list[dict],
                  train_on_reasoning: bool) -> list[tuple[int, int]]:
    out = []
    for i, a, b in spans:
        m = messages[i] if i >= 0 else {}  # -1: the whole text (train_on: all)
        if m.get("train") is False:
            continue
        if not train_on_reasoning and m.get("reasoning", "").strip():
            a = _after_reasoning(text, a, b, m["reasoning"].strip())
        out.append((a, b))
    return out


def _after_reasoning(text: str, a: int, b: int, reasoning: str) -> int:
    """Where the answer starts: past the reasoning, its closing tag (`</think>`) and the blank after it."""
    k = text.find(reasoning, a, b)
    if k < 0:  # the template left this turn's reasoning out: nothing to mask
        return a
    pos = k + len(reasoning)
    while pos < b and text[pos].isspace():
        pos += 1
    if text.startswith("</", pos):
        close = text.find(">", pos, b)
        pos = close + 1 if close >= 0 else pos
        while pos < b and text[pos].isspace():
            pos += 1
    return pos
