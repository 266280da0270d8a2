"""`ftkit eval` (loss, perplexity and reply metrics of a model on a data file) and `ftkit report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ftkit.choices import CHAT_FORMATS, EVAL_METRICS, as_enum
from ftkit.commands.common import FailIfOpt, JsonOpt, check_gates, emit, gate_exprs, quiet_stdout
from ftkit.errors import UserError

EvalFormat = as_enum("EvalFormat", ("auto", *CHAT_FORMATS))
Metric = as_enum("Metric", EVAL_METRICS)


def eval_command(
    target: str = typer.Argument(..., help="Run dir, merged dir, model alias or hub id"),
    data: List[str] = typer.Option(..., "--data", "-d", help="Eval data file (repeatable); any training format"),
    fmt: EvalFormat = typer.Option("auto", "--format", help="Row format of the data files"),
    column: Optional[List[str]] = typer.Option(None, "--column", help="format_col=your_col: map your column names "
                                               "onto the format's, e.g. instruction=question (repeatable)"),
    role: Optional[List[str]] = typer.Option(None, "--role", help="your_role=user|assistant|system|tool "
                                             "(repeatable)"),
    max_length: int = typer.Option(1024, "--max-length", min=9, help="Tokens per row (longer rows are truncated)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Reply length for the reply metrics"),
    no_generate: bool = typer.Option(False, "--no-generate", help="Loss/perplexity only (skip generation)"),
    metric: Optional[List[Metric]] = typer.Option(None, "--metric", "-m",
                                                  help="Reply metric (repeatable; default exact_match); the same "
                                                       "names work in --fail-if"),
    regex: Optional[str] = typer.Option(None, "--regex", help="Pattern for --metric regex (implied): its first "
                                        "match (group 1 if any) in reply vs reference, e.g. '(-?\\d+)'"),
    label: Optional[List[str]] = typer.Option(None, "--label", help="accuracy/macro_f1: the label set "
                                              "(repeatable; default: the references' distinct values)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N rows"),
    base: Optional[str] = typer.Option(None, "--base", help="Base model for an adapter dir"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write metrics and samples to this JSON file"),
    as_json: bool = JsonOpt,
    fail_if: Optional[List[str]] = FailIfOpt,
):
    """Eval loss/perplexity on a data file and, where rows end in a reference reply, reply metrics
    (--metric; the same names work in --fail-if)."""
    from ftkit.evaluate import evaluate_rows
    from ftkit.hardware import detect
    from ftkit.inference import load_for_inference
    from ftkit.ui import log, quiet_libraries

    exprs = gate_exprs(fail_if)
    if as_json:
        quiet_stdout()
    metrics = [m.value for m in metric or []] or ["exact_match"]
    if regex and "regex" not in metrics:
        metrics.append("regex")
    if "regex" in metrics and not regex:
        raise UserError("--metric regex needs --regex PATTERN (the part of each reply to compare)")
    canonical = _read_rows(data, fmt.value, column, role, limit)
    if output:
        out_path = Path(output).expanduser()
        if not out_path.parent.is_dir():
            raise UserError(f"--output {output}: folder {out_path.parent} does not exist")

    import torch

    quiet_libraries()
    torch.manual_seed(0)
    hw = detect()
    model, tok = load_for_inference(target, dtype=hw.dtype, base=base, log=log)
    res = evaluate_rows(model, tok, canonical, getattr(tok, "chat_template", None), max_length=max_length,
                        batch_size=batch_size, generate=not no_generate, max_new_tokens=max_new_tokens,
                        metrics=metrics, regex=regex, labels=label)
    samples = res.pop("samples", [])
    _print_table(f"eval: {target} on {', '.join(data)}", res)
    if output:
        Path(output).expanduser().write_text(json.dumps({**res, "target": target, "samples": samples}, indent=2) + "\n",
                                             encoding="utf-8")
    summary = {"command": "eval", "target": target, "metrics": res}
    results = check_gates(res, exprs, summary, as_json) if exprs else []
    if as_json:
        emit({**summary, "status": "ok", "exit_code": 0, "gates": results})


def _read_rows(data: list[str], fmt: str, column, role, limit: int | None) -> list[dict]:
    """--data files as canonical rows (bad rows: exit 2 naming file:line and the flag that fixes them)."""
    from ftkit.data.formats import flag_columns, to_canonical
    from ftkit.data.sources import read_rows

    cols = flag_columns(column, role, "--format")
    rows = []
    for item in data:
        path = Path(item).expanduser()
        if not path.exists():
            raise UserError(f"--data {item}: file not found")
        rows += read_rows(path)
    if not rows:
        raise UserError(f"--data {', '.join(data)}: no rows")
    return to_canonical(rows[:limit] if limit else rows, fmt, cols, None, recipe_where="--column")[1]


def _print_table(title: str, res: dict) -> None:
    from rich.table import Table

    from ftkit.ui import console

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def report_command(run_dir: str = typer.Argument(..., help="A run dir written by a training command")):
    """Loss/learning-rate curves (report.png) and a self-contained report.html for a run dir."""
    from ftkit.report import write_report

    png, page = write_report(run_dir)
    print(page)
    print(png, file=sys.stderr)
