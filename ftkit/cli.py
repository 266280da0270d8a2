"""The ftkit command line. Thin: parse, load the recipe, call one function, map errors to exit codes.

Heavy imports (torch, transformers, trl) live inside the commands that need them, so
`ftkit --help` and `ftkit validate` stay instant.
"""

from __future__ import annotations

import json
import sys
import time
from typing import List, Optional

import typer
from rich.console import Console

from ftkit import __version__
from ftkit.choices import as_enum
from ftkit.commands import bench, deploy, evaluate, plan, rlhf, train
from ftkit.commands.common import Dtype, OverwriteOpt, SetOpt, bare_resume_as_latest, err, handle_errors, load
from ftkit.commands.data import app as data_app
from ftkit.errors import UserError
from ftkit.starter import starter_stages


def _bare_flags() -> None:
    """Typer 0.29 prints `--overwrite <bool>`, which reads as if the flag took a value: show flags bare."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_bare_flags()

app = typer.Typer(
    name="ftkit",
    help="Fine-tune Hugging Face causal LMs (LoRA and friends) from one YAML recipe.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

def _version(value: bool):
    if value:
        print(f"ftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit")):
    pass


train.register(app)  # sft, pt, rm, dpo, kto, orpo, rl: one command per registered stage
app.command("eval")(handle_errors(evaluate.eval_command))
app.command("report")(handle_errors(evaluate.report_command))


def _is_pipeline_file(path: str) -> bool:
    from ftkit import safe_yaml

    try:
        data = safe_yaml.load(safe_yaml.read_text(path), path)
    except UserError:
        return False  # the recipe loader reports these with file:line
    return isinstance(data, dict) and "stages" in data and "stage" not in data


@app.command()
@handle_errors
def validate(recipe: str = typer.Argument(..., help="Recipe YAML"), set_: Optional[List[str]] = SetOpt,
             print_: bool = typer.Option(False, "--print", help="Also print the resolved recipe (every field)")):
    """Check a recipe (schema, values, files, the first rows of its data) without loading any model."""
    t0 = time.perf_counter()
    if _is_pipeline_file(recipe):
        from ftkit.pipeline import run_pipeline

        if set_:
            raise UserError("--set applies to one recipe; a pipeline file sets overrides per stage (set:)")
        run_pipeline(recipe, dry_run=True)
        err.print(f"[green]ok[/] {recipe} ({(time.perf_counter() - t0) * 1000:.0f} ms)")
        return
    from ftkit.data.peek import check_data_heads

    r = load(recipe, set_)
    read = check_data_heads(r)
    if print_:
        print(r.to_yaml(), end="")
    data = f" · data: {', '.join(read)}" if read else ""
    err.print(f"[green]ok[/] {recipe} ({r.stage}, {r.method.type}){data} ({(time.perf_counter() - t0) * 1000:.0f} ms)")


@app.command("merge-lora")
@handle_errors
def merge_lora(adapter: str = typer.Argument(..., help="Run dir or adapter dir"),
               output: str = typer.Option(..., "--output", "-o", help="Where to write the merged model"),
               base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the one trained on)"),
               dtype: Dtype = typer.Option("auto", "--dtype", help="auto: the base model's own dtype"),
               overwrite: bool = OverwriteOpt):
    """Fold a LoRA adapter into its base (W0 + BA) and verify the result."""
    from pathlib import Path

    from ftkit.runmeta import is_reward_adapter
    from ftkit.ui import log

    if is_reward_adapter(Path(adapter).expanduser()):  # a classifier: merged and verified on its scores
        from ftkit.reward_model import merge_reward_model

        merge_reward_model(Path(adapter).expanduser(), output, base=base, dtype=dtype.value, overwrite=overwrite,
                           log=log)
        return
    from ftkit.merge import merge_lora as run_merge

    run_merge(adapter, output, base=base, dtype=dtype.value, overwrite=overwrite, log=log)


@app.command()
@handle_errors
def generate(model: str = typer.Argument(..., help="Run dir, merged dir, model alias or hub id"),
             prompt: List[str] = typer.Option(..., "--prompt", "-p", help="User message (repeatable)"),
             max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
             temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)"),
             system: Optional[str] = typer.Option(None, "--system", help="System message"),
             base: Optional[str] = typer.Option(None, "--base", help="Base model for an adapter dir"),
             dtype: Dtype = typer.Option("auto", "--dtype", help="auto: picked from the hardware"),
             tools: Optional[str] = typer.Option(None, "--tools", help="JSON file of tool schemas; each reply "
                                                 "prints as an OpenAI-shape message JSON (content, tool_calls)"),
             tool_choice: Optional[str] = typer.Option(None, "--tool-choice", help="with --tools: auto | none | "
                                                       "required | a function name (the reply must call it)")):
    """Generate a reply with the model's chat template (greedy by default)."""
    from ftkit.hardware import detect
    from ftkit.inference import generate as gen
    from ftkit.inference import load_for_inference
    from ftkit.toolcalls import cli_choice, load_tools, prefill, reply_json

    schemas = load_tools(tools) if tools else None  # bad file: exit 2 before the model loads
    offered, must_call = cli_choice(schemas, tool_choice)
    if temperature == 0:
        import torch

        torch.manual_seed(0)
    hw = detect(dtype.value)
    m, tok = load_for_inference(model, dtype=hw.dtype, base=base, log=lambda s: err.print(s))
    convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompt]
    start = prefill(tok.chat_template, must_call) if offered else ""
    for reply in gen(m, tok, convs, max_new_tokens=max_new_tokens, temperature=temperature, tools=offered or None,
                     prefill=start):
        print(reply_json(reply, start, tok.chat_template, bool(offered)) if schemas else reply)


