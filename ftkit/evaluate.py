"""Generation-based checks: prompts with reference answers, scored by exact match."""

from __future__ import annotations

from ftkit.errors import UserError


def prompts_and_references(rows: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """Split canonical chat rows into (conversation up to the last assistant turn, that turn's text)."""
    prompts, refs = [], []
    for row in rows:
        msgs = row.get("messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"{row.get('where', 'row')}: an eval row must be a conversation ending in an assistant turn")
        prompts.append(msgs[:-1])
        refs.append(msgs[-1]["content"])
    return prompts, refs


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / len(references)
