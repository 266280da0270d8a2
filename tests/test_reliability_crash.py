"""Crash and full disk in the middle of a write: the destination is absent or complete, never half-written."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def _capped(limit: int):
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG
    return cap


@pytest.mark.parametrize("cmd", ["merge-lora", "export"])
def test_full_disk_is_exit_2_naming_the_path_and_leaves_nothing(tmp_path, adapter, tiny_model, cmd):
    out = tmp_path / "out"
    args = ([str(adapter), "--output", str(out)] if cmd == "merge-lora" else
            [str(tiny_model), "--format", "safetensors", "--quantize", "f16", "--output", str(out)])
    res = subprocess.run([sys.executable, "-m", "ftkit", cmd, *args], capture_output=True, text=True, timeout=300,
                         preexec_fn=_capped(1 << 20), env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"out of disk space writing {out}" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp dir, no lock file
    res = subprocess.run([sys.executable, "-m", "ftkit", cmd, *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]  # once there is room, a rerun succeeds
    assert (out / "config.json").is_file()


def test_kill_9_at_every_write_leaves_each_destination_absent_or_complete(tmp_path):
    """A few of scripts/crash_writes.py's kills per write kind (the script runs many): merge-lora and export
    outputs, a training checkpoint and the run dir's final rename are absent or complete after SIGKILL,
    the checkpoint --resume would pick loads, no lock is left stuck, and a rerun succeeds."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "crash_writes.py"
    res = subprocess.run([sys.executable, str(script), "--runs", "2", "--train-runs", "1", "--seed", "1",
                          "--work", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    assert lines[-1]["kills"] == {"merge-lora": 2, "export": 2, "checkpoint": 1, "rename": 1}, lines
    assert all(r["ok"] for r in lines[:-1]), lines
