"""Value lists the recipe schema and the command line share. Light on purpose (no pydantic): the CLI
builds its option choices from these at import, and `ftkit --help` must stay instant. recipe.py
builds its Literal types from the same tuples, so a value added here is valid in both."""

from __future__ import annotations

import enum

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Formats of sft/pt data (auto-detected from the columns) and of the preference-style stages.
CHAT_FORMATS = ("messages", "alpaca", "sharegpt", "completion", "text")
PREFERENCE_FORMATS = ("preference", "unpaired", "prompt")
DATA_FORMATS = ("auto", *CHAT_FORMATS, *PREFERENCE_FORMATS)
EVAL_METRICS = ("exact_match", "regex", "accuracy", "macro_f1", "rouge_l")


def as_enum(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str Enum of the values, which typer shows as the option's choices and validates (exit 2)."""
    return enum.Enum(name, {v: v for v in values}, type=str)
