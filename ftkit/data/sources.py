"""Read data files into rows, each remembering where it came from (file:line) for error messages."""

from __future__ import annotations

import csv
import json
import re
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
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply to read; a row is one flat object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(Row(obj, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read; rows are flat objects in one list") from None
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


_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.%\[\]:-]+)?$")


def is_hub_id(value: str) -> bool:
    """org/name, org/name:split or hf://org/name: not a path we can read, but the shape of a hub dataset id."""
    if value.startswith("hf://"):
        return True
    name = value.split(":", 1)[0]
    return bool(_HUB_ID.match(value)) and not Path(name).suffix.lower() in SUFFIXES and not Path(value).exists()


def split_hub_id(value: str) -> tuple[str, str]:
    value = value.removeprefix("hf://")
    name, _, split = value.partition(":")
    return name, split or "train"


def read_hub_dataset(value: str):
    """A hub dataset through `datasets.load_dataset` (its own cache serves offline runs)."""
    from datasets import load_dataset

    name, split = split_hub_id(value)
    try:
        ds = load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(
            f"{value}: not a local file, and loading it as the hub dataset {name!r} (split {split!r}) failed: {first}. "
            "Offline, a hub dataset must already be in the datasets cache; otherwise point data.train at a local "
            "file (.jsonl, .json, .csv, .parquet, .txt) or a save_to_disk dir."
        ) from None
    return ds


def read_hub(value: str) -> list[Row]:
    ds = read_hub_dataset(value)
    if len(ds) == 0:
        raise UserError(f"{value}: the hub dataset split is empty (no rows to train on)")
    return [Row(rec, f"{value} row {i + 1}") for i, rec in enumerate(ds)]


def read_source(value: str, path: Path) -> list[Row]:
    """A recipe data source: a local file/dir, else a hub dataset id."""
    if not path.exists() and is_hub_id(value):
        return read_hub(value)
    return read_rows(path)


def read_rows(path: Path) -> list[Row]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path)
        raise UserError(f"{path}: a directory that is not a datasets save_to_disk dir")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (no rows to train on)")
    try:
        rows = reader(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise UserError(f"{path}: the file is empty (no rows to train on)")
    return rows
