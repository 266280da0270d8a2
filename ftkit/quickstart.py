"""The quickstart: measure the embedded model on held-out prompts, fine-tune it, measure again."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ftkit.errors import UserError
from ftkit.evaluate import generate_and_score, prompts_and_references
from ftkit.recipe import check_files, load_recipe
from ftkit.ui import console, log

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "quickstart.yaml"


def _score(target: str, prompts, refs, dtype: str, base: str | None = None) -> tuple[float, list[str]]:
    from ftkit.inference import load_for_inference

    model, tok = load_for_inference(target, dtype=dtype, base=base, log=log)
    scores, preds = generate_and_score(model, tok, prompts, refs, ["exact_match"], max_new_tokens=24)
    return scores["exact_match"], preds


def run(recipe_path: str | None = None, output: str = "runs/quickstart", overrides: list[str] | None = None,
        examples: int = 4) -> dict:
    from ftkit.data import read_canonical
    from ftkit.hardware import detect
    from ftkit.stages import sft

    path = Path(recipe_path) if recipe_path else RECIPE
    if not path.is_file():
        raise UserError(f"quickstart recipe not found: {path} (run from an ftkit checkout, or pass --recipe)")
    recipe = load_recipe(path, overrides)
    check_files(recipe)
    if not recipe.data.eval:
        raise UserError(f"{recipe.where('data')}: the quickstart needs data.eval (held-out prompts with answers)")
    _, eval_rows = read_canonical(recipe, "eval")
    prompts, refs = prompts_and_references(eval_rows)
    dtype = detect(recipe.model.dtype).dtype

    console.rule("[bold]1/3 the base model on held-out prompts")
    before, base_preds = _score(recipe.model.name, prompts, refs, dtype)
    log(f"exact match before fine-tuning: [bold]{before:.0%}[/] ({len(refs)} prompts)")

    console.rule("[bold]2/3 fine-tuning")
    run_dir = sft.run(recipe, output=output, overwrite=True)

    console.rule("[bold]3/3 the tuned model on the same prompts")
    after, tuned_preds = _score(str(run_dir), prompts, refs, dtype)

    table = Table(title="held-out prompts: base vs tuned", show_lines=True)
    table.add_column("prompt", max_width=40)
    table.add_column("expected")
    table.add_column("base model", max_width=40)
    table.add_column("tuned model")
    for p, r, b, t in list(zip(prompts, refs, base_preds, tuned_preds))[:examples]:
        table.add_row(p[-1]["content"], r, b, t)
    console.print(table)
    result = {"exact_match_before": before, "exact_match_after": after, "eval_prompts": len(refs),
              "run_dir": str(run_dir)}
    (run_dir / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"[bold]exact match: {before:.0%} before → {after:.0%} after[/] · run dir: {run_dir}")
    log(f"next: ftkit generate {run_dir} --prompt \"Review: ...\"  ·  ftkit merge-lora {run_dir} --output "
        f"{run_dir}-merged")
    return result
