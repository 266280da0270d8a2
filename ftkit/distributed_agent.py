"""torchrun, run in-process (`python -m ftkit.distributed_agent TORCHRUN-ARGS`), so that a failed
worker comes back as data: which rank, its pid, exit code or signal. The launcher reads that file and
prints one line naming the rank instead of torchrun's multi-screen traceback."""

from __future__ import annotations

import json
import os
import socket
import sys

FAILURE_ENV = "FTKIT_FAILURE_FILE"


def _failures(exc) -> list[dict]:
    out = []
    for rank, f in exc.failures.items():
        sig = f.signal_name() if f.exitcode < 0 else None
        out.append({"rank": rank, "local_rank": f.local_rank, "pid": f.pid, "exitcode": f.exitcode,
                    "signal": sig, "timestamp": f.timestamp, "host": socket.gethostname(),
                    "node": int(os.environ.get("FTKIT_NODE_RANK", "0"))})
    # The cause comes first: a rank killed by a signal, then one that exited with an error. SIGTERM is last:
    # it is what the agent sends the surviving ranks once one has failed.
    return sorted(out, key=lambda d: (d["signal"] == "SIGTERM", d["signal"] is None, d["timestamp"], d["rank"]))


def _write(record: dict) -> None:
    path = os.environ.get(FAILURE_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(record, fh)


def main(argv: list[str]) -> int:
    # The agent's own C++ retries would print stack dumps before our one-line message; the workers,
    # started from the restored environment, keep torch's usual logging.
    previous = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch  # noqa: F401

    if previous is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = previous
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        _write({"failures": _failures(exc)})
        return 1
    except (RendezvousError, RuntimeError, TimeoutError) as exc:
        # Static rendezvous: node 0 never answered (wrong --master-addr/--master-port, firewall, not started).
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _write({"rendezvous": f"{type(exc).__name__}: {first[:300]}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
