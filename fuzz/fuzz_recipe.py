"""Fuzz the recipe loader: YAML bytes -> load_recipe -> check_files -> the resolved recipe written back."""

from __future__ import annotations

from pathlib import Path

from _harness import REPO, SCRATCH, instrumented, main, seeds

with instrumented("ftkit", "yaml"):
    from ftkit.recipe import check_files, load_recipe

# Recipes name data as ../data_templates/...: give the scratch dir the same neighbours.
(SCRATCH / "recipes").mkdir(exist_ok=True)
if not (SCRATCH / "data_templates").exists():
    (SCRATCH / "data_templates").symlink_to(REPO / "data_templates")
PATH = SCRATCH / "recipes" / "r.yaml"


def one(data: bytes) -> None:
    PATH.write_bytes(data)
    recipe = load_recipe(PATH)
    check_files(recipe)
    load_recipe_text(recipe.to_yaml())


def load_recipe_text(text: str) -> None:
    """A recipe ftkit writes (the run dir's recipe.yaml) must load again."""
    out = SCRATCH / "recipes" / "resolved.yaml"
    out.write_text(text, encoding="utf-8")
    load_recipe(out)


def write_seeds(out: Path) -> int:
    files = seeds("recipes/*.yaml", "recipes/*/*.yaml", "data_templates/**/*.yaml")
    for p in files:
        (out / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    return len(files)


if __name__ == "__main__":
    main(one, write_seeds)
