"""Recipe and run-dir helpers shared by the CI tests (test_ci*, test_resume, test_ddp)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import write_recipe


# The tiny-model recipe writer is conftest's; CI tests import it under this name.
recipe = write_recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def wait_for(pred, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll until pred() holds while a training subprocess runs; fail if it ends or times out first."""
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before the interruption point:\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the interruption point")
        time.sleep(0.005)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popen_ftkit(*args: str) -> subprocess.Popen:
    """The real CLI in the background (this checkout's ftkit), stdout and stderr piped as text."""
    import os
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "ftkit", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
