"""What CI jobs use: the training-command wrapper (multi-process launch, resume, gates, --json),
and the `eval` and `report` commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ftkit.errors import GateFailed, UserError

NumProcessesOpt = typer.Option(1, "--num-processes", "-n", min=1,
                               help="Processes (GPUs) to train on; >1 re-runs this command under torchrun")
ResumeOpt = typer.Option(None, "--resume", metavar="[PATH]",
                         help="Continue the interrupted run from its latest checkpoint, or from PATH (--resume=PATH)")
JsonOpt = typer.Option(False, "--json", help="Print one machine-readable summary line on stdout at the end")
FailIfOpt = typer.Option(None, "--fail-if", metavar="EXPR",
                         help="Quality gate, e.g. 'eval_loss > 1.2': exit 3 when it holds (repeatable)")


def bare_resume_as_latest(argv: list[str]) -> list[str]:
    """`--resume` takes an optional PATH, which typer cannot express: a bare one becomes --resume=latest."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--resume=latest"
    return out


def _quiet_stdout() -> None:
    # With --json, stdout carries only the summary line; logs and progress move to stderr.
    from ftkit import ui

    ui.console.file = sys.stderr


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def emit(summary: dict) -> None:
    print(json.dumps(summary), flush=True)


def _gate_exprs(fail_if: list[str] | None, recipe=None) -> list[str]:
    from ftkit.gates import parse_all

    exprs = list(fail_if or [])
    parse_all(exprs)  # a malformed --fail-if is a usage error before any training
    if recipe is not None:
        exprs += [g.fail_if for g in recipe.gates]
    return exprs


def _check_gates(metrics: dict, exprs: list[str], base: dict, as_json: bool) -> list[dict]:
    from ftkit.gates import check
    from ftkit.ui import log

    try:
        results = check(metrics, exprs)
    except GateFailed as exc:
        if as_json:
            emit({**base, "status": "gate_failed", "exit_code": 3, "gates": getattr(exc, "results", [])})
        raise
    for r in results:
        log(f"[green]gate passed:[/] {r['metric']} = {r['value']:.6g} (fails if {r['gate']})")
    return results


def train(stage: str, recipe, output: str | None, overwrite: bool, resume: str | None, num_processes: int,
          as_json: bool, fail_if: list[str] | None, no_cache: bool = False) -> None:
    """`ftkit sft|pt`: one process, or N under torchrun; then gates and the --json line (rank 0 only)."""
    from ftkit.launch import in_distributed_run, launched_by_ftkit, record_result, run_workers, worker_args
    from ftkit.resume import Interrupted, resume_command
    from ftkit.stages.common import default_output_dir
    from ftkit.ui import is_main_process, log

    exprs = _gate_exprs(fail_if, recipe)
    if as_json:
        _quiet_stdout()
    final = Path(output or default_output_dir(recipe))
    base = {"command": stage, "run_dir": str(final)}
    argv = sys.argv[1:]

    if num_processes > 1 and not in_distributed_run():
        rc, _ = run_workers(num_processes, worker_args(argv), stdout_to_stderr=as_json)
        if rc == 130:
            hint = resume_command(argv)
            print(f"interrupted: checkpoint saved in {final}.partial/checkpoints; resume with: {hint}",
                  file=sys.stderr)
            if as_json:
                emit({**base, "status": "interrupted", "exit_code": 130, "resume": hint})
            raise typer.Exit(130)
        if rc != 0:
            if as_json:
                emit({**base, "status": "error", "exit_code": rc})
            raise typer.Exit(rc)
    else:
        from ftkit.stages import sft

        try:
            final = sft.run(recipe, output=output, overwrite=overwrite, resume=resume, use_cache=not no_cache)
        except Interrupted as exc:
            record_result(130)
            if is_main_process() and not launched_by_ftkit():
                hint = resume_command(argv)
                print(f"{exc}; resume with: {hint}", file=sys.stderr)
                if as_json:
                    emit({**base, "status": "interrupted", "exit_code": 130, "step": exc.step, "resume": hint})
            raise typer.Exit(130) from None
        except BaseException as exc:
            code = getattr(exc, "exit_code", None) or (130 if isinstance(exc, KeyboardInterrupt) else 1)
            record_result(code)
            if as_json and is_main_process() and not launched_by_ftkit():
                emit({**base, "status": "error", "exit_code": code, "error": str(exc)})
            raise
        record_result(0)
        if not is_main_process() or launched_by_ftkit():
            return  # the launcher (or rank 0) reports

    metrics = json.loads((final / "metrics.json").read_text(encoding="utf-8"))
    base["metrics"] = _scalars(metrics)
    results = _check_gates(metrics, exprs, base, as_json) if exprs else []
    if as_json:
        emit({**base, "status": "ok", "exit_code": 0, "gates": results})
    if (final / "report.html").is_file():
        log(f"report: {final / 'report.html'}")


