"""The training commands: one per stage, generated with the same options (--set --output --overwrite
--resume --json --fail-if -n --nnodes ... --no-cache); one process or N under torchrun; then gates and --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ftkit.commands.common import (FailIfOpt, JsonOpt, MasterAddrOpt, MasterPortOpt, NnodesOpt, NoCacheOpt,
                                   NodeRankOpt, NumProcessesOpt, OutputOpt, OverwriteOpt, RecipeArg, ResumeOpt, SetOpt,
                                   check_gates, emit, gate_exprs, handle_errors, load, quiet_stdout)
from ftkit.errors import exit_code_of


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def _launch(launch, recipe, final: Path, base: dict, as_json: bool) -> None:
    """The launcher's side of -n N (and --nnodes): torchrun the same command, then report what rank 0 recorded."""
    from ftkit.launch import run_workers, worker_args
    from ftkit.resume import resume_command

    argv = sys.argv[1:]
    rc, _ = run_workers(launch.nproc, worker_args(argv), stdout_to_stderr=as_json, launch=launch,
                        timeout_s=recipe.distributed_timeout)
    if not launch.is_node0:
        raise typer.Exit(rc)  # node 0's launcher reports the run (its dir may not be visible here)
    if rc == 130:
        hint = resume_command(argv)
        print(f"interrupted: checkpoint saved in {final}.partial/checkpoints; resume with: {hint}", file=sys.stderr)
        if as_json:
            emit({**base, "status": "interrupted", "exit_code": 130, "resume": hint})
        raise typer.Exit(130)
    if rc != 0:
        if as_json:
            emit({**base, "status": "error", "exit_code": rc})
        raise typer.Exit(rc)


def _train_here(recipe, base: dict, as_json: bool, **run_opts) -> Path | None:
    """Train in this process (alone or as one rank); None on ranks that do not report."""
    from ftkit.launch import in_distributed_run, launched_by_ftkit, record_result
    from ftkit.resume import Interrupted, resume_command
    from ftkit.stages.lifecycle import run
    from ftkit.ui import is_main_process

    reports = is_main_process() and not launched_by_ftkit()
    try:
        if in_distributed_run():
            from ftkit.distributed import join
            from ftkit.hardware import detect

            join(recipe.distributed_timeout, detect().device)
        final = run(recipe, **run_opts)
    except Interrupted as exc:
        record_result(130)
        if reports:
            hint = resume_command(sys.argv[1:])
            print(f"{exc}; resume with: {hint}", file=sys.stderr)
            if as_json:
                emit({**base, "status": "interrupted", "exit_code": 130, "step": exc.step, "resume": hint})
        raise typer.Exit(130) from None
    except BaseException as exc:
        _name_failed_rank(exc, recipe)
        code = exit_code_of(exc)
        record_result(code)
        if as_json and reports:
            emit({**base, "status": "error", "exit_code": code, "error": str(exc)})
        raise
    record_result(0)
    return final if reports else None


def _name_failed_rank(exc: BaseException, recipe) -> None:
    """A collective that failed because another rank died or hung: one line naming it, exit 1."""
    from ftkit.launch import in_distributed_run, record_result

    if not in_distributed_run():
        return
    from ftkit.distributed import diagnose

    why = diagnose(exc, recipe.distributed_timeout)
    if why:
        print(f"error: {why}", file=sys.stderr, flush=True)
        record_result(1, hang=" timed out " in why)
        raise typer.Exit(1) from None


def train(stage: str, recipe, output: str | None, overwrite: bool, resume: str | None, num_processes: int,
          as_json: bool, fail_if: list[str] | None, no_cache: bool = False, launch=None) -> None:
    """Train one stage; then gates and the --json line (the launcher or rank 0 only)."""
    from ftkit.launch import in_distributed_run
    from ftkit.rundir import default_output_dir
    from ftkit.ui import log

    exprs = gate_exprs(fail_if, recipe)
    if as_json:
        quiet_stdout()
    final = Path(output or default_output_dir(recipe))
    base = {"command": stage, "run_dir": str(final)}
    from ftkit.distributed import Launch

    launch = launch or Launch(nproc=num_processes)
    launch.check()
    if launch.needs_launcher and not in_distributed_run():
        from ftkit.distributed_strategy import check as check_strategy
        from ftkit.hardware import detect

        check_strategy(recipe, launch.world_size, detect().device)  # once here, not once per rank
        _launch(launch, recipe, final, base, as_json)
    else:
        done = _train_here(recipe, base, as_json, output=output, overwrite=overwrite, resume=resume,
                           use_cache=not no_cache)
        if done is None:
            return
        final = done
    metrics = json.loads((final / "metrics.json").read_text(encoding="utf-8"))
    base["metrics"] = _scalars(metrics)
    results = check_gates(metrics, exprs, base, as_json) if exprs else []
    if as_json:
        emit({**base, "status": "ok", "exit_code": 0, "gates": results})
    if (final / "report.html").is_file():
        log(f"report: {final / 'report.html'}")


def _command(stage: str, doc: str):
    """One command per stage: the same options, each with its own name and help text."""

    def command(recipe: str = RecipeArg, set_: Optional[List[str]] = SetOpt,
                output: Optional[str] = OutputOpt, overwrite: bool = OverwriteOpt,
                resume: Optional[str] = ResumeOpt, num_processes: int = NumProcessesOpt,
                as_json: bool = JsonOpt, fail_if: Optional[List[str]] = FailIfOpt,
                no_cache: bool = NoCacheOpt, nnodes: int = NnodesOpt, node_rank: int = NodeRankOpt,
                master_addr: Optional[str] = MasterAddrOpt, master_port: Optional[int] = MasterPortOpt):
        from ftkit.distributed import Launch

        r = load(recipe, set_, stage)
        train(stage, r, output=output, overwrite=overwrite, resume=resume, num_processes=num_processes,
              as_json=as_json, fail_if=fail_if, no_cache=no_cache,
              launch=Launch(num_processes, nnodes, node_rank, master_addr, master_port))

    command.__name__, command.__qualname__, command.__doc__ = stage, stage, doc
    return handle_errors(command)


def register(app: typer.Typer) -> None:
    from ftkit.stages.registry import STAGES

    for spec in STAGES.values():
        app.command(spec.name)(_command(spec.name, spec.help))
