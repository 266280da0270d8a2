"""The ftkit command line. Thin: parse, load the recipe, call one function, map errors to exit codes.

Heavy imports (torch, transformers, trl) live inside the commands that need them, so
`ftkit --help` and `ftkit validate` stay instant.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import List, Optional

import enum

import typer
from rich.console import Console

from ftkit import __version__
from ftkit.commands import ci
from ftkit.errors import GateFailed, UserError, VerificationFailed
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
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe field: key.path=value (repeatable)")
OutputOpt = typer.Option(None, "--output", "-o", help="Run dir (default: output.dir, else runs/<recipe name>)")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing non-empty run dir")
NoCacheOpt = typer.Option(False, "--no-cache", help="Re-tokenize the data even if a cached copy exists")


def handle_errors(fn):
    """Known errors become one clear message and an exit code; no traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except GateFailed as exc:
            err.print(f"[bold red]gate failed:[/] {exc}")
            raise typer.Exit(3) from None
        except VerificationFailed as exc:
            err.print(f"[bold red]verification failed:[/] {exc}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _choices(name: str, values) -> type[enum.Enum]:
    """A typer choice list from the schema's own values (typer shows and checks Enum members)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def _version(value: bool):
    if value:
        print(f"ftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit")):
    pass


def _load(recipe: str, overrides: Optional[List[str]], stage: str | None = None):
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


def _train(stage: str, recipe: str, overrides, output, overwrite, **ci_opts):
    r = _load(recipe, overrides, stage)
    ci.train(stage, r, output=output, overwrite=overwrite, **ci_opts)


def _train_command(stage: str, doc: str):
    """sft and pt: the same options, each with its own name and help text."""

    def command(recipe: str = typer.Argument(..., help="Recipe YAML"), set_: Optional[List[str]] = SetOpt,
                output: Optional[str] = OutputOpt, overwrite: bool = OverwriteOpt,
                resume: Optional[str] = ci.ResumeOpt, num_processes: int = ci.NumProcessesOpt,
                as_json: bool = ci.JsonOpt, fail_if: Optional[List[str]] = ci.FailIfOpt,
                no_cache: bool = NoCacheOpt):
        _train(stage, recipe, set_, output, overwrite, resume=resume, num_processes=num_processes,
               as_json=as_json, fail_if=fail_if, no_cache=no_cache)

    command.__name__, command.__qualname__, command.__doc__ = stage, stage, doc
    app.command(stage)(handle_errors(command))


_train_command("sft", "Supervised fine-tuning (chat, instruction or completion data).")
_train_command("pt", "Continued pretraining on raw text (loss on every token).")


app.command("eval")(handle_errors(ci.eval_command))
app.command("report")(handle_errors(ci.report_command))


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

    r = _load(recipe, set_)
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
               dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
               overwrite: bool = OverwriteOpt):
    """Fold a LoRA adapter into its base (W0 + BA) and verify the result."""
    from ftkit.merge import merge_lora as run_merge
    from ftkit.ui import log

    run_merge(adapter, output, base=base, dtype=dtype, overwrite=overwrite, log=log)


@app.command()
@handle_errors
def generate(model: str = typer.Argument(..., help="Run dir, merged dir, model alias or hub id"),
             prompt: List[str] = typer.Option(..., "--prompt", "-p", help="User message (repeatable)"),
             max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
             temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)"),
             system: Optional[str] = typer.Option(None, "--system", help="System message"),
             base: Optional[str] = typer.Option(None, "--base", help="Base model for an adapter dir"),
             dtype: str = typer.Option("auto", "--dtype", help="auto (picked from the hardware) | float32 | "
                                       "bfloat16 | float16"),
             tools: Optional[str] = typer.Option(None, "--tools", help="JSON file of tool schemas; each reply "
                                                 "prints as an OpenAI-shape message JSON (content, tool_calls)")):
    """Generate a reply with the model's chat template (greedy by default)."""
    from ftkit.hardware import detect, dtype_option
    from ftkit.inference import generate as gen
    from ftkit.inference import load_for_inference
    from ftkit.toolcalls import load_tools, message

    schemas = load_tools(tools) if tools else None  # bad file: exit 2 before the model loads
    if temperature == 0:
        import torch

        torch.manual_seed(0)
    hw = detect(dtype_option(dtype))
    m, tok = load_for_inference(model, dtype=hw.dtype, base=base, log=lambda s: err.print(s))
    convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompt]
    for reply in gen(m, tok, convs, max_new_tokens=max_new_tokens, temperature=temperature, tools=schemas):
        print(json.dumps(message(reply, tok.chat_template)[0], ensure_ascii=False) if schemas else reply)


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
         stage: _choices("Stage", starter_stages()) = typer.Option("sft", "--stage",
                                                                  help="Training stage the recipe is for"),
         train: Optional[str] = typer.Option(None, "--train", help="Your training data file (default: write "
                                             "a few sample rows beside the recipe, to replace)"),
         force: bool = typer.Option(False, "--force", help="Overwrite existing files")):
    """Write a minimal, commented starter recipe for one stage; it validates as written."""
    from ftkit.starter import write_starter

    stage = stage.value
    written = write_starter(path, stage, train, force)
    _load(path, None)  # a starter that does not validate is a bug: fail here, not at the user's next command
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


from ftkit.commands import deploy as _deploy  # noqa: E402
from ftkit.commands import rlhf as _rlhf  # noqa: E402  (rm, dpo, kto, orpo, rl, score, pipeline)
from ftkit.commands.bench import bench_command  # noqa: E402
from ftkit.commands.data import app as data_app  # noqa: E402  (typer sub-app; imports no torch)

app.add_typer(data_app, name="data")
app.command("bench")(handle_errors(bench_command))
_deploy.register(app, handle_errors)
_rlhf.register(app)


def main():
    sys.argv[1:] = ci.bare_resume_as_latest(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
