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

from pydantic import ValidationError

from ftkit import safe_yaml
from ftkit.errors import GateFailed, UserError, VerificationFailed
from ftkit.recipe import STAGES, Recipe, _format_errors, _Located, check_files, resolve_path
from ftkit.ui import console, log

REF = re.compile(r"\$\{([^}]*)\}")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _run_sft(recipe, output=None, overwrite=False):
    from ftkit.stages import sft

    return sft.run(recipe, output=output, overwrite=overwrite)


def _run_rm(recipe, output=None, overwrite=False):
    from ftkit.stages import rm

    return rm.run(recipe, output=output, overwrite=overwrite)


def _run_offline(recipe, output=None, overwrite=False):
    from ftkit.stages import preference

    return preference.run(recipe, output=output, overwrite=overwrite)


def _run_rl(recipe, output=None, overwrite=False):
    from ftkit.stages import rl

    return rl.run(recipe, output=output, overwrite=overwrite)


STAGE_RUNNERS = {"sft": _run_sft, "pt": _run_sft, "rm": _run_rm, "dpo": _run_offline, "kto": _run_offline,
                 "orpo": _run_offline, "rl": _run_rl}


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


def _load_yaml(path: Path) -> tuple[Any, _Located]:
    text = safe_yaml.read_text(path)
    return safe_yaml.load(text, str(path)), _Located(text)  # bounded first: _Located walks the same tree


def _set_items(spec: dict, at: tuple, located: _Located, src: str) -> list[tuple[list[str], Any, str]]:
    items = spec.get("set") or {}
    place = f"{src}:{located.line_of(at + ('set',))}"
    if isinstance(items, list):  # ["key.path=value", ...] as on the command line
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str) or "=" not in item:
                raise UserError(f"{src}:{located.line_of(at + ('set', i))}: set: expected key.path=value, got {item!r}")
            key, raw = item.split("=", 1)
            out.append((key.strip().split("."), safe_yaml.load_value(raw, f"{src}: set {item!r}"),
                        f"{src}:{located.line_of(at + ('set', i))}"))
        return out
    if not isinstance(items, dict):
        raise UserError(f"{place}: set: a mapping of key.path: value (or a list of key.path=value)")
    return [(str(k).split("."), v, f"{src}:{located.line_of(at + ('set', k))}") for k, v in items.items()]


def _apply(data: dict, keys: list[str], value: Any, place: str) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"{place}: set: {'.'.join(keys)}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def _build_recipe(data: dict, located, source: str, origin: dict) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_errors(err, source, located, origin)) from None
    recipe._source = source
    recipe._located = located
    recipe._origin = origin
    return recipe


