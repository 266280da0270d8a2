"""One writer per output: an flock on a hidden `.<name>.lock` file beside the output.

Two runs into one output dir used to delete each other's work. Every writer of an output (a
run dir, merge-lora, export, the gguf conversion cache) now takes this lock first; a second
writer is refused with exit 2 naming the holder (pid, host, command, start time) from the JSON
record inside the lock file.

The kernel drops an flock when its holder dies, however it dies, so a crashed or SIGKILLed run
never leaves the lock stuck: the next run takes it at once and only notes the stale record.
A clean exit deletes the lock file. The file is unlinked while still locked and a taker checks
that the inode it locked is still the one at the path, so an unlink never lets two holders in.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from ftkit.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locking, the rest of ftkit still works
    fcntl = None

_HELD: dict[Path, "OutputLock"] = {}
# argv can carry secrets (--set hub.token=..., an hf_ token); the record is readable by others.
_SECRET = re.compile(r"(hf_[A-Za-z0-9]{8,})|((?:token|secret|password|api[_-]?key)[^=\s]*=)\S+", re.IGNORECASE)


class OutputLocked(UserError):
    """Another live process writes this output."""


def lock_path(output: Path) -> Path:
    output = Path(os.path.abspath(Path(output).expanduser()))
    return output.parent / f".{output.name}.lock"


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    return _SECRET.sub(lambda m: "hf_***" if m.group(1) else m.group(2) + "***", " ".join(argv))


def _describe(record: dict) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"command `{record.get('command', '?')}`, started {when}")


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 65536, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class OutputLock:
    """An exclusive lock on one output path, held by this process until release() or exit."""

    def __init__(self, output: Path, what: str = "output"):
        self.output = Path(os.path.abspath(Path(output).expanduser()))
        self.path = lock_path(self.output)
        self.what = what
        self.fd: int | None = None
        self.pid = os.getpid()
        self.stale: dict | None = None  # the record a dead holder left behind, if any

    def acquire(self, wait: bool = False, log=None) -> "OutputLock":
        if fcntl is None or self.fd is not None:
            return self
        while True:
            fd = self._open()
            self._flock(fd, wait, log)
            try:  # a holder that finished unlinked the file while we waited: then lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        old = _read_record(fd)
        if old and not (old.get("pid") == os.getpid() and old.get("host") == socket.gethostname()):
            self.stale = old
            if log is not None:
                log(f"note: {self.path} was left by a run that is gone ({_describe(old)}); "
                    f"it ended without cleaning up (killed?). Taking it over.")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "started": time.time(),
                  "output": str(self.output)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        _HELD[self.path] = self
        return self

    def _open(self) -> int:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise UserError(f"{self.what}: cannot write under {self.output.parent}: {exc.strerror}") from None

    def _flock(self, fd: int, wait: bool, log) -> None:
        """Lock fd; raises OutputLocked when another process holds it and we may not wait."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _read_record(fd) or {}
        except OSError:  # a filesystem without flock (some network mounts): run unguarded, as before
            os.close(fd)
            if log is not None:
                log(f"note: {self.path.parent} does not support file locks; a second run into {self.output} "
                    f"would not be detected")
            raise _NoLocks() from None
        if not wait:
            os.close(fd)
            raise OutputLocked(
                f"{self.what}: {self.output} is being written right now by another ftkit process "
                f"({_describe(holder)}). Wait for it to finish or stop it, or choose another output "
                f"(--output). --overwrite does not replace a run that is still running.")
        if log is not None:
            log(f"waiting for {self.output}: another process is writing it ({_describe(holder)})")
        fcntl.flock(fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is None or os.getpid() != self.pid:
            return  # a forked child (a data worker) must not unlink its parent's lock
        try:
            os.unlink(self.path)  # while still locked, so no one can lock the old inode and think it current
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        _HELD.pop(self.path, None)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _NoLocks(Exception):
    pass


def lock_output(output: Path, what: str = "output", wait: bool = False, log=None) -> OutputLock:
    """Take (or reuse, when this process already holds it) the lock on `output`."""
    path = lock_path(output)
    if path in _HELD:
        return _HELD[path]
    lock = OutputLock(output, what)
    try:
        return lock.acquire(wait=wait, log=log)
    except _NoLocks:
        return lock


def holds_lock(output: Path) -> bool:
    return lock_path(output) in _HELD


def release_output(output: Path) -> None:
    lock = _HELD.get(lock_path(output))
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:
    # A normal exit (even by an exception) cleans up, so only a killed run leaves a stale record.
    for lock in list(_HELD.values()):
        lock.release()
