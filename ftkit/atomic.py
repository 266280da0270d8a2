"""Outputs appear complete or not at all: build beside the final place, then rename into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _user_modes(root: Path) -> None:
    """Files take the user's umask: transformers writes model.safetensors through a private 0600
    temp file, which left merged models unreadable to the user's group."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    mode = 0o666 & ~_umask()
    for p in files:
        if not p.is_symlink() and p.stat().st_mode & 0o777 != mode:
            p.chmod(mode)


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` (file or dir) with `tmp`; same filesystem, so the rename is atomic."""
    _user_modes(tmp)
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    tmp.rename(final)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh temp dir beside `final`; whatever the body did not publish() is removed on the way out."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise become the output's mode
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
