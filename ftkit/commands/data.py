"""`ftkit data check | preview | convert`: see what the model will learn before training on it.

No torch here: check and preview load only the tokenizer (transformers), never a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftkit.choices import CHAT_FORMATS, as_enum
from ftkit.commands.common import SetOpt, handle_errors, load

ConvertTo = as_enum("ConvertTo", CHAT_FORMATS)
ConvertFrom = as_enum("ConvertFrom", ("auto", *CHAT_FORMATS))

app = typer.Typer(help="Check, preview and convert training data.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


def _tokenizer(r, log):
    from ftkit.models import load_tokenizer, resolve_model
    from ftkit.ui import quiet_libraries

    quiet_libraries()
    base = resolve_model(r.model.name, log=log)
    return load_tokenizer(base, r.model.trust_remote_code, r.model.revision)


def _log(msg: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(msg)


@app.command()
@handle_errors
def check(recipe: str = typer.Argument(..., help="Recipe YAML"), set_: Optional[List[str]] = SetOpt,
          no_cache: bool = typer.Option(False, "--no-cache", help="Re-tokenize even if a cached copy exists")):
    """Load, convert and tokenize all data; report rows, drops, truncation and token lengths."""
    from ftkit.data import load_canonical, prepare

    r = load(recipe, set_)
    canon = load_canonical(r)  # bad rows fail here, before any tokenizer or model is loaded
    if set(canon.format.split("+")) & {"preference", "unpaired", "prompt"}:
        # Their stage's TRL trainer tokenizes these rows; the SFT tokenization below does not apply.
        out.print(f"format {canon.format} · {len(canon.train):,} train rows, {len(canon.eval):,} eval rows "
                  f"(converted; tokenized by the {r.stage} trainer)")
        out.print("[green]ok[/]")
        return
    tok = _tokenizer(r, _log)
    data = prepare(r, tok, log=_log, cache=not no_cache, canonical=canon)

    src = Table(title="sources", title_justify="left")
    for col in ("split", "source", "format", "rows"):
        src.add_column(col, justify="right" if col == "rows" else "left")
    for s in canon.sources:
        src.add_row(s["field"], s["source"], s["format"], str(s["rows"]))
    out.print(src)

    stats = Table(title=f"tokenized (max_length {r.data.max_length}, train_on {r.data.train_on}, "
                        f"truncation {r.data.truncation})", title_justify="left")
    keys = [("rows", "rows"), ("kept", "kept"), ("dropped_no_labels", "dropped (no trained tokens)"),
            ("truncated", "truncated"), ("tokens", "tokens"), ("trained_tokens", "trained tokens"),
            ("length_min", "length min"), ("length_median", "length median"), ("length_p95", "length p95"),
            ("length_max", "length max")]
    splits = [(name, st.summary()) for name, st in (("train", data.train_stats), ("eval", data.eval_stats))
              if st.rows]
    stats.add_column("")
    for name, _ in splits:
        stats.add_column(name, justify="right")
    for k, label in keys:
        stats.add_row(label, *(f"{sm[k]:,}" for _, sm in splits))
    out.print(stats)
    sm = data.train_stats.summary()
    share = sm["trained_tokens"] / sm["tokens"] if sm["tokens"] else 0.0
    template = "tokenizer's" if not r.data.template else r.data.template if len(r.data.template) < 20 else "custom"
    out.print(f"format {data.format} · template {template if data.template else 'none'} · "
              f"{share:.0%} of train tokens trained · cache {data.cache}")
    _chat_lines(canon, data)
    out.print("[green]ok[/]")


def _chat_lines(canon, data) -> None:
    """Tool calls, reasoning and per-turn loss, when the data has any."""
    from ftkit.data.chat import chat_counts

    counts = chat_counts(canon.train + canon.eval)
    counts["extra samples (per-turn renders)"] = data.train_stats.extra_samples + data.eval_stats.extra_samples
    counts["rows on the reference render path"] = data.train_stats.reference_rows + data.eval_stats.reference_rows
    shown = {k: v for k, v in counts.items() if v}
    if shown:
        out.print("chat: " + " · ".join(f"{v:,} {k}" for k, v in shown.items()))


@app.command()
@handle_errors
def preview(recipe: str = typer.Argument(..., help="Recipe YAML"), n: int = typer.Option(3, "-n", min=1),
            set_: Optional[List[str]] = SetOpt,
            tokens: bool = typer.Option(False, "--tokens", help="Also list every token with its label")):
    """Show rendered samples with the trained-on tokens highlighted, and their label mask."""
    from ftkit.data import _read_field
    from ftkit.data.chat import uses_tools
    from ftkit.data.templates import require_tool_template, resolve_template
    from ftkit.data.tokenize import IGNORE, TokenStats, encode_rows

    r = load(recipe, set_)
    _, rows, _ = _read_field(r, "train")
    rows = rows[:n]
    tok = _tokenizer(r, _log)
    template = resolve_template(tok, r.data.template, r.where("data", "template"))
    if uses_tools(rows):
        require_tool_template(tok, template, r.data.template, r.where("data", "template"))
    out.print(Text.assemble("legend: ", ("trained (label = token)", "bold black on green"), "  ",
                            ("masked (label = -100)", "dim")))
    for row in rows:
        st = TokenStats()
        enc = encode_rows([row], tok, template, r.data.train_on, r.data.max_length, st, r.data.truncation,
                          r.data.train_on_reasoning)[:1]  # a row split per turn shows its first sample
        out.rule(f"{row['where']}")
        off = [str(i + 1) for i, m in enumerate(row.get("messages", ())) if m.get("train") is False]
        if off:
            out.print(f"turn(s) {', '.join(off)}: train: false (no loss)")
        if not enc:
            out.print("[yellow]dropped:[/] no token of this row is trained (it would not be used)")
            continue
        ids, labels = enc[0]["input_ids"], enc[0]["labels"]
        text = Text()
        for piece, trained in labelled_spans(tok, ids, labels, IGNORE):
            text.append(piece, style="bold black on green" if trained else "dim")
        out.print(text)
        out.print(f"mask: {_mask_ranges(labels, IGNORE)} · {sum(lab != IGNORE for lab in labels)} of {len(ids)} "
                  f"tokens trained" + (" · [yellow]truncated[/]" if st.truncated else ""))
        out.print("label mask: " + "".join("█" if lab != IGNORE else "·" for lab in labels))
        if tokens:
            table = Table("#", "token", "id", "label")
            for i, (tid, lab) in enumerate(zip(ids, labels)):
                table.add_row(str(i), repr(tok.decode([tid])), str(tid), "-100" if lab == IGNORE else str(lab))
            out.print(table)


def labelled_spans(tok, ids: list[int], labels: list[int], ignore: int) -> list[tuple[str, bool]]:
    """The text as runs of trained / masked tokens, each run decoded whole.

    Decoding token by token garbles any character split over several byte-level tokens (CJK,
    emoji, accents): each piece alone is half a UTF-8 sequence. A run that ends inside such a
    character takes the next tokens in until it decodes cleanly, so the text reads as in the file."""
    spans, i = [], 0
    while i < len(ids):
        trained = labels[i] != ignore
        j = i + 1
        while j < len(ids) and (labels[j] != ignore) == trained:
            j += 1
        piece = tok.decode(ids[i:j])
        while piece.endswith("\ufffd") and j < len(ids):  # a character cut at the run's end
            j += 1
            piece = tok.decode(ids[i:j])
        spans.append((piece, trained))
        i = j
    return spans


def _mask_ranges(labels: list[int], ignore: int) -> str:
    """'trained tokens 12-15, 30-41' from a label list."""
    ranges, start = [], None
    for i, lab in enumerate(labels + [ignore]):
        if lab != ignore and start is None:
            start = i
        elif lab == ignore and start is not None:
            ranges.append(f"{start}-{i - 1}" if i - 1 > start else f"{start}")
            start = None
    return "trained tokens " + (", ".join(ranges) if ranges else "none")


@app.command()
@handle_errors
def convert(src: str = typer.Argument(..., metavar="IN", help="Data file to convert"),
            from_: ConvertFrom = typer.Option("auto", "--from", help="Input format (auto detects from the columns)"),
            to: ConvertTo = typer.Option(..., "--to", help="Row format to write"),
            output: str = typer.Option(..., "--output", "-o", help="Output .jsonl (or .json for one list)"),
            column: Optional[List[str]] = typer.Option(None, "--column", help="format_col=your_col (repeatable)"),
            role: Optional[List[str]] = typer.Option(None, "--role", help="your_role=user|assistant|... (repeatable)"),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file")):
    """Convert a data file between formats (e.g. sharegpt -> messages)."""
    from ftkit.data.formats import flag_columns, from_canonical, to_canonical
    from ftkit.data.sources import read_rows
    from ftkit.errors import UserError

    dest = Path(output)
    if dest.exists() and not overwrite:
        raise UserError(f"--output: {dest} exists; pass --overwrite to replace it")
    if dest.suffix not in (".jsonl", ".json"):
        raise UserError(f"--output: {dest}: write .jsonl (one row per line) or .json (one list)")
    path = Path(src)
    if not path.exists():
        raise UserError(f"{src}: file not found")
    cols = flag_columns(column, role, "--from")
    fmt, items = to_canonical(read_rows(path), from_.value, cols, None, recipe_where="--column")
    converted = [from_canonical(item, to.value) for item in items]  # all or nothing: errors before writing
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        if dest.suffix == ".json":
            json.dump(converted, fh, ensure_ascii=False, indent=1)
        else:
            fh.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in converted)
    os.replace(tmp, dest)
    _log(f"[green]ok[/] {len(converted)} rows {fmt} -> {to.value}: {dest}")

