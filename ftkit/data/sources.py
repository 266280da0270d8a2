"""Read data files into rows, each remembering where it came from (file:line) for error messages."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


@dataclass
class Row:
    data: dict
    where: str  # "file:line" or "file row N"


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(Row(obj, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.lineno > 1 or text.lstrip().startswith("{"):
            # One object per line saved as .json is common: read it as JSON Lines.
            try:
                return _read_jsonl(path)
            except UserError:
                pass
        raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(obj, dict):
        # {"train": [...]} or {"data": [...]}: take the single list inside.
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    # Line numbers of array items: find each top-level object's opening line cheaply.
    starts = _object_lines(text)
    rows = []
    for i, item in enumerate(obj):
        where = f"{path}:{starts[i]}" if i < len(starts) else f"{path} row {i + 1}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected an object, got {type(item).__name__}")
        rows.append(Row(item, where))
    return rows


def _object_lines(text: str) -> list[int]:
    """1-based line of each object that opens at depth 1 of a top-level JSON array."""
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if depth == 1 and ch == "{":
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def _read_csv(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = []
        for rec in reader:
            if None in rec:
                raise UserError(f"{path}:{reader.line_num}: more fields than the header has columns")
            rows.append(Row(dict(rec), f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file: {exc}") from None
    return [Row(rec, f"{path} row {i + 1}") for i, rec in enumerate(table.to_pylist())]


def _read_txt(path: Path) -> list[Row]:
    """Plain text: one sample per paragraph (blank-line separated)."""
    rows, buf, start = [], [], 1
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                if not buf:
                    start = lineno
                buf.append(line)
            elif buf:
                rows.append(Row({"text": "".join(buf).rstrip("\n")}, f"{path}:{start}"))
                buf = []
    if buf:
        rows.append(Row({"text": "".join(buf).rstrip("\n")}, f"{path}:{start}"))
    return rows


def _read_saved_dataset(path: Path) -> list[Row]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take train
        if "train" not in ds:
            raise UserError(f"{path}: a saved DatasetDict without a 'train' split (has: {', '.join(ds)})")
        ds = ds["train"]
    return [Row(rec, f"{path} row {i + 1}") for i, rec in enumerate(ds)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
           ".txt": _read_txt}


def read_rows(path: Path) -> list[Row]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path)
        raise UserError(f"{path}: a directory that is not a datasets save_to_disk dir")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        rows = reader(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise UserError(f"{path}: the file has no rows")
    return rows
