"""Chat rendering and the character spans of the assistant turns, which become the trained labels.

The reference method (`assistant_spans`) renders every conversation prefix: a turn's span runs
from the end of `render(messages[:i], add_generation_prompt=True)` to the end of
`render(messages[:i+1])`, and both must be prefixes of the whole conversation. That costs
two renders per assistant turn, and rendering dominated data preparation.

`SpanFinder` gets the same text and spans without rendering each row, where that is provably
the same:
1. The template must be *content-opaque* (checked once, on its syntax tree): message contents
   are only ever pasted into the output, never tested, filtered, sliced or compared, and the
   messages are only read through constant keys. Then the control flow depends on the roles
   alone, so every conversation with the same roles renders as the same literal pieces with
   the contents pasted between them.
2. Per role sequence, one row is rendered with each content wrapped in unique private-use
   markers. The markers show the literal pieces (each content must appear exactly once, in
   order) and, via the reference method run on that marked row, how far each span's edges lie
   from its content (literal text only, so the same for every such row). The result is
   cross-checked against the reference method on the plain row.
3. Every other row with those roles is then assembled by string joins. Anything unexpected
   falls back to the reference method for that row or role sequence.
"""

from __future__ import annotations

import re

from ftkit.errors import UserError

_M0, _M1 = "\ue000", "\ue001"  # Unicode private use: never in a template's literal text
_MARK = re.compile(_M0 + r"(\d+)([se])" + _M1)


class Renderer:
    """Renders conversations with a chat template exactly as `apply_chat_template(tokenize=False)` does.

    Calls transformers' own compiled (sandboxed) template directly and skips the per-call
    message normalisation, which our canonical rows (plain str dicts) do not need. The first
    render is checked against apply_chat_template; on any difference it uses that instead."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.compiled = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.compiled = _compile_jinja_template(template)
            self.kwargs = dict(tokenizer.special_tokens_map)
        except Exception:  # a transformers without it: the public path is only slower
            self.compiled = None
        self.checked = False

    def _slow(self, messages: list[dict], gen: bool, tools: list | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=gen, tools=tools)

    def __call__(self, messages: list[dict], gen: bool = False, tools: list | None = None) -> str:
        # Tools, tool calls and reasoning need transformers' normalisation (tool schemas, reasoning aliases).
        if self.compiled is None or tools or not all(len(m) == 2 for m in messages):
            return self._slow(messages, gen, tools)
        fast = self.compiled.render(messages=messages, add_generation_prompt=gen, **self.kwargs)
        if not self.checked:
            self.checked = True
            if fast != self._slow(messages, gen):
                self.compiled = None
                return self._slow(messages, gen)
        return fast


class RewritesTurns(UserError):
    """The template renders an earlier turn differently once later turns follow (e.g. Qwen3 drops old reasoning)."""


def assistant_spans(tokenizer, template: str, messages: list[dict], where: str,
                    render=None, tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The reference method: the rendered text and the character span of each assistant turn
    (each through its end-of-turn marker, so the model learns to stop)."""
    if render is None:
        render = Renderer(tokenizer, template)
    full = render(messages, tools=tools)
    spans = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True, tools=tools) if i else ""
        through = full if i == last else render(messages[: i + 1], tools=tools)
        if not through.startswith(before):
            raise UserError(
                f"{where}: the chat template's generation prompt is not the start of the assistant turn it renders, "
                "so response-only labels cannot be placed; set data.train_on: all or choose another data.template"
            )
        if not full.startswith(through):
            raise RewritesTurns(f"{where}: the chat template rewrites earlier turns")
        spans.append((len(before), len(through)))
    return full, spans


def per_turn_samples(render, messages: list[dict], where: str,
                     tools: list | None = None) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """For templates that rewrite earlier turns: [(text, [(message index, start, end)])], each text
    rendered as the model sees it when that sample's last trained turn is generated. Turns whose
    rendering stays a prefix of a later sample's text share that sample (Qwen3: one sample per user
    query, with all the tool-calling turns after it)."""
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True, tools=tools) if i else ""
        through = render(messages[: i + 1], tools=tools)
        if not through.startswith(before):
            raise UserError(f"{where}: the chat template's generation prompt is not the start of the assistant "
                            "turn it renders; set data.train_on: all or choose another data.template")
        turns.append((i, len(before), through))
    samples = []
    while turns:
        i_last, _, text = turns[-1]
        inside = [t for t in turns if text.startswith(t[2])]
        samples.append((text, [(i, a, len(through)) for i, a, through in inside]))
        turns = [t for t in turns if t not in inside]
    return samples[::-1]


