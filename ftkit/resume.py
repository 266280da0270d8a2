"""Checkpoints of an interrupted run: finding the one to resume from, and stopping cleanly on a signal.

A run's checkpoints live in `<run dir>.partial/checkpoints/checkpoint-<step>` (TRL/Trainer format),
so `--resume` finds them without being told where they are.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

from ftkit.errors import UserError
from ftkit.ui import log

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else -1


def is_complete(ckpt: Path) -> bool:
    # The Trainer writes trainer_state.json after the weights, optimizer and RNG states, so a
    # checkpoint cut short by SIGKILL lacks it, or holds a half-written one, and must not be resumed from.
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-N under folder (or folder/checkpoints), else None."""
    for base in (folder / "checkpoints", folder):
        if base.is_dir():
            found = sorted((p for p in base.iterdir() if p.is_dir() and checkpoint_step(p) >= 0 and is_complete(p)),
                           key=checkpoint_step)
            if found:
                return found[-1]
    return None


def resolve_resume(resume: str | None, work: Path) -> Path | None:
    """The checkpoint to resume from: --resume (latest of this run) or --resume PATH (a checkpoint or run dir)."""
    if resume is None:
        return None
    if resume == "latest":
        ckpt = latest_checkpoint(work)
        if ckpt is None:
            log(f"[yellow]note:[/] --resume: no checkpoint in {work / 'checkpoints'}; starting from step 0")
        return ckpt
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint directory")
    if checkpoint_step(path) >= 0:
        if not is_complete(path):
            raise UserError(f"--resume {resume}: incomplete checkpoint (no complete trainer_state.json); "
                            f"it was probably cut short, pick an older one")
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"--resume {resume}: no complete checkpoint-N directory in it")
    return ckpt


def trim_metrics_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the history reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut short by the kill: it and anything after it are not trustworthy
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def make_interrupt_callback():
    """A TrainerCallback that turns SIGINT/SIGTERM into 'save a checkpoint, stop training'.

    Every rank must stop at the same step, or the ranks still training wait forever in their next
    all-reduce; so the stop request is all-reduced across ranks at each step end.
    """
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self):
            self.requested = False
            self.stopped_at: int | None = None
            self._previous: dict = {}

        def install(self) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

        def uninstall(self) -> None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

        def _handle(self, signum, frame):
            if self.requested:
                if signum == signal.SIGINT:  # Ctrl-C twice: the user does not want to wait for the save
                    self.uninstall()
                    raise KeyboardInterrupt
                return  # CI cancellation sends SIGINT then SIGTERM; keep saving
            self.requested = True
            log(f"[yellow]{signal.Signals(signum).name}:[/] saving a checkpoint after this step, then stopping "
                "(Ctrl-C again aborts without saving)")

        def _anyone_requested(self, args) -> bool:
            import torch
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return self.requested
            flag = torch.tensor([1 if self.requested else 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        def on_step_end(self, args, state, control, **kw):
            if self._anyone_requested(args):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit 130)."""

    exit_code = 130

    def __init__(self, step: int, work: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {work / 'checkpoints'}")
        self.step = step
        self.work = work


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same one, with --resume instead of --overwrite."""
    import shlex

    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--overwrite" or a.startswith("--resume="):
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        out.append(a)
    return "ftkit " + " ".join(shlex.quote(a) for a in out + ["--resume"])
