"""Run dirs are built beside their final place and renamed into it at the end, so a crash
or Ctrl-C never leaves a half-written run dir where a finished one is expected.

In a multi-process run every rank builds a RunDir (the checks are read-only), but only
rank 0 locks, creates, writes and renames; the others wait at a barrier.

Rank 0 locks the output (ftkit/locks.py) as soon as the RunDir is built, before any model is
loaded, so a second run into a live run's dir fails at once (exit 2, naming the live run)
instead of deleting the live run's `.partial` dir; the lock is released once the run dir is
committed, or when the process ends, however it ends.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ftkit.atomic import publish, sweep_leftovers
from ftkit.errors import UserError
from ftkit.locks import lock_output, release_output
from ftkit.ui import is_main_process, log


def default_output_dir(recipe) -> str:
    """output.dir, else runs/<recipe file name>."""
    if recipe.output.dir:
        return recipe.output.dir
    stem = Path(recipe._source).stem if recipe._source else recipe.stage
    return str(Path("runs") / stem)


def _no_barrier() -> None:
    pass


class RunDir:
    def __init__(self, final: str | Path, overwrite: bool = False, resume: bool = False):
        self.final = Path(final).expanduser()
        self.overwrite = overwrite
        self.resume = resume
        if is_main_process():  # before any check below: a live run's dir is not ours to judge or touch
            lock_output(self.final, what="output.dir", log=log)
        if self.final.exists() and not self.final.is_dir():
            raise UserError(f"output.dir: {self.final} exists and is not a directory")
        if self.final.is_dir() and any(self.final.iterdir()) and not overwrite:
            hint = " (that run finished; there is nothing to resume)" if resume else ""
            raise UserError(f"output.dir: {self.final} already exists and is not empty{hint}; "
                            f"pass --overwrite to replace it")
        # A fixed name (not a random temp) so an interrupted run's checkpoints can be found again.
        self.work = self.final.parent / f"{self.final.name}.partial"
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            probe = self.final.parent / f".{self.final.name}.write-test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output.dir: cannot write under {self.final.parent}: {exc.strerror}") from None
        if not resume:  # said before the model loads, not after
            self._refuse_to_drop_checkpoints()

    def _refuse_to_drop_checkpoints(self) -> None:
        from ftkit.resume import latest_checkpoint

        ckpt = latest_checkpoint(self.work) if self.work.exists() and not self.overwrite else None
        if ckpt is not None:
            raise UserError(f"{self.work} holds an interrupted run (checkpoint at step {ckpt.name.split('-')[-1]}); "
                            f"pass --resume to continue it, or --overwrite to start over")

    def start(self, keep_partial: bool = False, barrier: Callable[[], None] = _no_barrier) -> Path:
        if is_main_process():
            lock_output(self.final, what="output.dir", log=log)  # a no-op when __init__ took it
        if not keep_partial:
            self._refuse_to_drop_checkpoints()
        if is_main_process():
            try:
                sweep_leftovers(self.final)
                if self.work.exists() and not keep_partial:
                    shutil.rmtree(self.work)
                self.work.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"output.dir: cannot create {self.work}: {exc.strerror}") from None
        barrier()
        return self.work

    def commit(self, barrier: Callable[[], None] = _no_barrier) -> Path:
        barrier()  # every rank has finished writing its share before the rename
        if is_main_process():
            publish(self.work, self.final)
            release_output(self.final)
        barrier()
        return self.final
