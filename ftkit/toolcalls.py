"""Tool calls in generated text -> OpenAI `tool_calls`, found by the chat template's own markers.

Templates with Hermes/Qwen-style `<tool_call>` blocks (ftkit's chatml-tools, Qwen2.5/3) are parsed
by those markers; any other template's calls are a bare JSON object `{"name": ..., "arguments"
| "parameters": {...}}` (Llama 3.1 style, after `<|python_tag|>`, which decoding drops as special).
Text that does not parse stays content: a half-written call is never passed off as a call (a stream
announces a call once its name is read and then sends its arguments as written; see ToolStream).
`tool_choice` forces a call by writing its start into the prompt (`prefill`).
"""

from __future__ import annotations

import json
import re
import uuid

from ftkit.json_prefix import JsonObjectScan

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
# The start of a Hermes-style call, up to the arguments object: enough to announce the call.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def _json_string(body: str) -> str | None:
    """The text of a JSON string's body, None when it is not valid JSON (a control character, a bad escape):
    such a name is not announced, and the block is judged whole at its end."""
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return None


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
    """Streams a reply's content while holding back whatever may be a tool call (JSON-style calls
    are parsed at the end and arrive whole). A `<tool_call>` block is announced (id, type, name) as
    soon as its name is read, then its arguments stream piece by piece for as long as they are still
    on their way to a JSON object; the markers never reach the content."""

    def __init__(self, template: str | None):
        self.template, self.tagged = template, style(template) == "tagged"
        self.held, self.holding, self.mode = "", False, "content"  # content | header | args | tail
        self.calls, self.complete, self.scan = 0, 0, None

    def feed(self, piece: str) -> list[dict]:
        """OpenAI deltas for one more piece of text."""
        self.held += piece
        if not self.tagged:
            return self._feed_json()
        out: list[dict] = []
        while True:
            before = (self.mode, len(self.held))
            out += getattr(self, f"_{self.mode}")()
            if (self.mode, len(self.held)) == before:
                return out

    def _feed_json(self) -> list[dict]:
        if self.holding or not self.held.strip():
            return []
        if self.held.lstrip().startswith("{"):  # a JSON call (or JSON content): decided at the end
            self.holding = True
            return []
        out, self.held = self.held, ""
        return [{"content": out}]

    def _content(self) -> list[dict]:
        at = self.held.find(OPEN)
        if at >= 0:
            out, self.held, self.mode = self.held[:at].rstrip(), self.held[at + len(OPEN):], "header"
        else:  # keep a tail that could still grow into the opening marker, and trailing space before a call
            keep = next((k for k in range(min(len(OPEN) - 1, len(self.held)), 0, -1)
                         if self.held.endswith(OPEN[:k])), 0)
            cut = len(self.held) - keep
            cut = len(self.held[:cut].rstrip())
            out, self.held = self.held[:cut], self.held[cut:]
        return [{"content": out}] if out.strip() or (out and not self.calls) else []

    def _header(self) -> list[dict]:
        m = _HEADER.match(self.held)
        name = _json_string(m.group(1)) if m else None
        if name is not None:
            self.mode, self.scan, self.held = "args", JsonObjectScan(), self.held[m.end():]
            self.calls += 1
            return [{"tool_calls": [{"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}",
                                     "type": "function", "function": {"name": name, "arguments": ""}}]}]
        end = self.held.find(CLOSE)
        if end < 0:
            return []
        block, self.held, self.mode = self.held[:end], self.held[end + len(CLOSE):], "content"
        return self._whole(block, OPEN + block + CLOSE)

    def _whole(self, body: str, raw: str) -> list[dict]:
        """A block whose name came late or not at all: one whole call, or content as it was written."""
        call = _call(body.strip())
        if call is None:
            return [{"content": raw}]
        self.calls += 1
        self.complete += 1
        return [{"tool_calls": [{"index": self.calls - 1, **call}]}]

    def _args(self) -> list[dict]:
        sent = 0
        for ch in self.held:
            if not self.scan.push(ch):
                break
            sent += 1
        out, self.held = self.held[:sent], self.held[sent:]
        if self.scan.done:
            self.mode, self.complete = "tail", self.complete + 1
        elif self.scan.bad:  # no longer JSON: what was sent stays as it is, the call is incomplete
            self.mode = "tail"
        return [{"tool_calls": [{"index": self.calls - 1, "function": {"arguments": out}}]}] if out else []

    def _tail(self) -> list[dict]:
        """After the arguments: the closing brace and marker are dropped, up to the block's end."""
        end = self.held.find(CLOSE)
        if end >= 0:
            self.held, self.mode = self.held[end + len(CLOSE):], "content"
        return []

    def finish(self) -> tuple[list[dict], bool]:
        """(the deltas held back until the end, whether every call that was begun is complete)."""
        if not self.tagged:
            content, calls = parse(self.held, self.template)
            if not calls:
                return ([{"content": self.held}] if self.held else []), True
            self.calls = self.complete = len(calls)
            head = [{"content": content}] if content else []
            return head + [{"tool_calls": [{"index": k, **c}]} for k, c in enumerate(calls)], True
        out: list[dict] = []
        if self.mode == "header":
            out = self._whole(self.held, OPEN + self.held)
        elif self.mode == "content" and (self.held.strip() or not self.calls):
            out = [{"content": self.held}] if self.held else []
        return out, self.complete == self.calls


