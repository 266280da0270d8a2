"""What `ftkit validate` checks of the data without a tokenizer: the first rows of each local file.

Converting a few rows catches the mistakes that otherwise surface minutes later, after the
model has loaded: columns that match no format, a data.columns entry naming a column the file
does not have, rows in the wrong shape for the stage.
"""

from __future__ import annotations

from ftkit.data.formats import FORMAT_COLUMNS, Columns, to_canonical
from ftkit.data.sources import is_hub_id, read_rows
from ftkit.errors import UserError
from ftkit.recipe import Recipe, as_list, resolve_path

HEAD_ROWS = 50


def stage_data_format(recipe: Recipe) -> str:
    """The format the stage reads: data.format for sft/pt, the stage's own (registry) for the others."""
    from ftkit.stages.registry import get

    own = get(recipe.stage).data_format
    return own if recipe.data.format == "auto" and own else recipe.data.format


def check_data_heads(recipe: Recipe, n: int = HEAD_ROWS) -> list[str]:
    """Convert the first n rows of every local data file as training would; returns what was read.

    Raises the data layer's UserError (with file:line) on the first row that would not train."""
    d = recipe.data
    fmt = stage_data_format(recipe)
    read = []
    for field in ("train", "eval"):
        for item in as_list(getattr(d, field)):
            if is_hub_id(item):
                continue  # no network in validate; training reads it
            rows = read_rows(resolve_path(item, recipe._source))[:n]
            if not rows:
                continue
            _check_mapped_columns(recipe, item, rows)
            used, _ = to_canonical(rows, fmt, Columns(d.columns, d.roles), d.system,
                                   recipe_where=recipe.where("data", "columns"))
            read.append(f"{item} ({used})")
    return read


def _check_mapped_columns(recipe: Recipe, item: str, rows) -> None:
    """A data.columns entry that names a column the file lacks is a typo, not a format question."""
    top_level = {c for cols in FORMAT_COLUMNS.values() for c in cols}
    present = {k for row in rows if isinstance(row.data, dict) for k in row.data}
    for ours, theirs in recipe.data.columns.items():
        if ours in top_level and theirs not in present:
            raise UserError(f"{recipe.where('data', 'columns', ours)}: data.columns.{ours}: {theirs!r} is not a "
                            f"column of {item} (its columns: {', '.join(sorted(present))})")
