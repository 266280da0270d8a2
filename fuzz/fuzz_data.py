"""Fuzz every data reader and converter, as `ftkit data check` runs them (read, convert, screen, tokenize).

Input layout (so any byte string is a valid input and a finding replays from its file):
  byte 0: file suffix (.jsonl .json .csv .parquet .txt); byte 1: data.format (auto or a named one);
  byte 2: flags: 1 = the next line is data.columns as `ours=theirs,...`, 2 = the next line is data.roles
  the same way, 4 = (.parquet) build a real parquet file from the rest read as JSON Lines;
  the rest: the file's bytes.
"""

from __future__ import annotations

import io
import json
import os

from _harness import SCRATCH, instrumented, main, seeds

with instrumented("ftkit"):
    from pydantic import ValidationError

    from ftkit.data import load_canonical, prepare
    from ftkit.recipe import Recipe

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "completion", "text", "preference", "unpaired", "prompt")
STAGE = {"preference": "dpo", "unpaired": "kto", "prompt": "rl"}
_TOK = []
TOKENIZE = os.environ.get("FTKIT_FUZZ_TOKENIZE") == "1"  # also tokenize, as `ftkit data check` does (slower)


def _tokenizer():
    if not _TOK:
        from ftkit.models import load_tokenizer, resolve_model

        _TOK.append(load_tokenizer(resolve_model("smollm2-135m-instruct", log=lambda *_: None), False, None))
    return _TOK[0]


def _pairs(line: bytes) -> dict:
    text = line.decode("utf-8", "replace")
    return dict(p.split("=", 1) for p in text.split(",") if "=" in p)


def _parquet(body: bytes) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = [json.loads(x) for x in body.splitlines() if x.strip()]
        table = pa.Table.from_pylist([r for r in rows if isinstance(r, dict)])
    except Exception:
        return body  # not rows: the raw bytes make a (broken) parquet file instead
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def one(data: bytes) -> None:
    if len(data) < 3:
        return
    suffix, fmt, flags, body = SUFFIXES[data[0] % 5], FORMATS[data[1] % len(FORMATS)], data[2], data[3:]
    columns = roles = {}
    if flags & 1:
        line, _, body = body.partition(b"\n")
        columns = _pairs(line)
    if flags & 2:
        line, _, body = body.partition(b"\n")
        roles = _pairs(line)
    if suffix == ".parquet" and flags & 4:
        body = _parquet(body)
    path = SCRATCH / f"train{suffix}"
    path.write_bytes(body)
    stage = STAGE.get(fmt, "sft")
    try:
        recipe = Recipe.model_validate({"stage": stage, "data": {"train": str(path), "format": fmt, "columns": columns,
                                                                 "roles": roles, "max_length": 64}})
    except ValidationError:
        return  # a recipe error (load_recipe reports it with file:line), not a data one
    canon = load_canonical(recipe)
    if TOKENIZE:
        prepare(recipe, _tokenizer(), log=lambda *_: None, cache=False, canonical=canon)


def write_seeds(out) -> int:
    n = 0
    for p in seeds("data_templates/**/*"):
        if p.suffix in SUFFIXES:
            for fmt in (0,) + ((FORMATS.index("preference"),) if "preference" in str(p) else ()) + \
                    ((FORMATS.index("unpaired"),) if "unpaired" in str(p) else ()):
                (out / f"{p.parent.name}-{p.name}-{fmt}").write_bytes(bytes([SUFFIXES.index(p.suffix), fmt, 4]) +
                                                                    p.read_bytes())
                n += 1
    return n


def _warm() -> None:
    import pyarrow.parquet  # noqa: F401  (slow first imports happen before the 2 s clock runs)

    if TOKENIZE:
        _tokenizer()


if __name__ == "__main__":
    main(one, write_seeds, _warm)
