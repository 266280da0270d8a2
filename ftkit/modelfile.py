"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE, stop tokens, SYSTEM.

Ollama does not run Jinja: its TEMPLATE is a Go template. ftkit does not parse the Jinja
template; it renders it (through the tokenizer) on probe conversations and reads off what each
role's turn looks like around its content, plus the generation prompt. That covers the
concatenative templates chat models ship (ChatML, Llama 3, Gemma, Phi-3, Zephyr, ...). The
result is checked by rendering the Go template (a subset renderer below) on multi-turn chats and
comparing with the tokenizer's own rendering; a template that does not translate is reported,
not approximated.
"""

from __future__ import annotations

import re
from pathlib import Path

from ftkit.errors import UserError

_C = "FTKIT_CONTENT_{}"


def _render(tok, msgs, gen=False) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _auto_bos(tok) -> str:
    """The BOS text llama.cpp and Ollama put in front by themselves (add_bos_token), else ""."""
    adds = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
    return tok.bos_token if adds else ""


def _split(block: str, content: str, role: str) -> tuple[str, str]:
    if block.count(content) != 1:
        raise ValueError(f"the {role} turn does not contain its content exactly once")
    before, after = block.split(content)
    return before, after


def _increment(tok, msgs) -> str:
    whole, head = _render(tok, msgs), _render(tok, msgs[:-1]) if len(msgs) > 1 else ""
    if not whole.startswith(head):
        raise ValueError("rendering a longer chat changes the text of earlier turns")
    return whole[len(head):]


def template_parts(tok) -> dict:
    """Per-role (prefix, suffix), the generation prompt and any default system prompt, read from renders."""
    m = lambda role, i: {"role": role, "content": _C.format(i)}  # noqa: E731
    chat = [m("user", 1), m("assistant", 2), m("user", 3), m("assistant", 4)]
    roles = {"user": _split(_increment(tok, chat[:3]), _C.format(3), "user"),
             "assistant": _split(_increment(tok, chat[:2]), _C.format(2), "assistant")}
    if _split(_increment(tok, chat), _C.format(4), "assistant") != roles["assistant"]:
        raise ValueError("assistant turns differ with their position")
    parts = {"roles": roles, "generation": _render(tok, chat[:3], gen=True)[len(_render(tok, chat[:3])):],
             "default_system": None, "prefix": ""}
    bos = _auto_bos(tok)
    strip = lambda text: text[len(bos):] if bos and text.startswith(bos) else text  # noqa: E731
    first = strip(_render(tok, chat[:1]))
    user_turn = roles["user"][0] + _C.format(1) + roles["user"][1]
    if not first.endswith(user_turn):
        raise ValueError("the first user turn is rendered differently from later ones")
    implicit = first[: len(first) - len(user_turn)]  # text before the first turn: BOS text, a default system
    try:
        with_system = strip(_render(tok, [m("system", 0)] + chat[:1]))
    except Exception:  # the template refuses a system role (e.g. Gemma): system messages are not translated
        parts["prefix"] = implicit
        return parts
    if not with_system.endswith(user_turn):
        raise ValueError("a system turn changes how the first user turn is rendered")
    pre, post = _split(with_system[: len(with_system) - len(user_turn)], _C.format(0), "system")
    if pre.startswith(implicit):  # constant text (e.g. a BOS the tokenizer does not add) and no default system
        parts["prefix"], roles["system"] = implicit, (pre[len(implicit):], post)
    elif implicit.startswith(pre) and implicit.endswith(post):  # a default system prompt: Ollama's SYSTEM
        roles["system"] = (pre, post)
        parts["default_system"] = implicit[len(pre): len(implicit) - len(post)]
    else:
        raise ValueError("the template adds text before the first turn that is neither constant nor a system turn")
    return parts


def go_template(parts: dict) -> str:
    """The Go TEMPLATE: one branch per role over .Messages, then the generation prompt (no whitespace trimming)."""
    literal = [t for pair in parts["roles"].values() for t in pair] + [parts["generation"]]
    if any("{{" in t for t in literal):
        raise ValueError("the template's text contains '{{', which a Go template cannot hold literally")
    branches = [(role, "{}{{{{ .Content }}}}{}".format(*parts["roles"][role]))
                for role in ("system", "user", "assistant") if role in parts["roles"]]
    body = "".join(f"{{{{ {'if' if i == 0 else 'else if'} eq .Role \"{role}\" }}}}{text}"
                   for i, (role, text) in enumerate(branches))
    if "{{" in parts["prefix"]:
        raise ValueError("the template's text contains '{{', which a Go template cannot hold literally")
    return f"{parts['prefix']}{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{parts['generation']}"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(gguf_name: str, tok, stops: list[str], system: str | None) -> str:
    """The Modelfile text; a UserError when the chat template cannot be expressed as a Go template."""
    lines = [f"FROM ./{gguf_name}"]
    if tok.chat_template:
        try:
            parts = template_parts(tok)
            template = go_template(parts)
        except ValueError as exc:
            raise UserError(f"the chat template cannot be written as an Ollama TEMPLATE ({exc}); "
                            "the GGUF itself carries the template for llama.cpp and LM Studio") from None
        lines.append(f'TEMPLATE """{template}"""')
        system = system if system is not None else parts["default_system"]
    for s in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {_quote(s)}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# A renderer for the subset of Go's text/template that go_template writes (and Ollama's stock
# chat templates mostly use): range over .Messages, if/else if/else on `eq .Role "x"`, .Content,
# .Role, and {{- -}} whitespace trimming.
_TAG = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _parse(template: str):
    pos, out = 0, []
    for mt in _TAG.finditer(template):
        text = template[pos:mt.start()]
        if mt.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("tag", mt.group(2)))
        if mt.group(3):
            out.append(("trim_next", None))
        pos = mt.end()
    text = template[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _block(tokens, i, stop):
    """Nodes until a tag in `stop`; returns (nodes, index of the stopping tag)."""
    nodes = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        if any(val == s or val.startswith(s + " ") for s in stop):
            return nodes, i
        if val.startswith("range "):
            body, i = _block(tokens, i + 1, ("end",))
            nodes.append(("range", val[6:].strip(), body))
            i += 1
        elif val.startswith("if "):
            branches, cond = [], val[3:]
            while True:
                body, i = _block(tokens, i + 1, ("else", "end"))
                branches.append((cond, body))
                tag = tokens[i][1]
                if tag == "end":
                    break
                cond = tag[8:] if tag.startswith("else if ") else None
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("expr", val))
            i += 1
    return nodes, i


def _value(expr: str, dot: dict):
    expr = expr.strip()
    if expr.startswith('"'):
        return expr[1:-1].encode().decode("unicode_escape")
    if expr.startswith("."):
        return dot.get(expr[1:].lower()) if isinstance(dot, dict) else None
    raise ValueError(f"unsupported expression {expr!r}")


def _truth(cond: str | None, dot) -> bool:
    if cond is None:
        return True
    words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', cond)
    if words[0] == "eq":
        return _value(words[1], dot) == _value(words[2], dot)
    if words[0] == "ne":
        return _value(words[1], dot) != _value(words[2], dot)
    return bool(_value(cond, dot))


def _exec(nodes, dot, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            out.append(str(_value(node[1], dot) or ""))
        elif node[0] == "range":
            for item in _value(node[1], dot) or []:
                _exec(node[2], item, out)
        else:
            for cond, body in node[1]:
                if _truth(cond, dot):
                    _exec(body, dot, out)
                    break


def render_go(template: str, messages: list[dict]) -> str:
    """Render an Ollama chat TEMPLATE (the subset above) for `messages`, as Ollama would fill it."""
    nodes, _ = _block(_parse(template), 0, ())
    out: list[str] = []
    _exec(nodes, {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}, out)
    return "".join(out)


def template_from_modelfile(text: str) -> str:
    mt = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if not mt:
        raise ValueError("no TEMPLATE in the Modelfile")
    return mt.group(1)


def check_modelfile(text: str, tok, system: str | None) -> None:
    """The TEMPLATE renders multi-turn chats exactly as the tokenizer's chat template (BOS aside)."""
    template = template_from_modelfile(text)
    convs = [[{"role": "user", "content": "Hi there"}],
             [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?\nTwo lines."}]]
    for msgs in convs:
        if system:  # Ollama puts SYSTEM in front of a chat that has no system message
            msgs = [{"role": "system", "content": system}] + msgs
        want = _render(tok, msgs, gen=True)
        bos = _auto_bos(tok)
        want = want[len(bos):] if bos and want.startswith(bos) else want
        got = render_go(template, msgs)
        if got != want:
            raise UserError(f"the Modelfile TEMPLATE renders {got!r} where the chat template renders {want!r}")


def write_modelfile(path: Path, gguf_name: str, tok, stops: list[str], system: str | None) -> str:
    text = modelfile(gguf_name, tok, stops, system)
    if tok.chat_template:
        mt = re.search(r'^SYSTEM """(.*?)"""', text, re.S | re.M)
        check_modelfile(text, tok, mt.group(1) if mt else None)
    path.write_text(text, encoding="utf-8")
    return text