# --------------------------------------------------------------------------- ftkit eval


def eval_command(
    target: str = typer.Argument(..., help="Run dir, merged dir, model alias or hub id"),
    data: List[str] = typer.Option(..., "--data", "-d", help="Eval data file (repeatable); any training format"),
    fmt: str = typer.Option("auto", "--format", help="auto | messages | alpaca | sharegpt | completion | text"),
    max_length: int = typer.Option(1024, "--max-length", min=9, help="Tokens per row (longer rows are truncated)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Reply length for exact/regex match"),
    no_generate: bool = typer.Option(False, "--no-generate", help="Loss/perplexity only (skip generation)"),
    regex: Optional[str] = typer.Option(None, "--regex", help="Also score the first match of this pattern "
                                        "(group 1 if any) in reply vs reference, e.g. '(-?\\d+)'"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N rows"),
    base: Optional[str] = typer.Option(None, "--base", help="Base model for an adapter dir"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write metrics and samples to this JSON file"),
    as_json: bool = JsonOpt,
    fail_if: Optional[List[str]] = FailIfOpt,
):
    """Eval loss/perplexity on a data file and, where rows end in a reference reply, exact (and regex) match."""
    from rich.table import Table

    from ftkit.data.formats import to_canonical
    from ftkit.data.sources import read_rows
    from ftkit.evaluate import evaluate_rows
    from ftkit.hardware import detect
    from ftkit.inference import load_for_inference
    from ftkit.ui import console, log, quiet_libraries

    exprs = _gate_exprs(fail_if)
    if as_json:
        _quiet_stdout()
    if fmt not in ("auto", "messages", "alpaca", "sharegpt", "completion", "text"):
        raise UserError(f"--format {fmt!r}: one of auto, messages, alpaca, sharegpt, completion, text")
    rows = []
    for item in data:
        path = Path(item).expanduser()
        if not path.exists():
            raise UserError(f"--data {item}: file not found")
        rows += read_rows(path)
    if not rows:
        raise UserError(f"--data {', '.join(data)}: no rows")
    _, canonical = to_canonical(rows[:limit] if limit else rows, fmt, {}, None, recipe_where="--format")
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
                        batch_size=batch_size, generate=not no_generate, max_new_tokens=max_new_tokens, regex=regex)
    samples = res.pop("samples", [])
    table = Table(title=f"eval: {target} on {', '.join(data)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if output:
        Path(output).expanduser().write_text(json.dumps({**res, "target": target, "samples": samples}, indent=2) + "\n",
                                             encoding="utf-8")
    summary = {"command": "eval", "target": target, "metrics": res}
    results = _check_gates(res, exprs, summary, as_json) if exprs else []
    if as_json:
        emit({**summary, "status": "ok", "exit_code": 0, "gates": results})


# --------------------------------------------------------------------------- ftkit report


def report_command(run_dir: str = typer.Argument(..., help="A run dir written by ftkit sft/pt")):
    """Loss/learning-rate curves (report.png) and a self-contained report.html for a run dir."""
    from ftkit.report import write_report

    png, page = write_report(run_dir)
    print(page)
    print(png, file=sys.stderr)
