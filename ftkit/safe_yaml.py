"""A bounded YAML loader for recipes, pipelines and --set values.

yaml.safe_load never runs code, but it still lets a few bytes of input cost unbounded time,
memory or recursion: a self-referential alias (`a: &x [*x]`) builds a cyclic list that crashes
whatever walks it; an alias bomb ("billion laughs") expands to billions of nodes; deep nesting
overflows Python's recursion. Every such document, and the other ways a loaded value is not
plain data (a bad timestamp, a huge integer, a non-text key, bytes that are not UTF-8), ends
here as a UserError naming `file:line` and the fix: exit 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import UserError

MAX_DEPTH = 100  # no recipe nests more than ~6 deep
MAX_NODES = 100_000  # counted with every alias expanded; a real recipe has a few hundred
MAX_INT_BITS = 63  # every integer field fits an int64
_STR, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
PURE_PYTHON = False  # True: PyYAML's own parser even where libyaml is installed (tests run both)


class YamlSyntaxError(UserError):
    """Not YAML at all (a --set value falls back to plain text on this one)."""


class _Limit(Exception):
    def __init__(self, mark, problem: str):
        self.mark, self.problem = mark, problem


class _Bounded(yaml.composer.Composer, yaml.constructor.SafeConstructor):
    """The limits, over whichever parser supplies the events: stops at MAX_DEPTH while composing
    and maps value errors to their line."""

    _depth = _count = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._count += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            if self._count > MAX_NODES:
                raise _Limit(self.peek_event().start_mark, f"more than {MAX_NODES:,} values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:
            shown = node.value if isinstance(node.value, str) else "this value"
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            raise _Limit(node.start_mark, f"{shown!r} is not a valid value: {str(exc).split(';')[0]}") from None

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        if value.bit_length() > MAX_INT_BITS:
            raise _Limit(node.start_mark, f"the integer {str(node.value)[:20]}... is too large (over 64 bits)")
        return value


_Bounded.add_constructor("tag:yaml.org,2002:int", _Bounded.construct_yaml_int)


class _Loader(_Bounded, yaml.SafeLoader):
    """Pure Python: PyYAML's reader, scanner and parser."""

    def fetch_flow_collection_start(self, TokenClass):
        # The scanner looks ahead over every open `[`/`{` for a possible key: quadratic in the
        # nesting, so stop it here, before the composer ever sees the depth.
        if self.flow_level >= MAX_DEPTH:
            raise _Limit(self.get_mark(), f"nested more than {MAX_DEPTH} levels deep")
        super().fetch_flow_collection_start(TokenClass)


_CParser = getattr(getattr(yaml, "_yaml", None), "CParser", None)
if _CParser is not None:
    class _CLoader(_Bounded, _CParser, yaml.resolver.Resolver):
        """libyaml scans and parses (~5x faster; its scanner stops flow nesting at 1,000 on its own);
        the composing, with the limits, and the constructing stay in Python, as in _Loader."""

        def __init__(self, text: str):
            _CParser.__init__(self, text)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


def _check_graph(root: yaml.Node) -> None:
    """Reject cycles, non-text keys, and documents whose alias expansion exceeds the limits.

    Sizes and depths are memoized per node, so this is linear in the distinct nodes even when
    aliases would expand them exponentially.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: yaml.Node, level: int) -> None:
        key = id(node)
        if key in size:  # seen through another alias: its depth counts again from here
            if level + depth[key] - 1 > MAX_DEPTH:
                raise _Limit(node.start_mark, f"aliases here nest more than {MAX_DEPTH} levels deep")
            return
        if key in active:
            raise _Limit(node.start_mark, "an alias refers to a node that contains it (a cycle); "
                                          "YAML recursion is not allowed here")
        if level > MAX_DEPTH:
            raise _Limit(node.start_mark, f"aliases here nest more than {MAX_DEPTH} levels deep")
        active.add(key)
        children = _children(node)
        for child in children:
            visit(child, level + 1)  # bounded recursion: level never passes MAX_DEPTH
        active.discard(key)
        size[key] = 1 + sum(size[id(c)] for c in children)
        depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[key] > MAX_NODES:
            raise _Limit(node.start_mark, f"aliases here expand to more than {MAX_NODES:,} values (an alias bomb?)")

    visit(root, 1)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if not isinstance(node, yaml.MappingNode):
        return []
    out = []
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise _Limit(k.start_mark, "a key is a list or mapping; keys must be text")
        if k.tag not in (_STR, _MERGE):
            raise _Limit(k.start_mark, f"the key {k.value[:40]!r} is read as {k.tag.rsplit(':', 1)[-1]}, not text; "
                                       f"quote it (\"{k.value[:40]}\")")
        out += [k, v]
    return out


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{where}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        f"save the file as UTF-8") from None


def read_text(path: str | Path, where: str | None = None) -> str:
    """A UTF-8 file's text; an unreadable or non-UTF-8 file is a UserError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{where or path}: cannot read: {exc.strerror}") from None
    return decode(raw, where or str(path))


def load(text: str, where: str, lines: bool = True) -> Any:
    """Parse one YAML document within the limits above; errors name `where:line` (`where` without lines)."""
    if "\x00" in text:
        raise YamlSyntaxError(f"{where}: contains a NUL byte; this is not a text file")
    loader = None
    try:
        loader = (_CLoader if _CParser is not None and not PURE_PYTHON else _Loader)(text)  # both reject control chars
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    except _Limit as exc:
        raise UserError(f"{where}{f':{exc.mark.line + 1}' if lines else ''}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None and lines else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if problem == "exceeded maximum nesting depth":  # libyaml's own limit (1,000) on flow nesting
            raise UserError(f"{where}{line}: nested more than {MAX_DEPTH} levels deep") from None
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context:  # e.g. "second occurrence" means little without "found duplicate anchor ...; first occurrence"
            problem += f" ({context}{f' at line {cmark.line + 1}' if cmark is not None else ''})"
        raise YamlSyntaxError(f"{where}{line}: not valid YAML: {problem}") from None
    except UnicodeEncodeError as exc:  # libyaml takes UTF-8: a lone surrogate (undecodable bytes in argv)
        raise YamlSyntaxError(f"{where}: not valid YAML: {exc.object[exc.start:exc.end]!r} is not Unicode text") from None
    except RecursionError:  # a safety net; the limits above are meant to stop everything first
        raise UserError(f"{where}: nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_value(raw: str, where: str) -> Any:
    """A --set value: YAML when it parses (within the limits), else the text as written."""
    if not raw.strip():
        return ""
    try:
        return load(raw, where, lines=False)
    except YamlSyntaxError:
        return raw


def load_mapping_file(path: Path | str, what: str = "a recipe") -> dict:
    """A YAML file ftkit wrote (a run dir's recipe.yaml) read back within the same limits: a run dir
    may come from anywhere (a download, a shared disk), so a hostile one is a UserError, not a crash.
    A missing or empty file is {}; anything but a mapping is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = load(read_text(path, str(path)), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: expected {what} (a mapping of sections), found {type(data).__name__}; "
                        "this file was not written by ftkit or was damaged")
    return data


def section(data: dict, name: str, where: Path | str) -> dict:
    """data[name] as a mapping ({} when absent); anything else is a UserError naming the file and key."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {name}: expected a mapping, found {type(value).__name__}; "
                        "this file was not written by ftkit or was damaged")
    return value