def load_pipeline(file: str) -> tuple[list[Stage], Path]:
    """Parse, resolve references and validate every stage; loads no model."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"pipeline file not found: {file}")
    src = str(path)
    doc, located = _load_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict) or not doc["stages"]:
        raise UserError(f"{src}:1: a pipeline has `stages:`, a mapping of stage name -> {{recipe, set}}")
    unknown = set(doc) - {"stages", "output"}
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"{src}:{located.line_of((key,))}: unknown key {key!r}; a pipeline has stages and output")
    root = Path(doc.get("output") or Path("runs") / path.stem)
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
            data, rlocated = _load_yaml(rpath)
            rsrc = str(rpath)
        elif isinstance(raw, dict):
            data, rlocated, rsrc = raw, _SubLocated(located, at + ("recipe",)), src
        else:
            raise UserError(f"{src}:{located.line_of(at + ('recipe',))}: stage {name}: recipe must be a file path "
                            "or a mapping")
        data = _substitute(data or {}, outputs, later, f"{rsrc}" if isinstance(raw, str) else where)
        if not isinstance(data, dict):
            raise UserError(f"{rsrc}:1: a recipe is a mapping of sections")
        origin: dict = {}
        for keys, value, place in _set_items(spec, at, located, src):
            value = _substitute(value, outputs, later, place)
            _apply(data, keys, value, place)
            origin[tuple(keys)] = place
        if "stage" not in data:
            if name not in STAGES:
                raise UserError(f"{where}: stage {name}: its recipe has no `stage:` and {name!r} is not a stage "
                                f"({', '.join(STAGES)})")
            data["stage"] = name
        out = (data.get("output") or {}).get("dir") or str(root / name)
        data.setdefault("output", {})["dir"] = out
        recipe = _build_recipe(data, rlocated, rsrc, origin)
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
    from ftkit.stages.preference import PREFERENCE_STAGES, check_stage

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
    if recipe.stage in PREFERENCE_STAGES:
        check_stage(recipe, produced)


def finished(stage: Stage) -> bool:
    d = Path(stage.output)
    recipe_file = d / "recipe.yaml"
    return (d / "metrics.json").is_file() and recipe_file.is_file() and \
        recipe_file.read_text(encoding="utf-8") == stage.recipe.to_yaml()


HEADLINE = {
    "sft": [("last_loss", "loss")], "pt": [("last_loss", "loss")],
    "rm": [("pairwise_accuracy_before", "acc before"), ("pairwise_accuracy_after", "acc after"),
           ("mean_margin_after", "margin")],
    "dpo": [("train_reward_accuracy_last", "train acc")], "kto": [("train_reward_margin_last", "train margin")],
    "orpo": [("train_reward_accuracy_last", "train acc")],
    "rl": [("reward_mean_first_quarter", "reward first ¼"), ("reward_mean_last_quarter", "reward last ¼")],
}


def _headline(stage: Stage) -> str:
    f = Path(stage.output) / "metrics.json"
    if not f.is_file():
        return ""
    m = json.loads(f.read_text(encoding="utf-8"))
    parts = [f"{label} {m[k]:.4g}" for k, label in HEADLINE.get(stage.recipe.stage, []) if isinstance(m.get(k), float)]
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
        if not ran_one and finished(st):
            log(f"skipped: {st.output} already holds a finished run of this recipe")
            summary.append({"stage": st.name, "status": "skipped", "output": st.output})
            continue
        if Path(st.output).exists():
            log(f"re-running: {st.output} is unfinished, from a different recipe, or an earlier stage re-ran")
        ran_one = True
        code = _run_stage(st)
        if code:
            summary.append({"stage": st.name, "status": f"failed (exit {code})", "output": st.output})
            _write_summary(root, summary)
            log(f"[bold red]pipeline stopped:[/] stage {st.name} failed with exit code {code}; fix it and run "
                f"`ftkit pipeline {file}` again to continue from this stage")
            return code
        summary.append({"stage": st.name, "status": "ran", "output": st.output})
    _write_summary(root, summary)
    console.rule("[bold]pipeline done")
    for st, row in zip(stages, summary):
        log(f"{st.name:>8} {row['status']:>8} · {st.output} · {_headline(st)}")
    return 0


def _run_stage(st: Stage) -> int:
    from ftkit.cli import err

    try:
        STAGE_RUNNERS[st.recipe.stage](st.recipe, output=st.output, overwrite=True)
        return 0
    except UserError as exc:
        err.print(f"[bold red]error:[/] stage {st.name}: {exc}")
        return UserError.exit_code
    except GateFailed as exc:
        err.print(f"[bold red]gate failed:[/] stage {st.name}: {exc}")
        return GateFailed.exit_code
    except VerificationFailed as exc:
        err.print(f"[bold red]verification failed:[/] stage {st.name}: {exc}")
        return VerificationFailed.exit_code
    except KeyboardInterrupt:
        raise
    except Exception:  # a crash inside a stage: show it, stop the pipeline with exit 1
        err.print(f"[bold red]stage {st.name} crashed:[/]\n{traceback.format_exc()}")
        return 1


def _write_summary(root: Path, summary: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
