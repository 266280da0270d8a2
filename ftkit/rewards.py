"""Reward functions for the rl stage, in TRL's calling convention:
`fn(prompts, completions, **columns) -> list[float]`, one score per completion, where a
completion is a string (plain prompts) or a list of messages (chat prompts).

A `module:function` from a recipe is called the same way; extra columns of the prompt
file (e.g. `answer`) arrive as keyword arguments, one list entry per completion.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from ftkit.errors import UserError


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")


def format_reward(pattern: str):
    rx = re.compile(pattern, re.DOTALL)

    def fn(completions, **_):
        return [1.0 if rx.search(completion_text(c)) else 0.0 for c in completions]

    fn.__name__ = "format"
    return fn


def length_reward(target_chars: int):
    def fn(completions, **_):
        return [max(0.0, 1.0 - abs(len(completion_text(c)) - target_chars) / target_chars) for c in completions]

    fn.__name__ = "length"
    return fn


def as_messages(completions) -> list[list[dict]]:
    """TRL's built-in rewards read completion[0]["content"]; plain-text prompts give strings."""
    return [[{"role": "assistant", "content": completion_text(c)}] for c in completions]


def think_format_reward():
    from trl.rewards import think_format_reward as trl_fn

    def fn(completions, **kw):
        return trl_fn(as_messages(completions), **kw)

    fn.__name__ = "think_format"
    return fn


def accuracy_reward(column: str):
    """TRL's math-verify accuracy against the prompt file's `column` (None where the answer does not parse)."""
    from trl.rewards import accuracy_reward as trl_fn

    def fn(completions, **kw):
        return trl_fn(as_messages(completions), solution=kw.pop(column), **{k: v for k, v in kw.items()
                                                                           if k != "solution"})

    fn.__name__ = "accuracy"
    return fn


def soft_overlong_reward(max_completion_len: int, cache_tokens: int):
    from trl.rewards import get_soft_overlong_punishment

    return get_soft_overlong_punishment(max_completion_len, cache_tokens)


def import_function(spec: str, search_dirs: list[Path], where: str):
    """'pkg.module:function' -> the callable; looked up from the working dir, then the given dirs."""
    module_name, _, attr = spec.partition(":")
    added = [str(d) for d in search_dirs if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{where}: cannot import {module_name!r} for reward function {spec}: {exc}") from None
    except Exception as exc:  # the module itself failed while importing
        raise UserError(f"{where}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where}: {module_name} has no function {attr!r}")
    return fn