def content_opaque(env, template: str) -> bool:
    """True when the template only pastes message contents into the output (see module doc).

    Conservative: any use it does not recognise makes it False, which only costs speed."""
    from jinja2 import nodes

    try:
        tree = env.parse(template)
    except Exception:
        return False
    parents: dict[int, nodes.Node] = {}
    for node in tree.find_all(nodes.Node):
        for child in node.iter_child_nodes():
            parents[id(child)] = node
    msg_names = set()
    for loop in tree.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Slice):
            it = it.node
        if isinstance(it, nodes.Name) and it.name == "messages":
            if not isinstance(loop.target, nodes.Name):
                return False
            msg_names.add(loop.target.name)
    for assign in tree.find_all((nodes.Assign, nodes.AssignBlock)):
        target = assign.target
        names = {n.name for n in target.find_all(nodes.Name)} | ({target.name} if isinstance(target, nodes.Name) else set())
        if names & (msg_names | {"messages"}):
            return False

    def pasted(node) -> bool:
        """The value may only climb through `+` / `~` into an output."""
        while True:
            up = parents.get(id(node))
            if not isinstance(up, (nodes.Add, nodes.Concat)):
                return isinstance(up, nodes.Output)
            node = up

    def message_access_ok(expr) -> bool:
        """`expr` is one message: it may only be read through a constant key."""
        parent = parents.get(id(expr))
        if isinstance(parent, nodes.Getattr) and parent.node is expr:
            return True
        return isinstance(parent, nodes.Getitem) and parent.node is expr and isinstance(parent.arg, nodes.Const)

    for access in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key = access.attr if isinstance(access, nodes.Getattr) else getattr(access.arg, "value", None)
        if key == "content" and not pasted(access):
            return False
        if (isinstance(access, nodes.Getattr) and access.attr in ("previtem", "nextitem")
                and not message_access_ok(access)):
            return False

    for name in tree.find_all(nodes.Name):
        if name.ctx != "load":
            continue
        parent = parents.get(id(name))
        if name.name == "messages":
            if isinstance(parent, nodes.For) and parent.iter is name:
                continue
            if isinstance(parent, nodes.Filter) and parent.name == "length" and parent.node is name:
                continue
            if isinstance(parent, nodes.Getitem) and parent.node is name:
                if isinstance(parent.arg, nodes.Slice) and isinstance(parents.get(id(parent)), nodes.For):
                    continue
                if (isinstance(parent.arg, nodes.Const) and isinstance(parent.arg.value, int)
                        and message_access_ok(parent)):
                    continue
            return False
        if name.name in msg_names and not message_access_ok(name):
            return False
    return True


def _marked(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": f"{_M0}{j}s{_M1}{m['content']}{_M0}{j}e{_M1}"}
            for j, m in enumerate(messages)]


class SpanFinder:
    """`assistant_spans`, without rendering each row where that is provably the same (module doc)."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.render = Renderer(tokenizer, template)
        literals = template + "".join(str(v) for v in self.render.kwargs.values()) if self.render.compiled else ""
        self.fast = (self.render.compiled is not None and _M0 not in literals and _M1 not in literals
                     and content_opaque(self.render.compiled.environment, template))
        # roles -> (literal pieces, [(assistant message index, start delta, end delta)]), or None: reference
        self.shapes: dict[tuple, tuple | None] = {}
        self.reference_rows = 0  # rows the fast path could have taken but that went to the reference method

    def __call__(self, messages: list[dict], where: str, tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
        # Tools, tool calls and native reasoning keys take the reference method (counted).
        if self.fast and not tools and all(len(m) == 2 for m in messages):
            shape = tuple(m["role"] for m in messages)
            plan = self.shapes.get(shape, False)
            if plan is False and not any(_M0 in m["content"] for m in messages):
                plan = self.shapes[shape] = self._calibrate(messages, where)
            if plan:
                return _assemble(messages, *plan)
        self.reference_rows += self.fast
        return assistant_spans(self.tokenizer, self.template, messages, where, render=self.render, tools=tools)

    def _calibrate(self, messages, where) -> tuple | None:
        n = len(messages)
        try:
            full, spans = assistant_spans(self.tokenizer, self.template, _marked(messages), where, render=self.render)
            want = assistant_spans(self.tokenizer, self.template, messages, where, render=self.render)
        except UserError:
            return None  # the reference method on the plain row gives the real message
        found = list(_MARK.finditer(full))
        if [(int(m.group(1)), m.group(2)) for m in found] != [(j, k) for j in range(n) for k in "se"]:
            return None  # a content left out, repeated or reordered
        starts, ends = found[0::2], found[1::2]
        if any(full[s.end() : e.start()] != m["content"] for s, e, m in zip(starts, ends, messages)):
            return None
        bounds = [0] + [x for s, e in zip(starts, ends) for x in (s.start(), e.end())] + [len(full)]
        pieces = [full[bounds[k] : bounds[k + 1]] for k in range(0, len(bounds), 2)]
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        deltas = []
        for i, (a, b) in zip(assistants, spans):
            s_at, e_end = starts[i].start(), ends[i].end()
            # Only literal template text may lie between a content and its span's edges.
            if not (a <= s_at and b >= e_end and _M0 not in full[a:s_at] and _M0 not in full[e_end:b]):
                return None
            deltas.append((i, s_at - a, b - e_end))
        plan = (pieces, deltas)
        return plan if _assemble(messages, *plan) == want else None


def _assemble(messages: list[dict], pieces: list[str], deltas: list) -> tuple[str, list[tuple[int, int]]]:
    parts, pos, bounds = [pieces[0]], len(pieces[0]), []
    for m, lit in zip(messages, pieces[1:]):
        c = m["content"]
        bounds.append((pos, pos + len(c)))
        parts += (c, lit)
        pos += len(c) + len(lit)
    return "".join(parts), [(bounds[i][0] - ds, bounds[i][1] + de) for i, ds, de in deltas]
