"""Run dirs are built beside their final place and renamed into it at the end, so a crash
or Ctrl-C never leaves a half-written run dir where a finished one is expected."""

from __future__ import annotations

import shutil
from pathlib import Path

from ftkit.errors import UserError


class RunDir:
    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final = Path(final).expanduser()
        if self.final.exists() and not self.final.is_dir():
            raise UserError(f"output.dir: {self.final} exists and is not a directory")
        if self.final.is_dir() and any(self.final.iterdir()) and not overwrite:
            raise UserError(f"output.dir: {self.final} already exists and is not empty; pass --overwrite to replace it")
        # A fixed name (not a random temp) so an interrupted run's checkpoints can be found again.
        self.work = self.final.parent / f"{self.final.name}.partial"
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            probe = self.final.parent / f".{self.final.name}.write-test"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output.dir: cannot write under {self.final.parent}: {exc.strerror}") from None

    def start(self, keep_partial: bool = False) -> Path:
        if self.work.exists() and not keep_partial:
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        return self.work

    def commit(self) -> Path:
        trash = None
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            self.final.rename(trash)
        self.work.rename(self.final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final
