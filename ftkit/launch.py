"""`--num-processes N` (and `--nnodes/--node-rank/--master-addr/--master-port`): re-run this same
command under torchrun, one process per GPU (or CPU share), on this machine or on several.

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
_OWN = {"--num-processes": True, "-n": True, "--json": False, "--fail-if": True, "--nnodes": True,
        "--node-rank": True, "--master-addr": True, "--master-port": True}
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


def run_workers(n: int, argv: list[str], stdout_to_stderr: bool = False, launch=None,
                timeout_s: int = 600) -> tuple[int, bool]:
    """Run `python -m ftkit <argv>` as n torchrun workers on this node (of launch.nnodes); returns
    (rank 0's exit code, interrupted?). A rank that fails is named on stderr."""
    from ftkit.distributed import Launch
    from ftkit.distributed_agent import FAILURE_ENV

    launch = launch or Launch(nproc=n)
    check_devices(n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="ftkit-launch-") as tmp:
        result, failure = Path(tmp) / "result.json", Path(tmp) / "failure.json"
        env = {**os.environ, CHILD_ENV: "1", RESULT_ENV: str(result), FAILURE_ENV: str(failure),
               "FTKIT_NODE_RANK": str(launch.node_rank),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // n)))}
        cmd = [sys.executable, "-m", "ftkit.distributed_agent", *launch.torchrun_args(timeout_s), "-m", "ftkit", *argv]
        rc, interrupted = _wait(cmd, env, stdout_to_stderr)
        record = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {}
        if record:
            rc = record.get("exit_code", rc)
        elif rc != 0:
            rc = 130 if interrupted else 1
        # After a hang, rank 0 named the silent rank; the agent's later SIGKILL of it is no news.
        if failure.is_file() and rc not in (2, 3, 130) and not record.get("hang"):
            rc = rc or 1  # rank 0 may have finished; the job did not
            print(f"error: {explain_failure(json.loads(failure.read_text(encoding='utf-8')), launch)}",
                  file=sys.stderr)
        return rc, interrupted


def _wait(cmd: list[str], env: dict, stdout_to_stderr: bool) -> tuple[int, bool]:
    # Own session: a terminal Ctrl-C reaches only us, and we forward it once; torchrun forwarding
    # a second copy would make the workers abort instead of saving a checkpoint.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sys.stderr if stdout_to_stderr else None)
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
    return rc, interrupted


def explain_failure(record: dict, launch) -> str:
    """One line for the first rank that failed on this node (or the rendezvous that never happened)."""
    if "rendezvous" in record:
        return (f"node {launch.node_rank} could not join node 0 at {launch.master_addr}:{launch.master_port or 29500} "
                f"({record['rendezvous']}); check --master-addr/--master-port, that node 0 was started with "
                f"--nnodes {launch.nnodes}, and that the port is open")
    f = record["failures"][0]
    how = f"was killed by {f['signal']}" if f["signal"] else f"exited with code {f['exitcode']}"
    others = [str(x["rank"]) for x in record["failures"][1:]]
    tail = f"; rank(s) {', '.join(others)} stopped with it" if others else ""
    return (f"rank {f['rank']} (on {f['host']}, node {f['node']}, pid {f['pid']}) {how}{tail}; "
            "the job was stopped on this node")


def record_result(exit_code: int, **extra) -> None:
    """Rank 0 of a launched run leaves its exit code for the launcher."""
    from ftkit.ui import is_main_process

    path = os.environ.get(RESULT_ENV)
    if path and is_main_process():
        Path(path).write_text(json.dumps({"exit_code": exit_code, **extra}), encoding="utf-8")
