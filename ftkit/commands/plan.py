"""`ftkit plan RECIPE [--gpus N --gpu-memory 80GiB]`: parameters and memory per GPU, nothing loaded."""

from __future__ import annotations

import json
from typing import List, Optional

import typer


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_command(recipe: str = typer.Argument(..., help="Recipe YAML"),
                 set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a recipe field"),
                 gpus: Optional[int] = typer.Option(None, "--gpus", min=1,
                                                    help="GPUs the run will use (default: those visible)"),
                 gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", metavar="SIZE",
                                                          help="Memory of one GPU, e.g. 80GiB (default: this GPU's)"),
                 as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON line")):
    """Parameters and memory per GPU (weights, gradients, optimizer, activations) and whether it fits,
    before any weight is loaded."""
    from rich.console import Console
    from rich.table import Table

    from ftkit.plan import parse_size, plan
    from ftkit.recipe import load_recipe

    from ftkit.ui import quiet_libraries

    quiet_libraries()
    r = load_recipe(recipe, set_)
    limit = parse_size(gpu_memory) if gpu_memory else _visible_gpu_memory()
    p = plan(r, gpus=gpus, gpu_memory=limit)
    if as_json:
        print(json.dumps(p.as_dict()))
        return
    t = Table()
    t.add_column("per GPU")
    t.add_column("memory", justify="right")
    for name in ("weights", "gradients", "optimizer", "activations", "overhead"):
        t.add_row(name, _gib(getattr(p, name)))
    t.add_row("[bold]total", f"[bold]{_gib(p.total)}")
    console = Console()
    console.print(f"{p.model} · {p.method} · {p.strategy} × {p.world_size} · {p.dtype} · batch {p.batch_size} × "
                  f"{p.seq_len} tokens per GPU" + (" · activation checkpointing" if p.activation_checkpointing else ""))
    console.print(f"parameters: {p.total_params:,} · trainable: {p.trainable_params:,} "
                  f"({100 * p.trainable_params / max(1, p.total_params):.2f}%)")
    console.print(t)
    if p.fits is not None:
        verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
        console.print(f"{verdict} in {_gib(p.gpu_memory)} per GPU (estimate; see docs/scale.md for its error)")


def _visible_gpu_memory() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
