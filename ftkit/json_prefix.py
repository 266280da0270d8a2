"""Follows a JSON object character by character as a model writes it: whether the text so far can
still become valid JSON, and where the object ends. Streaming a tool call's arguments relies on it
to send only text that is still on its way to a JSON object (never text already known to be broken).
"""

from __future__ import annotations

import re

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")
_ESCAPES = set('"\\/bfnrtu')
_HEX = set("0123456789abcdefABCDEF")


def _atom_prefix(s: str) -> bool:
    """Whether s can still grow into a number or a literal (a digit more completes "1.", "-", "1e+")."""
    return any(lit.startswith(s) for lit in _LITERALS) or any(_NUMBER.fullmatch(s + t) for t in ("", "0"))


class JsonObjectScan:
    """`push(ch)` is False once the text stops being the start of a JSON object; `done` after its `}`."""

    def __init__(self):
        self.stack: list[str] = []  # open containers, "{" or "["
        self.want = "start"  # start | value | value_or_end | key | key_or_end | colon | comma_or_end
        self.in_str = self.is_key = False
        self.esc = 0  # 0: none, -1: after a backslash, 1..4: hex digits still due in a \\u escape
        self.atom = ""  # a number or literal being read
        self.done = self.bad = False

    def push(self, ch: str) -> bool:
        if self.done or self.bad:
            return False
        ok = self._string(ch) if self.in_str else self._outside(ch)
        self.bad = not ok
        return ok

    def _string(self, ch: str) -> bool:
        if self.esc == -1:
            self.esc = 4 if ch == "u" else 0
            return ch in _ESCAPES
        if self.esc > 0:
            self.esc -= 1
            return ch in _HEX
        if ch == "\\":
            self.esc = -1
        elif ch == '"':
            self.in_str = False
            self.want = "colon" if self.is_key else "comma_or_end"
        elif ord(ch) < 0x20:  # raw control characters are not allowed inside JSON strings
            return False
        return True

    def _outside(self, ch: str) -> bool:
        if self.atom:
            if _atom_prefix(self.atom + ch):
                self.atom += ch
                return True
            if not (_NUMBER.fullmatch(self.atom) or self.atom in _LITERALS):
                return False
            self.atom, self.want = "", "comma_or_end"
        if ch in _WS:
            return True
        want = self.want
        if want == "start":
            return self._open(ch) if ch == "{" else False
        if want in ("key", "key_or_end") and ch == '"':
            self.in_str, self.is_key = True, True
            return True
        if want == "colon" and ch == ":":
            self.want = "value"
            return True
        if (want == "key_or_end" and ch == "}") or (want == "value_or_end" and ch == "]"):
            return self._close()
        if want == "comma_or_end":
            if ch == ",":
                self.want = "key" if self.stack[-1] == "{" else "value"
                return True
            return ch == {"{": "}", "[": "]"}[self.stack[-1]] and self._close()
        if want in ("value", "value_or_end"):
            if ch in "{[":
                return self._open(ch)
            if ch == '"':
                self.in_str, self.is_key = True, False
                return True
            if _atom_prefix(ch):
                self.atom = ch
                return True
        return False

    def _open(self, ch: str) -> bool:
        self.stack.append(ch)
        self.want = "key_or_end" if ch == "{" else "value_or_end"
        return True

    def _close(self) -> bool:
        self.stack.pop()
        self.want = "comma_or_end"
        self.done = not self.stack
        return True
