"""`ftkit pipeline FILE`: named stages run in order, each one an ordinary recipe.

    output: runs/pipeline-rlhf        # stage run dirs go under here as <stage name>/
    stages:
      sft:
        recipe: sft.yaml              # a recipe file (beside this file), or the recipe inline
        set: {train.max_steps: 30}    # optional overrides, dotted keys
      rl:
        recipe:
          stage: rl
          model: {name: "${sft.output}"}   # an earlier stage's run dir

Every stage's recipe is validated (schema, files, stage checks) before the first runs. A
stage whose run dir holds a finished run of the identical recipe is skipped, so a re-run
after a failure continues where it stopped; once a stage runs, every later stage runs too
(its inputs may have changed). The first failing stage stops the pipeline with its exit code.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError, UserError, exit_code_of
from ftkit.recipe import (STAGES, Recipe, _Located, apply_sets, check_files, load_recipe, parse_set, read_yaml,
                          resolve_path)
from ftkit.stages.registry import get
from ftkit.ui import console, err, log

REF = re.compile(r"\$\{([^}]*)\}")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class _SubLocated:
    """Line lookup for a recipe written inline inside the pipeline file."""

    def __init__(self, parent: _Located, prefix: tuple):
        self.parent, self.prefix = parent, prefix
        n = len(prefix)
        self.lines = {k[n:]: v for k, v in parent.lines.items() if k[:n] == prefix}

    def line_of(self, path: tuple) -> int | None:
        return self.parent.line_of(self.prefix + tuple(path))


@dataclass
class Stage:
    name: str
    recipe: Recipe
    output: str
    where: str  # pipeline file:line of the stage


def _substitute(value: Any, outputs: dict[str, str], later: set[str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, later, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, later, where) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        ref = m.group(1).strip()
        name, _, attr = ref.partition(".")
        if attr != "output":
            raise UserError(f"{where}: ${{{ref}}}: only ${{STAGE.output}} references are supported")
        if name in later:
            raise UserError(f"{where}: ${{{ref}}}: stage {name!r} runs later; a stage can only use earlier outputs")
        if name not in outputs:
            known = ", ".join(outputs) or "none"
            raise UserError(f"{where}: ${{{ref}}}: no earlier stage named {name!r} (earlier stages: {known})")
        return outputs[name]

    return REF.sub(one, value)


def _set_items(spec: dict, at: tuple, located: _Located, src: str) -> list[tuple[list[str], Any, str]]:
    """A stage's `set:` (a mapping of key.path: value, or a list of key.path=value as on the command line)."""
    items = spec.get("set") or {}
    if isinstance(items, list):
        return [(*parse_set(item, f"{src}:{located.line_of(at + ('set', i))}: set:"), 
                 f"{src}:{located.line_of(at + ('set', i))}") for i, item in enumerate(items)]
    if not isinstance(items, dict):
        raise UserError(f"{src}:{located.line_of(at + ('set',))}: set: a mapping of key.path: value "
                        "(or a list of key.path=value)")
    return [(str(k).split("."), v, f"{src}:{located.line_of(at + ('set', k))}") for k, v in items.items()]


