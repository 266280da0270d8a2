"""The data layer: sources -> canonical rows -> tokens + labels, with stats, a cache and clear errors."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftkit.data import preference as _preference  # noqa: F401  (registers preference, unpaired, prompt)
from ftkit.data.chat import check_tool_use, uses_tools
from ftkit.data.formats import Columns, to_canonical
from ftkit.data.quality import Screened, describe, screen
from ftkit.data.sources import read_source
from ftkit.data.templates import require_tool_template, resolve_template
from ftkit.data.tokenize import TokenStats, encode_rows
from ftkit.errors import UserError
from ftkit.recipe import Recipe, as_list, resolve_path


@dataclass
class Canonical:
    """Converted rows of a recipe, before tokenization."""

    train: list[dict]
    eval: list[dict]
    format: str  # the format, or "a+b" when mixed sources have different formats
    sources: list[dict] = field(default_factory=list)  # {"field", "source", "format", "rows"}
    screened: Screened = field(default_factory=Screened)  # empty replies and duplicates, train and eval


@dataclass
class Prepared:
    train: Any  # list of {"input_ids", "labels"} dicts, or a datasets.Dataset of them (from the cache)
    eval: Any
    format: str
    template: str | None
    train_stats: TokenStats
    eval_stats: TokenStats
    sources: list[dict] = field(default_factory=list)
    cache: str = "off"  # off | hit | miss
    cache_dir: str | None = None

    def to_datasets(self):
        from datasets import Dataset

        def as_ds(x):
            return x if isinstance(x, Dataset) else Dataset.from_list(list(x))

        train = as_ds(self.train)
        evald = as_ds(self.eval) if self.eval is not None and len(self.eval) else None
        return train, evald


def source_paths(recipe: Recipe, field_name: str) -> list[tuple[str, Path]]:
    return [(item, resolve_path(item, recipe._source)) for item in as_list(getattr(recipe.data, field_name))]


def _read_field(recipe: Recipe, field_name: str, fmt: str | None = None) -> tuple[list[str], list[dict], list[dict]]:
    """Every source of data.train or data.eval as canonical rows; fmt overrides data.format (a stage's own)."""
    d = recipe.data
    cols = Columns(d.columns, d.roles)
    formats, rows, sources = [], [], []
    for value, path in source_paths(recipe, field_name):
        fmt_used, items = to_canonical(read_source(value, path), fmt or d.format, cols, d.system,
                                       recipe_where=recipe.where("data", "columns"))
        check_tool_use(items)
        formats.append(fmt_used)
        rows += items
        sources.append({"field": field_name, "source": value, "format": fmt_used, "rows": len(items)})
    return formats, rows, sources


def read_canonical(recipe: Recipe, field_name: str, fmt: str | None = None) -> tuple[str, list[dict]]:
    formats, rows, _ = _read_field(recipe, field_name, fmt)
    return "+".join(dict.fromkeys(formats)), rows


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


def load_canonical(recipe: Recipe) -> Canonical:
    """Read and convert every source (no tokenizer, no model): bad data fails here, with file:line."""
    if not as_list(recipe.data.train):
        raise UserError(f"{recipe.where('data')}: data.train: required (a data file, or a list of files)")
    formats, train_rows, sources = _read_field(recipe, "train")
    train_rows, screened = screen(train_rows, recipe.data.keep_empty_replies)
    if not train_rows:
        raise UserError(f"{recipe.where('data', 'train')}: data.train: every row has an empty reply "
                        f"(e.g. {', '.join(screened.empty[:3])}); fill in the replies")
    if recipe.data.shuffle:
        # Mixed sources would otherwise train one after the other within each epoch's first batches.
        random.Random(recipe.train.seed).shuffle(train_rows)
    if recipe.data.eval:
        _, eval_rows, eval_sources = _read_field(recipe, "eval")
        eval_rows, eval_screened = screen(eval_rows, recipe.data.keep_empty_replies)
        screened = Screened(screened.empty + eval_screened.empty, screened.duplicates + eval_screened.duplicates,
                            screened.dropped + eval_screened.dropped)
        sources += eval_sources
    else:
        train_rows, eval_rows = split_eval(train_rows, recipe.data.eval_split, recipe.train.seed)
    return Canonical(train_rows, eval_rows, "+".join(dict.fromkeys(formats)), sources, screened)


def report_stats(recipe: Recipe, name: str, st: TokenStats, log=print) -> None:
    """Never a silent loss of data: dropped and truncated rows are always said, with counts."""
    ml = recipe.data.max_length
    if st.dropped_no_labels:
        truncated_away = st.dropped_no_labels - st.dropped_empty
        why = []
        if truncated_away:
            why.append(f"{truncated_away} lost all their response tokens to truncation at data.max_length={ml} "
                       f"(data.truncation={recipe.data.truncation}); raise data.max_length to keep them")
        if st.dropped_empty:
            why.append(f"{st.dropped_empty} had no tokens to train on at all")
        log(f"[yellow]warning:[/] {st.dropped_no_labels} of {st.rows} {name} rows dropped: {'; '.join(why)} "
            f"(e.g. {', '.join(st.dropped_examples[:3])})")
    kept_truncated = st.truncated - (st.dropped_no_labels - st.dropped_empty)
    if kept_truncated > 0:
        log(f"[yellow]note:[/] {kept_truncated} of {st.rows} {name} rows truncated to {ml} tokens "
            f"({recipe.data.truncation}); their cut-off tokens are not trained")


def prepare(recipe: Recipe, tokenizer, log=print, cache: bool = True, canonical: Canonical | None = None) -> Prepared:
    """Tokenized train/eval data for a recipe; reuses the FTKIT_HOME cache unless cache=False."""
    from ftkit.data import cache as dcache

    template = resolve_template(tokenizer, recipe.data.template, recipe.where("data", "template"))
    key = None
    if cache:
        key = dcache.cache_key(recipe, source_paths(recipe, "train") + source_paths(recipe, "eval"), tokenizer)
        hit = dcache.load(key)
        if hit is not None:
            train, evald, meta = hit
            out = Prepared(train, evald if evald is not None else [], meta["format"], template,
                           meta["train_stats"], meta["eval_stats"], meta.get("sources", []), "hit",
                           str(dcache.cache_root() / key))
            log(f"data: tokenized data from the cache ({out.cache_dir}); --no-cache to rebuild")
            for line in describe(Screened(**meta.get("screened", {}))):
                log(line)
            for name, st in (("train", out.train_stats), ("eval", out.eval_stats)):
                report_stats(recipe, name, st, log)
            return out

    canon = canonical or load_canonical(recipe)
    for line in describe(canon.screened):
        log(line)
    d = recipe.data
    if uses_tools(canon.train + canon.eval):
        require_tool_template(tokenizer, template, d.template, recipe.where("data", "template"))
    ts, es = TokenStats(), TokenStats()
    train = encode_rows(canon.train, tokenizer, template, d.train_on, d.max_length, ts, d.truncation,
                        d.train_on_reasoning)
    evals = encode_rows(canon.eval, tokenizer, template, d.train_on, d.max_length, es, d.truncation,
                        d.train_on_reasoning)
    for name, st in (("train", ts), ("eval", es)):
        report_stats(recipe, name, st, log)
    if not train:
        raise UserError(
            f"{recipe.where('data', 'max_length')}: no training rows left: every row lost all its response tokens "
            f"to truncation at data.max_length={d.max_length}"
        )
    out = Prepared(train, evals, canon.format, template, ts, es, canon.sources, "off")
    if key is not None:
        train_ds, eval_ds = out.to_datasets()
        out.train, out.eval = train_ds, eval_ds if eval_ds is not None else []
        meta = {"format": canon.format, "sources": canon.sources, "train_stats": ts, "eval_stats": es,
                "screened": asdict(canon.screened)}
        saved = dcache.save(key, train_ds, eval_ds, meta)
        out.cache, out.cache_dir = "miss", str(saved) if saved else None
    return out
