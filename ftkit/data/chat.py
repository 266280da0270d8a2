"""Agent and reasoning chat data: tool definitions, tool calls, tool results, reasoning and per-turn loss.

Canonical chat messages keep `role` and `content` (a str) and, only where the data has them:
  tool_calls    [{"id": str|None, "type": "function", "function": {"name": str, "arguments": dict}}]
  tool_call_id  (tool results) the id of the call answered
  name          (tool results) the tool's name
  reasoning     the assistant's reasoning, whichever way the data gave it
  train         False: this turn carries no loss
A canonical chat row may carry `tools`: a list of OpenAI-style function schemas.

Arguments that are not a JSON object are kept as given and reported by `tool_problems`, so
that `data check` can list every malformed call at once.
"""

from __future__ import annotations

import json
import re

from ftkit.errors import UserError

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
# The keys the chat templates of today read for reasoning (transformers aliases them to each other).
_TEMPLATE_REASONING = re.compile(r"reasoning_content|[.'\"]thinking\b|[.'\"]reasoning\b")


def _json_value(value):
    """Arguments as given in the data: a dict, or a JSON string of one (else the raw value, reported later)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def norm_call(where: str, i: int, call) -> dict:
    """One tool call in OpenAI shape ({function: {name, arguments}}) or flat ({name, arguments|parameters})."""
    if not isinstance(call, dict):
        raise UserError(f"{where}: turn {i + 1}: each tool call must be an object with a name and arguments, "
                        f"got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn.get("name"):
        raise UserError(f"{where}: turn {i + 1}: a tool call without a function name ({json.dumps(call)[:80]}); "
                        'write {"type": "function", "function": {"name": ..., "arguments": {...}}}')
    args = fn.get("arguments", fn.get("parameters", {}))
    out = {"id": call["id"]} if isinstance(call.get("id"), str) else {}
    return {**out, "type": "function", "function": {"name": fn["name"], "arguments": _json_value(args)}}


def norm_tools(where: str, tools) -> list[dict] | None:
    """Per-row tool schemas: a list (or a JSON string of one) of functions, wrapped OpenAI-style."""
    tools = _json_value(tools)
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"{where}: tools must be a list of function schemas "
                        '([{"type": "function", "function": {"name": ..., "parameters": {...}}}])')
    out = []
    for t in tools:
        fn = t.get("function", t)
        if not isinstance(fn.get("name"), str):
            raise UserError(f"{where}: a tool schema without a name: {json.dumps(t)[:80]}")
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out


def turn_extras(where: str, i: int, m: dict, role: str, raw_role: str, content: str) -> dict:
    """The canonical message for one turn: role, content and whatever tool/reasoning/loss keys it has."""
    out = {"role": role, "content": content}
    calls = m.get("tool_calls")
    if raw_role.lower() == "function_call":  # sharegpt: the value is the call itself (one object or a list)
        calls, out["content"] = _json_value(content), ""
        if not isinstance(calls, (dict, list)):
            raise UserError(f"{where}: turn {i + 1}: a function_call turn's value must be JSON "
                            '({"name": ..., "arguments": {...}}), got: ' + content[:80])
        calls = calls if isinstance(calls, list) else [calls]
    if calls:
        if role != "assistant":
            raise UserError(f"{where}: turn {i + 1}: only assistant turns make tool calls (this one is {role})")
        out["tool_calls"] = [norm_call(where, i, c) for c in (calls if isinstance(calls, list) else [calls])]
    for key in ("tool_call_id", "name"):
        if role == "tool" and isinstance(m.get(key), str):
            out[key] = m[key]
    if role == "assistant":
        reasoning = next((m[k] for k in REASONING_KEYS if isinstance(m.get(k), str) and m[k].strip()), None)
        think = THINK.match(out["content"])
        if think:  # inline <think>…</think> at the start of the reply
            reasoning = reasoning or think.group(1)
            out["content"] = out["content"][think.end():]
        if reasoning is not None:
            out["reasoning"] = reasoning.strip("\n")
    weight = m.get("weight", 1)
    if m.get("train", True) is False or (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                                         and weight == 0):
        out["train"] = False
    return out


def reads_reasoning(template: str) -> bool:
    return bool(_TEMPLATE_REASONING.search(template))


def for_template(messages: list[dict], template: str) -> list[dict]:
    """Messages as the chat template takes them: reasoning under `reasoning_content` when the template
    reads it (transformers aliases `thinking` for gpt-oss templates), else inline as <think>…</think>."""
    native = reads_reasoning(template)
    out = []
    for m in messages:
        r = {k: v for k, v in m.items() if k not in ("train", "reasoning")}
        if "reasoning" in m:
            if native:
                r["reasoning_content"] = m["reasoning"]
            else:
                r["content"] = f"<think>\n{m['reasoning']}\n</think>\n\n{m['content']}"
        out.append(r)
    return out


def tool_problems(rows: list[dict]) -> list[str]:
    """Malformed tool use, as 'file:line: what' lines: arguments that are not a JSON object, calls that no
    tool result answers (unless the conversation ends with them), results that answer no call."""
    problems = []
    for row in rows:
        open_calls: list[dict] = []
        msgs = row.get("messages") or []
        if not any("tool_calls" in m for m in msgs):
            continue  # older data writes calls inside the text; its tool turns are plain turns
        for i, m in enumerate(msgs):
            where = f"{row['where']}: turn {i + 1}"
            for c in m.get("tool_calls", ()):
                if not isinstance(c["function"]["arguments"], dict):
                    problems.append(f"{where}: arguments of {c['function']['name']} are not a JSON object: "
                                    f"{str(c['function']['arguments'])[:60]!r}")
            if m["role"] == "tool":
                cid = m.get("tool_call_id")
                match = next((c for c in open_calls if cid is None or c.get("id") in (None, cid)), None)
                if match is None:
                    problems.append(f"{where}: a tool result" + (f" for id {cid!r}" if cid else "") +
                                    " that answers no earlier tool call")
                else:
                    open_calls.remove(match)
                continue
            if open_calls:
                names = ", ".join(c["function"]["name"] for c in open_calls)
                problems.append(f"{where}: tool call(s) {names} got no tool result before this {m['role']} turn")
                open_calls = []
            open_calls = list(m.get("tool_calls", ()))
    return problems


def check_tool_use(rows: list[dict]) -> None:
    problems = tool_problems(rows)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UserError(f"{len(problems)} malformed tool call(s):\n  {shown}{more}\n"
                        'fix: arguments must be a JSON object ({"city": "Paris"}), and every call needs a '
                        "tool-role reply (with its tool_call_id) before the next turn")


def chat_counts(rows: list[dict]) -> dict:
    """What `data check` reports about agent/reasoning data."""
    n = {"rows with tools": 0, "tool calls": 0, "tool results": 0, "reasoning turns": 0, "untrained turns": 0}
    for row in rows:
        n["rows with tools"] += bool(row.get("tools"))
        for m in row.get("messages") or ():
            n["tool calls"] += len(m.get("tool_calls", ()))
            n["tool results"] += m["role"] == "tool"
            n["reasoning turns"] += "reasoning" in m
            n["untrained turns"] += m["role"] == "assistant" and m.get("train") is False
    return n


def uses_tools(rows: list[dict]) -> bool:
    """Structured tool use (tools, tool_calls): it needs a template that renders them."""
    return any(row.get("tools") or any("tool_calls" in m for m in row.get("messages", ())) for row in rows)
