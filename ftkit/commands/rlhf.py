"""CLI commands for the preference / RLHF stages and the pipeline (registered in ftkit/cli.py)."""

from __future__ import annotations

from typing import List, Optional

import typer

from ftkit.cli import OutputOpt, OverwriteOpt, SetOpt, _load, err, handle_errors

RecipeArg = typer.Argument(..., help="Recipe YAML")


def _stage(stage: str, recipe: str, overrides, output, overwrite):
    from ftkit.pipeline import STAGE_RUNNERS

    r = _load(recipe, overrides, stage)
    STAGE_RUNNERS[stage](r, output=output, overwrite=overwrite)


def _stage_command(stage: str, doc: str):
    """One CLI command per stage: the same options, each with its own name and help text."""

    def command(recipe: str = RecipeArg, set_: Optional[List[str]] = SetOpt, output: Optional[str] = OutputOpt,
                overwrite: bool = OverwriteOpt):
        _stage(stage, recipe, set_, output, overwrite)

    command.__name__, command.__qualname__, command.__doc__ = stage, stage, doc
    return handle_errors(command)


rm = _stage_command("rm", "Reward model: a one-output classifier head trained on preference pairs "
                    "(reports pairwise accuracy).")
dpo = _stage_command("dpo", "Direct preference optimisation on prompt/chosen/rejected pairs.")
kto = _stage_command("kto", "KTO on unpaired replies labelled desirable (true) or not (false).")
orpo = _stage_command("orpo", "ORPO: SFT and preference in one loss, no reference model (TRL experimental).")
rl = _stage_command("rl", "Online RLHF (GRPO or RLOO) against a reward model and/or reward functions. "
                    "TRL 1.16 has no PPO.")


@handle_errors
def score(model: str = typer.Argument(..., help="rm run dir or merged reward model dir"),
          prompt: str = typer.Option(..., "--prompt", "-p", help="The user message"),
          response: List[str] = typer.Option(..., "--response", "-r", help="A reply to score (repeatable)"),
          system: Optional[str] = typer.Option(None, "--system", help="System message"),
          dtype: str = typer.Option("auto", "--dtype", help="auto (picked from the hardware) | float32 | "
                                    "bfloat16 | float16")):
    """Score replies to a prompt with a reward model (higher = preferred)."""
    from ftkit.hardware import detect, dtype_option
    from ftkit.stages.rm import load_reward_model
    from ftkit.stages.rm import score as run_score

    m, tok = load_reward_model(model, dtype=detect(dtype_option(dtype)).dtype, log=lambda s: err.print(s))
    for value, reply in zip(run_score(m, tok, [(prompt, r) for r in response], system=system), response):
        print(f"{value:.4f}\t{reply}")


@handle_errors
def pipeline(file: str = typer.Argument(..., help="Pipeline YAML (named stages, run in order)"),
             force: bool = typer.Option(False, "--force", help="Re-run every stage, even finished ones"),
             dry_run: bool = typer.Option(False, "--dry-run", help="Validate every stage and show the plan only")):
    """Run stages in order (sft -> rm -> rl ...), skipping finished ones; stops at the first failure."""
    from ftkit.pipeline import run_pipeline

    code = run_pipeline(file, force=force, dry_run=dry_run)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    for fn in (rm, dpo, kto, orpo, rl, score, pipeline):
        app.command(fn.__name__)(fn)
