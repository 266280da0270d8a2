"""Wall time per phase of a command, measured from outside by wrapping the functions that run each
phase for the duration of a `with` block (`ftkit bench` times a real run this way, without a
timing hook inside every stage)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import wraps
from typing import Iterator


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}  # phase -> seconds, summed over calls, in first-call order
        self.calls: dict[str, int] = {}
        self.last_end: float | None = None  # when the latest timed phase finished

    def _add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def _wrap(self, fn, phase: str):
        @wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.last_end = time.perf_counter()
                self._add(phase, self.last_end - t0)
        return timed

    def _mark(self, fn, phase: str):
        """The phase runs inline between two calls: from the end of the previous timed phase to this call."""
        @wraps(fn)
        def marked(*args, **kwargs):
            if self.last_end is not None:
                self.last_end, t0 = time.perf_counter(), self.last_end
                self._add(phase, self.last_end - t0)
            return fn(*args, **kwargs)
        return marked

    @contextmanager
    def timing(self, targets: list[tuple[object, str, str]],
               marks: list[tuple[object, str, str]] = ()) -> Iterator["PhaseClock"]:
        """targets: (module or object, attribute, phase name); each attribute that exists is timed
        while the block runs and restored after it. marks: the same, but the function ends a phase
        that started when the previous timed one ended (code inline in a caller)."""
        saved = []
        for (owner, attr, phase), wrap in [*((t, self._wrap) for t in targets), *((m, self._mark) for m in marks)]:
            fn = getattr(owner, attr, None)
            if callable(fn):
                saved.append((owner, attr, fn))
                setattr(owner, attr, wrap(fn, phase))
        try:
            yield self
        finally:
            for owner, attr, fn in reversed(saved):
                setattr(owner, attr, fn)
