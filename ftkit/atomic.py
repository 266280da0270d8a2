"""Outputs appear complete or not at all: build beside the final place, then rename into it.

A kill at any instant leaves the destination either absent or complete: the old output is
renamed aside (one atomic rename) before the new one is renamed in (another), and the aside
copy is deleted only after. Leftovers of a killed writer (`.<name>.tmp-*`, `.<name>.old-*`)
are swept by the next writer of that output, under its lock (ftkit/locks.py).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftkit.errors import UserError
from ftkit.locks import holds_lock, lock_output

# Out of space: ENOSPC/EDQUOT for a full disk or quota, EFBIG for a file-size limit (RLIMIT_FSIZE).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _aside(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def sweep_leftovers(final: Path) -> list[Path]:
    """Remove what a killed writer of `final` left beside it. Call only while holding final's lock."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-[A-Za-z0-9_]+$")
    gone = [p for p in final.parent.iterdir() if pattern.match(p.name)] if final.parent.is_dir() else []
    for p in gone:
        _remove(p)
    return gone


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
    """Replace `final` (file or dir) with `tmp` on the same filesystem.

    Never deletes before the new output is in place: a kill between the two renames leaves
    `final` absent (its old copy aside, swept next time), never half-deleted.
    """
    _user_modes(tmp)
    old = None
    if final.exists() or final.is_symlink():
        old = _aside(final, "old")
        _remove(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)  # put the old output back: a failed publish changes nothing
        raise
    if old is not None:
        _remove(old)


_FULL_TEXT = re.compile(r"os error (28|27|122)\b|No space left|File too large|Disk quota|PytorchStreamWriter failed")


def disk_full(exc: BaseException) -> bool:
    """Out of space, however the writer says it: safetensors (Rust) and torch's zip writer raise their
    own types, with the OS error only in the text."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    return bool(_FULL_TEXT.search(str(exc)))


def disk_full_error(exc: BaseException, final: Path) -> UserError:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200]
    return UserError(f"out of disk space writing {final}{where}: {why}. Nothing was written to "
                     f"{final}; free some space (or choose an output on a larger disk) and run it again")


@contextmanager
def staged_dir(final: Path, wait: bool = False, log=None) -> Iterator[Path]:
    """A fresh temp dir beside `final`, under final's lock; whatever the body did not publish() is removed.

    wait: queue behind another writer of `final` instead of refusing (exit 2) while it runs.
    """
    final = Path(final)
    held_before = holds_lock(final)  # e.g. a stage writing a file inside its own output
    lock = lock_output(final, what=str(final), wait=wait, log=log)
    try:
        if lock.fd is not None:  # only a lock holder may sweep: without one, a leftover may be live
            sweep_leftovers(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise become the output's mode
        try:
            yield tmp
        except Exception as exc:
            if disk_full(exc):
                raise disk_full_error(exc, final) from None
            raise
        finally:
            _remove(tmp)
    finally:
        if not held_before:
            lock.release()
