"""Quality gates: 'METRIC OP NUMBER' conditions that fail a CI job (exit 3) when they hold."""

from __future__ import annotations

import operator

from ftkit.errors import GateFailed, UserError
from ftkit.recipe import parse_gate

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
       "!=": operator.ne}


def parse_all(exprs: list[str], source: str = "--fail-if") -> list[tuple[str, str, float]]:
    out = []
    for e in exprs:
        try:
            out.append(parse_gate(e))
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None
    return out


def lookup(metrics: dict, name: str):
    """A metric by name; dotted names reach into nested sections (data.train.kept)."""
    node = metrics
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check(metrics: dict, exprs: list[str]) -> list[dict]:
    """Evaluate every gate; raises GateFailed listing each one that fails (a missing metric fails too)."""
    results = []
    for expr, (name, op, threshold) in zip(exprs, parse_all(exprs)):
        value = lookup(metrics, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            results.append({"gate": expr, "metric": name, "value": value, "failed": True,
                            "why": "metric not recorded in this run"})
            continue
        results.append({"gate": expr, "metric": name, "value": value, "failed": bool(OPS[op](value, threshold))})
    failed = [r for r in results if r["failed"]]
    if failed:
        lines = [f"{r['gate']} (value: {r['value']!r}{'; ' + r['why'] if r.get('why') else ''})" for r in failed]
        available = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        hint = f"; metrics available: {', '.join(available)}" if any(r.get("why") for r in failed) else ""
        err = GateFailed("; ".join(lines) + hint)
        err.results = results  # type: ignore[attr-defined]
        raise err
    return results


def describe(results: list[dict]) -> str:
    return "; ".join(f"{r['gate']} (value {r['value']:.6g}) ok" for r in results)