def stream_deltas(pieces, template: str | None, finish: dict, prefill: str = ""):
    """OpenAI chat deltas for streamed text pieces (after `prefill`, the reply's start written into the
    prompt); `finish["tool_calls"]` says whether calls were made and all of them completed."""
    ts = ToolStream(template)
    yield from ts.feed(prefill)
    for piece in pieces:
        yield from ts.feed(piece)
    tail, complete = ts.finish()
    yield from tail
    finish["tool_calls"] = bool(ts.calls) and complete


CHOICES = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


def choose(choice, tools: list[dict]) -> tuple[list[dict], str | None]:
    """OpenAI `tool_choice` -> (the tools to offer, what the reply must call: None free, "" any tool,
    else that function's name). ValueError with the reason for a choice that cannot be met."""
    names = [t["function"]["name"] for t in tools]
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":  # the model is not shown the tools, so it answers in words
        return [], None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
    elif choice == "required":
        name = ""
    else:
        raise ValueError(f"tool_choice must be {CHOICES}; got {json.dumps(choice)}")
    if not tools:
        raise ValueError(f"tool_choice {json.dumps(choice)} needs tools, and the request has none")
    if name and name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the request's tools "
                         f"({', '.join(names)})")
    return tools, name


def prefill(template: str | None, must_call: str | None) -> str:
    """The start of the reply written into the prompt, so that generation begins inside a call (of
    `must_call`, when it names one) in the template's own call syntax; "" when the model is free."""
    if must_call is None:
        return ""
    if style(template) == "tagged":
        return OPEN + "\n" + (f'{{"name": {json.dumps(must_call)}, "arguments":' if must_call else "")
    key = "parameters" if template and '"parameters"' in template else "arguments"  # Llama 3.1 writes parameters
    return f'{{"name": {json.dumps(must_call)}, "{key}":' if must_call else '{"name":'


def cli_choice(schemas: list[dict] | None, value: str | None) -> tuple[list[dict], str | None]:
    """`generate --tool-choice auto|none|required|NAME` -> (the tools to offer, what the reply must call)."""
    from ftkit.errors import UserError

    choice = value if value in (None, "auto", "none", "required") else {"type": "function", "function": {"name": value}}
    try:
        return choose(choice, schemas or [])
    except ValueError as exc:
        raise UserError(f"--tool-choice: {exc}; give --tools FILE with the function in it") from None


def reply_json(reply: str, start: str, template: str | None, offered: bool) -> str:
    """One `generate --tools` reply as an OpenAI message JSON (parsed for calls when tools were offered)."""
    msg = message(start + reply, template)[0] if offered else {"role": "assistant", "content": reply}
    return json.dumps(msg, ensure_ascii=False)


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
