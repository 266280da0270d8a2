"""`--num-processes N`: re-run this same command under torchrun, one process per GPU (or CPU share).

The launching process stays outside the process group: it validates the recipe first, forwards
Ctrl-C/SIGTERM once, and after the workers finish it reads the run dir to apply the quality
gates and print the --json line, so exit codes (2, 3, 130) survive torchrun's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ftkit.errors import UserError

# Options the launcher handles itself; the workers never see them.
_OWN = {"--num-processes": True, "-n": True, "--json": False, "--fail-if": True}
CHILD_ENV = "FTKIT_LAUNCHED"
RESULT_ENV = "FTKIT_RESULT_FILE"


def in_distributed_run() -> bool:
    """Already one of several ranks (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_by_ftkit() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def worker_args(argv: list[str]) -> list[str]:
    """argv without the launcher's own options (--num-processes N, --json, --fail-if EXPR)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in _OWN:
            i += 1 + (1 if _OWN[name] and "=" not in a else 0)
            continue
        out.append(a)
        i += 1
    return out


def check_devices(n: int) -> None:
    import torch

    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise UserError(f"--num-processes {n}: only {torch.cuda.device_count()} GPU(s) visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def run_workers(n: int, argv: list[str], stdout_to_stderr: bool = False) -> tuple[int, bool]:
    """Run `python -m ftkit <argv>` as n torchrun workers; returns (rank 0's exit code, interrupted?)."""
    check_devices(n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="ftkit-launch-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, CHILD_ENV: "1", RESULT_ENV: str(result),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // n)))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "ftkit", *argv]
        # Own session: a terminal Ctrl-C reaches only us, and we forward it once; torchrun forwarding
        # a second copy would make the workers abort instead of saving a checkpoint.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                stdout=sys.stderr if stdout_to_stderr else None)
        interrupted = False

        def forward(signum, frame):
            nonlocal interrupted
            interrupted = True
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if result.is_file():
            rc = json.loads(result.read_text(encoding="utf-8")).get("exit_code", rc)
        elif rc != 0:
            rc = 130 if interrupted else 1
        return rc, interrupted


def record_result(exit_code: int) -> None:
    """Rank 0 of a launched run leaves its exit code for the launcher."""
    from ftkit.ui import is_main_process

    path = os.environ.get(RESULT_ENV)
    if path and is_main_process():
        Path(path).write_text(json.dumps({"exit_code": exit_code}), encoding="utf-8")