def load_pipeline(file: str) -> tuple[list[Stage], Path]:
    """Parse, resolve references and validate every stage; loads no model."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"pipeline file not found: {file}")
    src = str(path)
    doc, located = read_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict) or not doc["stages"]:
        raise UserError(f"{src}:1: a pipeline has `stages:`, a mapping of stage name -> {{recipe, set}}")
    unknown = set(doc) - {"stages", "output"}
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"{src}:{located.line_of((key,))}: unknown key {key!r}; a pipeline has stages and output")
    output = doc.get("output")
    if output is not None and not isinstance(output, str):
        raise UserError(f"{src}:{located.line_of(('output',))}: output: a directory for the stages' run dirs "
                        f"(e.g. output: runs/my-pipeline), not a {type(output).__name__}")
    root = Path(output or Path("runs") / path.stem)
    names = list(doc["stages"])
    outputs: dict[str, str] = {}
    stages: list[Stage] = []
    for i, name in enumerate(names):
        at = ("stages", name)
        where = f"{src}:{located.line_of(at)}"
        spec = doc["stages"][name]
        if not NAME.match(str(name)):
            raise UserError(f"{where}: stage name {name!r}: use letters, digits, _ and - (it is used in ${{...}})")
        if not isinstance(spec, dict) or "recipe" not in spec:
            raise UserError(f"{where}: stage {name}: needs `recipe:` (a recipe file or the recipe inline)")
        extra = set(spec) - {"recipe", "set"}
        if extra:
            k = sorted(extra)[0]
            raise UserError(f"{src}:{located.line_of(at + (k,))}: stage {name}: unknown key {k!r} "
                            "(a stage has recipe and set)")
        later = set(names[i + 1:])
        raw = spec["recipe"]
        if isinstance(raw, str):
            rpath = resolve_path(_substitute(raw, outputs, later, where), src)
            if not rpath.is_file():
                raise UserError(f"{src}:{located.line_of(at + ('recipe',))}: stage {name}: recipe not found: {raw}")
            data, rlocated = read_yaml(rpath)
            rsrc = str(rpath)
        elif isinstance(raw, dict):
            data, rlocated, rsrc = raw, _SubLocated(located, at + ("recipe",)), src
        else:
            raise UserError(f"{src}:{located.line_of(at + ('recipe',))}: stage {name}: recipe must be a file path "
                            "or a mapping")
        data = _substitute(data or {}, outputs, later, f"{rsrc}" if isinstance(raw, str) else where)
        if not isinstance(data, dict):
            raise UserError(f"{rsrc}:1: a recipe is a mapping of sections")
        origin = apply_sets(data, [(keys, _substitute(value, outputs, later, place), place)
                                   for keys, value, place in _set_items(spec, at, located, src)])
        if "stage" not in data:
            if name not in STAGES:
                raise UserError(f"{where}: stage {name}: its recipe has no `stage:` and {name!r} is not a stage "
                                f"({', '.join(STAGES)})")
            data["stage"] = name
        section = data.get("output")
        if section is not None and not isinstance(section, dict):
            raise UserError(f"{where}: stage {name}: output: a mapping (output: {{dir: ...}}), "
                            f"not a {type(section).__name__}")
        out = (section or {}).get("dir") or str(root / name)
        if not isinstance(out, str):
            raise UserError(f"{where}: stage {name}: output.dir: a directory path, not {out!r}")
        data["output"] = {**(section or {}), "dir": out}
        recipe = load_recipe(rsrc, data=data, located=rlocated, origin=origin)
        if out in outputs.values():
            other = next(k for k, v in outputs.items() if v == out)
            raise UserError(f"{where}: stage {name}: writes to {out}, as stage {other} does")
        outputs[name] = out
        stages.append(Stage(name, recipe, out, where))
    produced = set(outputs.values())
    for st in stages:
        try:
            _check(st.recipe, produced)
        except UserError as exc:
            raise UserError(f"stage {st.name} ({st.where}): {exc}") from None
    return stages, root


def _check(recipe: Recipe, produced: set[str]) -> None:
    from ftkit.stages.lifecycle import check

    name = recipe.model.name
    if name in produced:
        # An earlier stage's run dir does not exist yet; check everything else.
        recipe.model.name = "smollm2-135m-instruct"
        try:
            check_files(recipe)
        finally:
            recipe.model.name = name
    else:
        check_files(recipe)
    if get(recipe.stage).preference:
        check(recipe, frozenset(produced))


def finished(stage: Stage) -> bool:
    d = Path(stage.output)
    recipe_file = d / "recipe.yaml"
    return (d / "metrics.json").is_file() and recipe_file.is_file() and \
        recipe_file.read_text(encoding="utf-8") == stage.recipe.to_yaml()


def _headline(stage: Stage) -> str:
    f = Path(stage.output) / "metrics.json"
    if not f.is_file():
        return ""
    m = json.loads(f.read_text(encoding="utf-8"))
    parts = [f"{label} {m[k]:.4g}" for k, label in get(stage.recipe.stage).headline if isinstance(m.get(k), float)]
    return " · ".join(parts)


def run_pipeline(file: str, force: bool = False, dry_run: bool = False) -> int:
    """Run the stages; returns the exit code (0, or the first failing stage's)."""
    stages, root = load_pipeline(file)
    log(f"pipeline {file}: {len(stages)} stages validated: "
        + " → ".join(f"{s.name} ({s.recipe.stage})" for s in stages))
    if dry_run:
        for s in stages:
            state = "finished, would skip" if finished(s) and not force else "would run"
            log(f"  {s.name}: {s.recipe.stage} → {s.output} ({state})")
        return 0
    ran_one = force
    summary = []
    for i, st in enumerate(stages, 1):
        console.rule(f"[bold]{i}/{len(stages)} {st.name} ({st.recipe.stage})")
        skip = not ran_one and finished(st)
        if skip:
            log(f"skipped: {st.output} already holds a finished run of this recipe")
        elif Path(st.output).exists():
            log(f"re-running: {st.output} is unfinished, from a different recipe, or an earlier stage re-ran")
        ran_one = ran_one or not skip
        code = _run_stage(st, run=not skip)  # a skipped stage's gates are checked again: it may have failed them
        if code:
            summary.append({"stage": st.name, "status": f"failed (exit {code})", "output": st.output})
            _write_summary(root, summary)
            log(f"[bold red]pipeline stopped:[/] stage {st.name} failed with exit code {code}; fix it and run "
                f"`ftkit pipeline {file}` again to continue from this stage")
            return code
        summary.append({"stage": st.name, "status": "skipped" if skip else "ran", "output": st.output})
    _write_summary(root, summary)
    console.rule("[bold]pipeline done")
    for st, row in zip(stages, summary):
        log(f"{st.name:>8} {row['status']:>8} · {st.output} · {_headline(st)}")
    return 0


def _run_stage(st: Stage, run: bool) -> int:
    """Run one stage (or not, when it finished before), then its gates; returns its exit code."""
    from ftkit.gates import check
    from ftkit.stages.lifecycle import run as run_stage

    try:
        if run:
            run_stage(st.recipe, output=st.output, overwrite=True)
        gates = [g.fail_if for g in st.recipe.gates]
        if gates:
            metrics = json.loads((Path(st.output) / "metrics.json").read_text(encoding="utf-8"))
            for r in check(metrics, gates):
                log(f"[green]gate passed:[/] stage {st.name}: {r['metric']} = {r['value']:.6g} (fails if {r['gate']})")
        return 0
    except FtkitError as exc:
        err.print(f"[bold red]{exc.label}:[/] stage {st.name}: {exc}")
        return exit_code_of(exc)
    except KeyboardInterrupt:
        raise
    except Exception:  # a crash inside a stage: show it, stop the pipeline with exit 1
        err.print(f"[bold red]stage {st.name} crashed:[/]\n{traceback.format_exc()}")
        return 1


def _write_summary(root: Path, summary: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
