"""Shared by every fuzz target: the finding policy and the atheris (or plain replay) driver.

A finding is any exception other than ftkit's UserError (the exit-2 contract), any input that
takes over 2 s (libFuzzer's -timeout=2 turns it into a crash file) or a crash of the process.
Corpora and findings live outside the repo (fuzz_all.sh puts them under $FTKIT_FUZZ_DIR).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One scratch dir per process, on tmpfs when there is one: targets that read files write them here.
SCRATCH = Path(tempfile.mkdtemp(prefix="ftkit-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def seeds(*globs: str) -> list[Path]:
    return sorted(p for g in globs for p in REPO.glob(g) if p.is_file())


def instrumented(*packages: str):
    """Imports inside this block get coverage instrumentation (when atheris is installed)."""
    try:
        import atheris
    except ImportError:
        return contextlib.nullcontext()
    # FTKIT_FUZZ_INSTRUMENT overrides the packages (comma-separated). Instrumenting pure-Python
    # yaml makes every input ~3x slower; 1M-input runs instrument ftkit only (its bounded loader
    # hooks still steer the fuzzer into yaml's depth, alias and key paths).
    names = os.environ.get("FTKIT_FUZZ_INSTRUMENT")
    return atheris.instrument_imports(include=names.split(",") if names else list(packages or ("ftkit", "yaml")))


def run(one: Callable[[bytes], None]) -> None:
    """`python fuzz/fuzz_x.py [libFuzzer args] [corpus dirs]`; without atheris, replay the files given."""
    from ftkit.errors import UserError

    keep = os.environ.get("FTKIT_FUZZ_KEEP_GOING")  # a dir: record each finding there and fuzz on
    seen: set[tuple] = set()

    budget = float(os.environ.get("FTKIT_FUZZ_CPU_TIMEOUT", "2"))

    def guarded(data: bytes) -> None:
        import time

        cpu = time.process_time()
        try:
            one(data)
        except UserError:
            pass  # the contract: exit 2 with a message
        except Exception as exc:
            if not keep:
                raise
            _record(Path(keep), data, exc, seen)
        # A hang is judged in CPU seconds: on a shared machine a niced fuzzer can wait seconds for a
        # core, which libFuzzer's wall-clock -timeout (kept as a backstop) would call a hang.
        spent = time.process_time() - cpu
        if spent > budget:
            slow = TimeoutError(f"one input took {spent:.1f} CPU seconds (limit {budget:g})")
            if not keep:
                raise slow
            _record(Path(keep), data, slow, seen)

    try:
        import atheris
    except ImportError:
        files = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
        paths = [q for p in files for q in (sorted(p.rglob("*")) if p.is_dir() else [p]) if q.is_file()]
        for p in paths:
            guarded(p.read_bytes())
        print(f"atheris not installed: replayed {len(paths)} inputs without a finding")
        return
    atheris.Setup(sys.argv, guarded)
    atheris.Fuzz()


def _record(out: Path, data: bytes, exc: Exception, seen: set) -> None:
    """A finding, kept without stopping the run: one file (and one printed traceback) per exception
    type and raising line, so a million inputs hitting the same bug leave one file, not thousands."""
    import hashlib
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    sig = (type(exc).__name__, frames[-1].filename, frames[-1].lineno) if frames else (type(exc).__name__, "slow", 0)
    if sig in seen:
        return
    seen.add(sig)
    out.mkdir(parents=True, exist_ok=True)
    name = f"finding-{sig[0]}-{Path(sig[1]).stem}-{sig[2]}-{hashlib.sha1(data).hexdigest()[:12]}"
    (out / name).write_bytes(data)
    print(f"FINDING {name}\n{''.join(traceback.format_exception(exc))}", file=sys.stderr, flush=True)


def main(one: Callable[[bytes], None], write_seeds: Callable[[Path], int], warm: Callable[[], object] = lambda: None):
    """`fuzz_x.py --write-seeds DIR` writes the seed corpus; otherwise warm up (slow first loads) and fuzz."""
    if sys.argv[1:2] == ["--write-seeds"]:
        print(write_seeds(Path(sys.argv[2])))
        return
    warm()
    run(one)
