"""Several processes, one or several machines: the launch spec, joining the process group, and
saying which rank failed when one dies or hangs.

The launcher side turns `-n/--nnodes/--node-rank/--master-addr/--master-port` into torchrun's
arguments (static rendezvous, so node 0 holds global rank 0, the one that writes the run dir).
The worker side joins the process group with `distributed_timeout`, logs its rank, and leaves a
per-step heartbeat in the rendezvous store, so that a rank whose collective fails can name the
rank that stopped.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

from ftkit.errors import UserError

DEFAULT_PORT = 29500
_HEARTBEAT = "ftkit/heartbeat/{}"


@dataclass(frozen=True)
class Launch:
    """How many processes, on how many machines, and where node 0 listens."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def needs_launcher(self) -> bool:
        return self.world_size > 1

    @property
    def is_node0(self) -> bool:
        return self.node_rank == 0

    def check(self) -> None:
        """Bad multi-node options are usage errors, before anything starts."""
        if self.nnodes < 1:
            raise UserError(f"--nnodes {self.nnodes}: needs at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank}: must be between 0 and --nnodes - 1 "
                            f"({self.nnodes - 1}); node 0 is the one that --master-addr names")
        if self.nnodes > 1 and not self.master_addr:
            raise UserError(f"--nnodes {self.nnodes}: every node needs --master-addr HOST, the address of node 0 "
                            "(the same on every node), e.g. --master-addr 10.0.0.1")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise UserError(f"--master-port {self.master_port}: a TCP port is 1-65535")

    def torchrun_args(self, rendezvous_timeout_s: int) -> list[str]:
        if self.nnodes == 1 and not self.master_addr:
            return ["--standalone", f"--nproc_per_node={self.nproc}"]
        # Static rendezvous: ranks follow --node-rank, so node 0 runs global rank 0 (it writes the run dir);
        # c10d's dynamic rendezvous would give rank 0 to whichever node joins first.
        return [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}", f"--nproc_per_node={self.nproc}",
                "--rdzv_backend=static", f"--master_addr={self.master_addr}",
                f"--master_port={self.master_port or DEFAULT_PORT}", "--rdzv_conf",
                f"timeout={rendezvous_timeout_s}"]


# --------------------------------------------------------------------------- the worker side


def rank_info() -> dict:
    env = os.environ
    return {"rank": int(env.get("RANK", "0")), "world_size": int(env.get("WORLD_SIZE", "1")),
            "local_rank": int(env.get("LOCAL_RANK", "0")), "node": int(env.get("GROUP_RANK", "0")),
            "host": socket.gethostname(), "pid": os.getpid()}


def describe_rank(info: dict) -> str:
    return f"rank {info['rank']} (on {info['host']}, node {info['node']}, pid {info['pid']})"


def join(timeout_s: int, device: str) -> None:
    """Join the process group before the Trainer does, so our timeout holds (transformers passes
    ddp_timeout to NCCL only; a gloo group would wait 30 minutes). Every rank says who it is."""
    import datetime

    import torch.distributed as dist

    info = rank_info()
    # One write per line: the ranks share the terminal, and print() writes the text and its newline apart.
    sys.stderr.write(f"{describe_rank(info)} of {info['world_size']} · local rank {info['local_rank']}\n")
    sys.stderr.flush()
    if device == "cpu" and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001  (no store: nothing to diagnose with)
        return None


def heartbeat_callback():
    """A TrainerCallback that records, per rank, the last finished step and when, in the rendezvous store."""
    from transformers import TrainerCallback

    info = rank_info()

    class Heartbeat(TrainerCallback):
        def _beat(self, step: int) -> None:
            store = _store()
            if store is not None:
                store.set(_HEARTBEAT.format(info["rank"]),
                          f"{step} {time.time():.3f} {info['host']} {info['node']} {info['pid']}")

        def on_train_begin(self, args, state, control, **kw):
            self._beat(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self._beat(state.global_step)

    return Heartbeat()


def heartbeats(world_size: int) -> dict[int, dict]:
    """rank -> {step, age_s, host, node, pid} for the ranks that have beaten at least once."""
    store = _store()
    out: dict[int, dict] = {}
    if store is None:
        return out
    for rank in range(world_size):
        key = _HEARTBEAT.format(rank)
        try:
            if not store.check([key]):
                continue
            step, t, host, node, pid = store.get(key).decode().split()
        except Exception:  # noqa: BLE001  (the store's host may be gone too)
            continue
        out[rank] = {"rank": rank, "step": int(step), "age_s": time.time() - float(t), "host": host,
                     "node": int(node), "pid": int(pid)}
    return out


_COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                        "gloo", "nccl", "socket")


def diagnose(exc: BaseException, timeout_s: int) -> str | None:
    """For an error raised by a collective (a peer died or hung): which rank stopped, and where.
    None when exc is not that kind of error."""
    import torch.distributed as dist

    text = f"{type(exc).__name__}: {exc}".lower()
    backend_error = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(k in text for k in _COLLECTIVE_FAILURES))
    if not backend_error:
        return None
    me = rank_info()
    beats = heartbeats(me["world_size"])
    others = [b for r, b in beats.items() if r != me["rank"]]
    missing = [r for r in range(me["world_size"]) if r != me["rank"] and r not in beats]
    what = "timed out" if "timed out" in str(exc).lower() else "lost its connection to a rank"
    head = f"{describe_rank(me)}: a collective {what} (distributed_timeout {timeout_s} s)"
    if missing:
        return f"{head}; rank(s) {', '.join(map(str, missing))} never reached training"
    if not others:
        return head
    # The rank that stopped is the one behind: lowest step, then longest silent.
    late = min(others, key=lambda b: (b["step"], -b["age_s"]))
    mine = beats.get(me["rank"], {}).get("step")
    return (f"{head}; rank {late['rank']} (on {late['host']}, node {late['node']}, pid {late['pid']}) stopped "
            f"after step {late['step']} and has been silent for {late['age_s']:.0f} s"
            + (f" (this rank finished step {mine})" if mine is not None else ""))
