"""`ftkit bench RECIPE`: time a few real training steps of a recipe, to size a job before starting it."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from ftkit.commands.common import SetOpt
from ftkit.errors import UserError


def project(metrics: dict, history: list[dict], recipe) -> dict:
    """Steady-state seconds per step (the first step pays warm-up, so it is left out when there are
    more) and the whole run's projected time from the recipe's epochs or max_steps."""
    train = [h for h in history if h.get("kind", "train") == "train" and "loss" in h]
    if len(train) >= 2:
        span = train[-1]["elapsed_s"] - train[0]["elapsed_s"]
        s_per_step = span / (train[-1]["step"] - train[0]["step"])
        tokens = train[-1]["tokens_seen"] - train[0]["tokens_seen"]
        tokens_per_s = tokens / span if span > 0 else None
    else:
        s_per_step = metrics["wall_s"] / max(1, metrics["steps"])
        tokens_per_s = metrics["tokens_per_s"]
    t = recipe.train
    packing = metrics.get("packing") or {}
    rows = packing["rows"] if packing.get("enabled") else metrics["data"]["train"]["kept"]
    per_step = metrics["global_batch_size"]
    total = t.max_steps or math.ceil(math.ceil(rows / per_step) * t.epochs)
    return {"timed_steps": metrics["steps"], "seconds_per_step": round(s_per_step, 3),
            "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
            "peak_memory_mb": metrics["peak_memory_mb"], "precision": metrics["precision"],
            "device": metrics["device"], "total_steps": total, "projected_s": round(total * s_per_step, 1)}


def project_rest(clock_seconds: dict[str, float], command_s: float, metrics: dict, projection: dict,
                 evals_during_training: int = 0) -> dict:
    """The whole command = projected training steps + the rest, each phase of the rest as timed once
    (they do not grow with the step count), periodic evaluations counted as often as they will run,
    and what no phase accounts for (setup, the training warm-up) as 'other'."""
    from ftkit.phase_clock import PHASES, TRAINING

    timed = {name: round(clock_seconds.get(name, 0.0), 2) for name in PHASES}
    steady = projection["seconds_per_step"] * projection["timed_steps"]
    training = clock_seconds.get(TRAINING, metrics["wall_s"])
    rest = dict(timed)
    if evals_during_training and timed["evaluation"]:
        rest["evaluation"] = round(timed["evaluation"] * (1 + evals_during_training), 2)
    rest["other"] = round(max(0.0, command_s - sum(timed.values()) - steady), 2)
    train_s = projection["total_steps"] * projection["seconds_per_step"]
    return {"command_s": round(command_s, 2), "training_s": round(training, 2), "phases_s": rest,
            "projected_train_s": round(train_s, 1), "projected_rest_s": round(sum(rest.values()), 1),
            "projected_s": round(train_s + sum(rest.values()), 1)}


def _timed_run(r):
    """Run the recipe's real lifecycle (in a throwaway dir), which times its own phases; returns
    (metrics, history, phase seconds, command seconds)."""
    import time

    from ftkit.phase_clock import PhaseClock
    from ftkit.stages import lifecycle

    clock = PhaseClock()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-") as tmp:
        run_dir = lifecycle.run(r, output=str(Path(tmp) / "run"), overwrite=True, clock=clock)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return metrics, history, clock.seconds, time.perf_counter() - t0


def bench_command(recipe: str = typer.Argument(..., help="Recipe YAML (sft or pt)"),
                  set_: Optional[List[str]] = SetOpt,
                  steps: int = typer.Option(5, "--steps", min=2, help="Training steps to time"),
                  as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line")):
    """Time a real run of a few training steps, with its loading, evaluation, samples and saving:
    tokens/s, peak memory, and the projected time of the whole command."""
    from ftkit.commands.common import load, quiet_stdout
    from ftkit.rundir import default_output_dir
    from ftkit.ui import console, log

    r = load(recipe, set_)
    if r.stage not in ("sft", "pt"):
        raise UserError(f"{r.where('stage')}: bench times sft and pt recipes, not {r.stage}")
    wanted_steps, r.train.max_steps = r.train.max_steps, steps
    # Periodic evaluation is timed once (at the end) and counted as often as the real run will do it.
    eval_every, r.train.eval_steps = r.train.eval_steps, None
    if as_json:
        quiet_stdout()
    metrics, history, phases, command_s = _timed_run(r)
    r.train.max_steps = wanted_steps
    result = {"recipe": recipe, "output_dir": default_output_dir(r), **project(metrics, history, r)}
    periodic = result["total_steps"] // eval_every if eval_every else 0
    result.update(project_rest(phases, command_s, metrics, result, periodic))
    if as_json:
        print(json.dumps(result))
        return
    log(f"[bold]bench[/] {recipe}: {result['seconds_per_step']:.2f} s/step · "
        f"{result['tokens_per_s'] or 0:,.0f} tokens/s · peak memory {result['peak_memory_mb']:,.0f} MB · "
        f"{result['precision']} on {result['device']} · this bench took {command_s:.0f}s")
    console.print(projection_line(result))


def projection_line(result: dict) -> str:
    rest = " + ".join(f"{name} {s:.0f}s" for name, s in result["phases_s"].items() if s >= 0.5) or "none"
    return (f"projected: {_clock(result['projected_s'])} for the whole command = training "
            f"{result['total_steps']} steps {_clock(result['projected_train_s'])} + the rest "
            f"{_clock(result['projected_rest_s'])} ({rest})")


def _clock(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f}s"
