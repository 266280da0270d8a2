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


def bench_command(recipe: str = typer.Argument(..., help="Recipe YAML (sft or pt)"),
                  set_: Optional[List[str]] = SetOpt,
                  steps: int = typer.Option(5, "--steps", min=2, help="Training steps to time"),
                  as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line")):
    """Time a few training steps: tokens/s, peak memory, projected time for the whole run."""
    from ftkit.commands.common import load, quiet_stdout
    from ftkit.rundir import default_output_dir
    from ftkit.stages.lifecycle import run
    from ftkit.ui import console, log

    r = load(recipe, set_)
    if r.stage not in ("sft", "pt"):
        raise UserError(f"{r.where('stage')}: bench times sft and pt recipes, not {r.stage}")
    wanted_steps, r.train.max_steps = r.train.max_steps, steps
    r.data.eval, r.data.eval_split = None, 0.0  # evaluation is not what is being timed
    if as_json:
        quiet_stdout()
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-") as tmp:
        run_dir = run(r, output=str(Path(tmp) / "run"), overwrite=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    r.train.max_steps = wanted_steps
    result = {"recipe": recipe, "output_dir": default_output_dir(r), **project(metrics, history, r)}
    if as_json:
        print(json.dumps(result))
        return
    mins = result["projected_s"] / 60
    log(f"[bold]bench[/] {recipe}: {result['seconds_per_step']:.2f} s/step · "
        f"{result['tokens_per_s'] or 0:,.0f} tokens/s · peak memory {result['peak_memory_mb']:,.0f} MB · "
        f"{result['precision']} on {result['device']}")
    console.print(f"projected: {result['total_steps']} steps ≈ {mins:.1f} min for the whole run")
