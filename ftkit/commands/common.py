"""What every command module shares: the error console, the error-to-exit-code wrapper, the
recipe loader and the option types. Commands import this module; it imports no command, so the
CLI's imports run one way (cli.py -> commands/* -> common.py)."""

from __future__ import annotations

import functools
import json
import sys
from typing import List, Optional

import typer

from ftkit.choices import DTYPES, as_enum
from ftkit.errors import FtkitError, exit_code_of
from ftkit.ui import err  # one error console for the commands and the pipeline

SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe field: key.path=value (repeatable)")
OutputOpt = typer.Option(None, "--output", "-o", help="Run dir (default: output.dir, else runs/<recipe name>)")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing non-empty run dir")
NoCacheOpt = typer.Option(False, "--no-cache", help="Re-tokenize the data even if a cached copy exists")
NumProcessesOpt = typer.Option(1, "--num-processes", "-n", min=1,
                               help="Processes (GPUs) to train on; >1 re-runs this command under torchrun")
NnodesOpt = typer.Option(1, "--nnodes", min=1, help="Machines in a multi-node run (each runs -n processes)")
NodeRankOpt = typer.Option(0, "--node-rank", min=0, help="This machine's index, 0 .. nnodes-1 (node 0 writes the run dir)")
MasterAddrOpt = typer.Option(None, "--master-addr", metavar="HOST", help="Address of node 0, the same on every node")
MasterPortOpt = typer.Option(None, "--master-port", metavar="PORT", help="Port on node 0 for the rendezvous (default 29500)")
ResumeOpt = typer.Option(None, "--resume", metavar="[PATH]",
                         help="Continue the interrupted run from its latest checkpoint, or from PATH (--resume=PATH)")
JsonOpt = typer.Option(False, "--json", help="Print one machine-readable summary line on stdout at the end")
FailIfOpt = typer.Option(None, "--fail-if", metavar="EXPR",
                         help="Quality gate, e.g. 'eval_loss > 1.2': exit 3 when it holds (repeatable)")
RecipeArg = typer.Argument(..., help="Recipe YAML")
Dtype = as_enum("Dtype", DTYPES)  # --dtype of generate, score, merge-lora: the schema's model.dtype values


def handle_errors(fn):
    """Known errors become one clear message and their exit code; no traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FtkitError as exc:
            err.print(f"[bold red]{exc.label}:[/] {exc}")
            raise typer.Exit(exit_code_of(exc)) from None
        except KeyboardInterrupt as exc:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(exit_code_of(exc)) from None
        except RuntimeError as exc:
            if "home directory" not in str(exc):  # pathlib's expanduser of `~name` for an unknown user
                raise
            err.print("[bold red]error:[/] a path starts with ~name for a user this machine does not have; "
                      "write the path out in full")
            raise typer.Exit(2) from None

    return wrapper


def load(recipe: str, overrides: Optional[List[str]], stage: str | None = None):
    """The recipe with --set applied, its stage checked against the command's, its files found."""
    from ftkit.errors import UserError
    from ftkit.recipe import check_files, load_recipe

    r = load_recipe(recipe, overrides)
    if stage is not None:
        explicit = (r._located is not None and ("stage",) in r._located.lines) or ("stage",) in r._origin
        if explicit and r.stage != stage:
            raise UserError(f"{r.where('stage')}: the recipe says stage: {r.stage}, but this is `ftkit {stage}`; "
                            f"run `ftkit {r.stage} {recipe}`")
        r.stage = stage
    check_files(r)
    return r


def bare_resume_as_latest(argv: list[str]) -> list[str]:
    """`--resume` takes an optional PATH, which typer cannot express: a bare one becomes --resume=latest."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--resume=latest"
    return out


def quiet_stdout() -> None:
    """With --json, stdout carries only the summary line; logs and progress move to stderr."""
    from ftkit import ui

    ui.console.file = sys.stderr


def emit(summary: dict) -> None:
    print(json.dumps(summary), flush=True)


def gate_exprs(fail_if: list[str] | None, recipe=None) -> list[str]:
    """--fail-if plus the recipe's gates; a malformed --fail-if is a usage error before any work."""
    from ftkit.gates import parse_all

    exprs = list(fail_if or [])
    parse_all(exprs)
    if recipe is not None:
        exprs += [g.fail_if for g in recipe.gates]
    return exprs


def check_gates(metrics: dict, exprs: list[str], base: dict, as_json: bool) -> list[dict]:
    """Apply the gates; on failure the --json line says so before GateFailed reaches handle_errors."""
    from ftkit.errors import GateFailed
    from ftkit.gates import check
    from ftkit.ui import log

    try:
        results = check(metrics, exprs)
    except GateFailed as exc:
        if as_json:
            emit({**base, "status": "gate_failed", "exit_code": exc.exit_code, "gates": getattr(exc, "results", [])})
        raise
    for r in results:
        log(f"[green]gate passed:[/] {r['metric']} = {r['value']:.6g} (fails if {r['gate']})")
    return results
