"""Tokenized data cached under FTKIT_HOME, keyed by what determines it.

The key hashes the data sources' contents, the recipe's data section (plus the seed, which
decides shuffling and the eval split) and the tokenizer (vocabulary, special tokens, chat
template), so any change to one of them is a miss. Entries are `datasets` arrow dirs (no
pickle), written beside their final place and renamed in, so a crash never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from ftkit.data.tokenize import TokenStats

# Bump when tokenization/masking changes, so old entries are not reused.
CACHE_VERSION = "1"


def cache_root() -> Path:
    from ftkit.models import ftkit_home

    return ftkit_home() / "data-cache"


def _hash_path(h, path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                _hash_path(h, p)
        return
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def _hash_hub(h, value: str) -> None:
    """A hub dataset's identity is its datasets fingerprint (from the local datasets cache)."""
    from ftkit.data.sources import read_hub_dataset

    h.update(value.encode())
    h.update(str(read_hub_dataset(value)._fingerprint).encode())


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str((type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None),
                  tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()


def cache_key(recipe, sources: list[tuple[str, Path]], tokenizer) -> str:
    """sources: (recipe value, resolved path) of every train and eval source, in recipe order."""
    from ftkit.data.sources import is_hub_id

    h = hashlib.sha256(f"ftkit-data-{CACHE_VERSION}".encode())
    for value, path in sources:
        h.update(b"\0source\0")
        if not path.exists() and is_hub_id(value):
            _hash_hub(h, value)
        else:
            _hash_path(h, path)
    h.update(json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True).encode())
    h.update(f"seed={recipe.train.seed}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:24]


def _stats_to_json(st: TokenStats) -> dict:
    return {k: v for k, v in asdict(st).items() if k != "lengths"}


def _stats_from_json(d: dict, ds) -> TokenStats:
    st = TokenStats(**{f.name: d[f.name] for f in fields(TokenStats) if f.name in d})
    if ds is not None and len(ds):
        import pyarrow.compute as pc

        st.lengths = pc.list_value_length(ds.data.column("input_ids")).to_pylist()
    return st


def load(key: str):
    """(train ds, eval ds or None, meta) for a cache entry, or None on a miss."""
    entry = cache_root() / key
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    from datasets import load_from_disk

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        train = load_from_disk(str(entry / "train"))
        evald = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    except Exception:  # a damaged entry is a miss, rebuilt below
        return None
    meta["train_stats"] = _stats_from_json(meta["train_stats"], train)
    meta["eval_stats"] = _stats_from_json(meta["eval_stats"], evald)
    return train, evald, meta


def save(key: str, train_ds, eval_ds, meta: dict) -> Path | None:
    import datasets

    datasets.disable_progress_bars()  # our log line says what happened
    root = cache_root()
    final = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    except OSError:
        return None  # a read-only FTKIT_HOME only costs the next run the re-tokenization
    try:
        train_ds.save_to_disk(str(tmp / "train"))
        if eval_ds is not None and len(eval_ds):
            eval_ds.save_to_disk(str(tmp / "eval"))
        out = dict(meta)
        out["train_stats"] = _stats_to_json(meta["train_stats"])
        out["eval_stats"] = _stats_to_json(meta["eval_stats"])
        (tmp / "meta.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