@app.command()
@handle_errors
def models():
    """Built-in model aliases and whether each is cached locally."""
    from rich.table import Table

    from ftkit.models import ALIASES, ftkit_home, is_cached

    table = Table(title=f"model aliases (FTKIT_HOME={ftkit_home()})")
    for col in ("alias", "params", "license", "source", "cached"):
        table.add_column(col)
    for a in ALIASES.values():
        where = is_cached(a.name)
        table.add_row(a.name, a.params, a.license, f"{a.hub_id} (or PyPI {a.pypi})", where or "no (fetched on first use)")
    Console().print(table)


@app.command()
@handle_errors
def env():
    """Versions, device and the precision ftkit would pick (paste this into bug reports)."""
    import platform

    from ftkit.hardware import detect
    from ftkit.stages.common import env_versions

    hw = detect()
    print(f"python: {platform.python_version()} ({sys.platform})")
    for k, v in env_versions().items():
        print(f"{k}: {v or 'not installed'}")
    print(f"device: {hw.device} ({hw.device_name}), gpus: {hw.num_gpus}, threads: {hw.threads}")
    print(f"precision: {hw.dtype} ({hw.dtype_reason})")


@app.command()
@handle_errors
def init(path: str = typer.Argument("recipe.yaml", help="Where to write the recipe"),
         stage: as_enum("Stage", starter_stages()) = typer.Option("sft", "--stage",
                                                                  help="Training stage the recipe is for"),
         train: Optional[str] = typer.Option(None, "--train", help="Your training data file (default: write "
                                             "a few sample rows beside the recipe, to replace)"),
         force: bool = typer.Option(False, "--force", help="Overwrite existing files")):
    """Write a minimal, commented starter recipe for one stage; it validates as written."""
    from ftkit.starter import write_starter

    stage = stage.value
    written = write_starter(path, stage, train, force)
    load(path, None)  # a starter that does not validate is a bug: fail here, not at the user's next command
    for p in written:
        err.print(f"[green]wrote[/] {p}")
    err.print(f"next: ftkit validate {path} · ftkit {stage} {path}")


@app.command()
@handle_errors
def schema():
    """Print the recipe's JSON schema (for editors and CI linting)."""
    import json

    from ftkit.recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))


@app.command()
@handle_errors
def quickstart(output: str = typer.Option("runs/quickstart", "--output", "-o"),
               recipe: Optional[str] = typer.Option(None, "--recipe", help="Default: recipes/quickstart.yaml"),
               set_: Optional[List[str]] = SetOpt):
    """Fine-tune the embedded model on the bundled task and show base vs tuned answers."""
    from ftkit import quickstart as qs

    qs.run(recipe, output=output, overrides=set_)


app.add_typer(data_app, name="data")  # a typer sub-app; imports no torch
app.command("bench")(handle_errors(bench.bench_command))
app.command("plan")(handle_errors(plan.plan_command))
deploy.register(app, handle_errors)
rlhf.register(app)


def main():
    from ftkit.noise import silence_third_party_noise

    # Before any command imports bitsandbytes (some do before ftkit.models, which installs it too).
    silence_third_party_noise()
    sys.argv[1:] = bare_resume_as_latest(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
