"""The data layer: files -> canonical rows -> tokens + labels, with stats and clear errors."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ftkit.data.formats import to_canonical
from ftkit.data.sources import Row, read_rows
from ftkit.data.templates import resolve_template
from ftkit.data.tokenize import TokenStats, encode_rows
from ftkit.errors import UserError
from ftkit.recipe import Recipe, as_list, resolve_path


@dataclass
class Prepared:
    train: list[dict]  # {"input_ids", "labels"}
    eval: list[dict]
    format: str
    template: str | None
    train_stats: TokenStats
    eval_stats: TokenStats

    def to_datasets(self):
        from datasets import Dataset

        train = Dataset.from_list(self.train)
        evald = Dataset.from_list(self.eval) if self.eval else None
        return train, evald


def read_canonical(recipe: Recipe, field: str) -> tuple[str, list[dict]]:
    rows: list[Row] = []
    for item in as_list(getattr(recipe.data, field)):
        path = resolve_path(item, recipe._source)
        if not path.exists():
            raise UserError(f"{recipe.where('data', field)}: data.{field}: file not found: {item}")
        rows += read_rows(path)
    return to_canonical(rows, recipe.data.format, recipe.data.columns, recipe.data.system,
                        recipe_where=recipe.where("data", "columns"))


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    if n_eval >= len(rows):
        raise UserError(f"data.eval_split: {fraction} of {len(rows)} rows leaves nothing to train on")
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [rows[i] for i in sorted(eval_idx)]


def prepare(recipe: Recipe, tokenizer, log=print) -> Prepared:
    fmt, train_rows = read_canonical(recipe, "train")
    if recipe.data.eval:
        _, eval_rows = read_canonical(recipe, "eval")
    else:
        train_rows, eval_rows = split_eval(train_rows, recipe.data.eval_split, recipe.train.seed)
    template = resolve_template(tokenizer, recipe.data.template, recipe.where("data", "template"))
    train_on = recipe.data.train_on
    ts, es = TokenStats(), TokenStats()
    train = encode_rows(train_rows, tokenizer, template, train_on, recipe.data.max_length, ts)
    evals = encode_rows(eval_rows, tokenizer, template, train_on, recipe.data.max_length, es)
    for name, st in (("train", ts), ("eval", es)):
        if st.dropped_no_labels:
            log(
                f"[yellow]warning:[/] {st.dropped_no_labels} of {st.rows} {name} rows dropped: truncation to "
                f"data.max_length={recipe.data.max_length} left them no response tokens to learn from "
                f"(e.g. {', '.join(st.dropped_examples[:3])}). Raise data.max_length to keep them."
            )
        elif st.truncated:
            log(f"[yellow]note:[/] {st.truncated} of {st.rows} {name} rows truncated to {recipe.data.max_length} tokens")
    if not train:
        raise UserError(
            f"{recipe.where('data', 'max_length')}: no training rows left: every row lost all its response tokens "
            f"to truncation at data.max_length={recipe.data.max_length}"
        )
    return Prepared(train, evals, fmt, template, ts, es)
