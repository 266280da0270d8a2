"""Past one process: a rank killed mid-run, a hung rank, bad multi-node options, a node 0 that never comes,
and the strategy checks that run before loading. Two "nodes" (torchrun agents on 127.0.0.1) are in
test_ddp.py, beside the one-process run they are compared with."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from ci_helpers import free_port, popen_ftkit, recipe
from conftest import CHAT_ROWS, ftkit

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    path = tmp / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    return tmp, path


def _collect(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []
    proc.reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    proc.reader.start()
    return lines


def test_a_killed_rank_ends_the_job_and_is_named(data, tiny_model):
    tmp, path = data
    r = recipe(tmp / "kill.yaml", tiny_model, path, train={"max_steps": 100000, "batch_size": 2},
               output={"dir": str(tmp / "kill")})
    proc, lines, pid = _start_and_find_rank1(tmp, r)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
    took = time.time() - t0
    proc.reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 1, err
    assert f"error: rank 1 (on {socket.gethostname()}, node 0, pid {pid}) was killed by SIGKILL" in err
    assert took < 15, f"the job took {took:.1f}s to end after rank 1 died"
    assert not (tmp / "kill").exists(), "no run dir under the final name"


def _start_and_find_rank1(tmp: Path, r: Path, *extra: str):
    """Start a 2-process run; return (proc, stderr lines, rank 1's pid) once training is under way."""
    proc = popen_ftkit("sft", str(r), "-n", "2", *extra)
    lines = _collect(proc)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = re.search(r"rank 1 \(on [^(),\n]+, node 0, pid (\d+)\)", "".join(lines))
        if found and (tmp / f"{r.stem}.partial" / "metrics.jsonl").is_file():
            return proc, lines, int(found.group(1))
        time.sleep(0.2)
    proc.kill()
    pytest.fail("training never started:\n" + "".join(lines))


def test_a_hung_rank_is_named_within_the_timeout(data, tiny_model):
    tmp, path = data
    r = recipe(tmp / "hang.yaml", tiny_model, path, train={"max_steps": 100000, "batch_size": 2},
               output={"dir": str(tmp / "hang")}, distributed_timeout=5)
    proc, lines, pid = _start_and_find_rank1(tmp, r)
    os.kill(pid, signal.SIGSTOP)  # alive but silent: what a deadlocked rank looks like to the others
    t0 = time.time()
    try:
        while time.time() - t0 < 60 and "a collective timed out" not in "".join(lines):
            time.sleep(0.2)
        took = time.time() - t0
    finally:
        os.kill(pid, signal.SIGKILL)  # spare torchrun's 30 s grace for the stopped rank
        proc.wait(timeout=60)
    proc.reader.join(timeout=10)
    err = "".join(lines)
    assert re.search(rf"error: rank 0 \(on [^()\n]+\): a collective timed out \(distributed_timeout 5 s\); rank 1 "
                     rf"\(on [^()\n]+, node 0, pid {pid}\) stopped after step \d+", err), err
    assert took < 5 + 15, f"named after {took:.1f}s with distributed_timeout 5"
    assert proc.returncode == 1


@pytest.mark.parametrize("args, message", [
    (("--nnodes", "2"), "every node needs --master-addr HOST"),
    (("--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"), "--node-rank 2: must be between 0 and"),
    (("--node-rank", "1"), "--node-rank 1: must be between 0 and --nnodes - 1 (0)"),
    (("--nnodes", "2", "--master-addr", "h", "--master-port", "70000"), "a TCP port is 1-65535"),
])
def test_bad_multinode_options_exit_2(data, tiny_model, args, message):
    tmp, path = data
    r = recipe(tmp / "opts.yaml", tiny_model, path, output={"dir": str(tmp / "opts")})
    res = ftkit("sft", str(r), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_node0_never_answers(data, tiny_model):
    tmp, path = data
    r = recipe(tmp / "alone.yaml", tiny_model, path, output={"dir": str(tmp / "alone")}, distributed_timeout=2)
    port = free_port()
    res = ftkit("sft", str(r), "-n", "1", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                "--master-port", str(port))
    assert res.returncode == 1
    assert f"error: node 1 could not join node 0 at 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr and "frame #" not in res.stderr


IMPOSSIBLE = [
    ({"distributed": "fsdp", "method": {"type": "qlora", "r": 4, "alpha": 8}},
     "distributed: fsdp with method.type: qlora needs CUDA GPUs"),
    ({"distributed": "deepspeed"}, "distributed: deepspeed needs CUDA GPUs"),
    ({"distributed": "fsdp", "method": {"type": "qlora", "bits": 8, "r": 4, "alpha": 8}},
     "8-bit weights cannot be sharded"),
]


def test_an_impossible_strategy_exits_2_before_any_worker_starts(data, tiny_model):
    tmp, path = data
    sections, message = IMPOSSIBLE[0]
    r = recipe(tmp / "strategy.yaml", tiny_model, path, output={"dir": str(tmp / "strategy")}, **sections)
    res = ftkit("sft", str(r), "-n", "2")
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "strategy.yaml:" in res.stderr and "Traceback" not in res.stderr
    assert "rank 0" not in res.stderr, "refused before any worker started"


@pytest.mark.parametrize("sections, message", IMPOSSIBLE)
def test_impossible_strategies_are_refused(data, tiny_model, sections, message):
    """The check the command above runs (lifecycle.check, before loading), for every combination."""
    from ftkit.distributed_strategy import check
    from ftkit.errors import UserError
    from ftkit.recipe import load_recipe

    tmp, path = data
    r = load_recipe(recipe(tmp / "strategy.yaml", tiny_model, path, **sections))
    with pytest.raises(UserError, match=re.escape(message)) as err:
        check(r, 2, "cpu")
    assert "strategy.yaml:" in str(err.value)


def test_fsdp_qlora_settings(data, tiny_model, monkeypatch):
    from ftkit.distributed_strategy import fsdp_config, sharded_load
    from ftkit.methods import quantization_kwargs
    from ftkit.recipe import load_recipe

    for key in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.setenv(key, "unset-by-test")  # restored after the test, whatever sharded_load sets
    tmp, path = data
    r = load_recipe(recipe(tmp / "fq.yaml", tiny_model, path, distributed="fsdp",
                           method={"type": "qlora", "r": 4, "alpha": 8}))
    kwargs = quantization_kwargs(4, "bfloat16", "cuda")
    one = sharded_load(r, dict(kwargs), world_size=1)
    assert one["device_map"] == {"": 0}, "one process keeps its own placement"
    out = sharded_load(r, kwargs, world_size=2)
    q = out["quantization_config"]
    import torch

    assert q.bnb_4bit_quant_storage == q.bnb_4bit_compute_dtype == torch.bfloat16
    assert "device_map" not in out
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and os.environ["ACCELERATE_USE_FSDP"] == "true"
    assert fsdp_config(r)["cpu_ram_efficient_loading"] is True and fsdp_config(r)["fsdp_version"] == 2
