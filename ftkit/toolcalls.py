"""Tool calls in generated text -> OpenAI `tool_calls`, found by the chat template's own markers.

Templates with Hermes/Qwen-style `<tool_call>` blocks (ftkit's chatml-tools, Qwen2.5/3) are parsed
by those markers; any other template's calls are a bare JSON object `{"name": ..., "arguments"
| "parameters": {...}}` (Llama 3.1 style, after `<|python_tag|>`, which decoding drops as special).
Text that does not parse stays content: a half-written call is never passed off as a call.
"""

from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def style(template: str | None) -> str:
    return "tagged" if template and OPEN in template else "json"


def _call(body: str) -> dict | None:
    """One OpenAI tool call from a JSON object with a name and arguments, else None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI returns them
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse(text: str, template: str | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of one reply; content None when the reply is only calls, as OpenAI sends it."""
    if style(template) == "tagged":
        calls, rest, last = [], [], 0
        for m in _BLOCK.finditer(text):
            call = _call(m.group(1))
            if call is None:
                continue
            calls.append(call)
            rest.append(text[last : m.start()])
            last = m.end()
        content = ("".join(rest) + text[last:]).strip() if calls else text
    else:
        whole = _call(text.strip())
        found = [whole] if whole else [_call(ln) for ln in text.strip().splitlines() if ln.strip()]
        calls = found if found and all(found) else []  # calls mixed with prose are not a call reply
        content = "" if calls else text
    return (content or None) if calls else content, calls


class ToolStream:
    """Streams a reply's content while holding back whatever may be a tool call, parsed at the end.
    Calls therefore arrive whole, each in one delta (OpenAI allows arguments in any number of pieces)."""

    def __init__(self, template: str | None):
        self.template, self.tagged = template, style(template) == "tagged"
        self.held, self.holding = "", False

    def feed(self, piece: str) -> str:
        self.held += piece
        if self.holding:
            return ""
        if not self.tagged:
            if not self.held.strip():
                return ""
            if self.held.lstrip().startswith("{"):  # a JSON call (or JSON content): decided at the end
                self.holding = True
                return ""
            out, self.held = self.held, ""
            return out
        at = self.held.find(OPEN)
        if at >= 0:
            self.holding = True
            out, self.held = self.held[:at], self.held[at:]
        else:  # keep a tail that could still grow into the opening marker
            keep = next((k for k in range(min(len(OPEN) - 1, len(self.held)), 0, -1)
                         if self.held.endswith(OPEN[:k])), 0)
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet sent, tool calls): what was held back is parsed on its own."""
        content, calls = parse(self.held, self.template)
        return (content or "", calls) if calls else (self.held, [])


def stream_deltas(pieces, template: str | None, finish: dict):
    """OpenAI chat deltas for streamed text pieces; `finish["tool_calls"]` says whether calls were sent."""
    ts = ToolStream(template)
    for piece in pieces:
        text = ts.feed(piece)
        if text:
            yield {"content": text}
    tail, calls = ts.finish()
    if tail:
        yield {"content": tail}
    finish["tool_calls"] = bool(calls)
    for k, c in enumerate(calls):
        yield {"tool_calls": [{"index": k, **c}]}


def message(text: str, template: str | None) -> tuple[dict, bool]:
    """The assistant message of a non-streamed reply, and whether it made tool calls."""
    content, calls = parse(text, template)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content, "tool_calls": calls}, True


def load_tools(path: str) -> list[dict]:
    """`--tools FILE`: a JSON list of function schemas (OpenAI shape, or bare {name, parameters})."""
    from pathlib import Path

    from ftkit.data.chat import norm_tools
    from ftkit.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--tools {path}: file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"--tools {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    tools = norm_tools(f"--tools {path}", data.get("tools") if isinstance(data, dict) else data)
    if not tools:
        raise UserError(f"--tools {path}: no tools in it; write a JSON list of function schemas")
    return tools


def request_messages(messages: list[dict]) -> list[dict]:
    """OpenAI request messages as chat templates take them: tool-call arguments as objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # the template shows it as given
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out
