"""Wall time per phase of a run. The lifecycle times its own phases with one of these (metrics.json
records them as `phases_s`); `ftkit bench` passes its own clock in to read every phase, the ones after
metrics.json is written included."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

# The phases a training run goes through besides its steps, in the order they run.
STARTUP, LOADING, TRAINER_IMPORT, TRAINER_PREP = ("start-up (torch, hardware)", "loading model and data",
                                                  "importing the trainer", "preparing the trainer")
EVALUATION, TRAINING, SAVING, EXTRAS = "evaluation", "training", "saving", "samples and report"
PHASES = (STARTUP, LOADING, TRAINER_IMPORT, TRAINER_PREP, EVALUATION, SAVING, EXTRAS)


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}  # phase -> seconds, summed over calls, in first-call order

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {name: round(s, 2) for name, s in self.seconds.items()}
