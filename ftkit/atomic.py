"""Outputs appear complete or not at all: build beside the final place, then rename into it."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` (file or dir) with `tmp`; same filesystem, so the rename is atomic."""
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
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
