"""`ftkit score` (a reward model on replies) and `ftkit pipeline` (stages in order)."""

from __future__ import annotations

from typing import List, Optional

import typer

from ftkit.commands.common import Dtype, err, handle_errors


@handle_errors
def score(model: str = typer.Argument(..., help="rm run dir or merged reward model dir"),
          prompt: str = typer.Option(..., "--prompt", "-p", help="The user message"),
          response: List[str] = typer.Option(..., "--response", "-r", help="A reply to score (repeatable)"),
          system: Optional[str] = typer.Option(None, "--system", help="System message"),
          dtype: Dtype = typer.Option("auto", "--dtype", help="auto: picked from the hardware")):
    """Score replies to a prompt with a reward model (higher = preferred)."""
    from ftkit.hardware import detect
    from ftkit.reward_model import load_reward_model
    from ftkit.reward_model import score as run_score

    m, tok = load_reward_model(model, dtype=detect(dtype.value).dtype, log=lambda s: err.print(s))
    for value, reply in zip(run_score(m, tok, [(prompt, r) for r in response], system=system), response):
        print(f"{value:.4f}\t{reply}")


@handle_errors
def pipeline(file: str = typer.Argument(..., help="Pipeline YAML (named stages, run in order)"),
             force: bool = typer.Option(False, "--force", help="Re-run every stage, even finished ones"),
             dry_run: bool = typer.Option(False, "--dry-run", help="Validate every stage and show the plan only")):
    """Run stages in order (sft -> rm -> rl ...), skipping finished ones; stops at the first failure or failed gate."""
    from ftkit.pipeline import run_pipeline

    code = run_pipeline(file, force=force, dry_run=dry_run)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    for fn in (score, pipeline):
        app.command(fn.__name__)(fn)
