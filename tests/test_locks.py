"""One writer per output: a second run into a live run's dir is refused (exit 2) and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ci_helpers import recipe
from conftest import CHAT_ROWS, ftkit

from ftkit.atomic import publish, staged_dir
from ftkit.locks import OutputLocked, lock_output, lock_path

HOLDER = ("import sys, time\n"
          "from ftkit.locks import lock_output\n"
          "lock_output(sys.argv[1], wait='--wait' in sys.argv)\n"
          "print('locked', flush=True)\n"
          "time.sleep(float(sys.argv[2]))\n")


def _holder(out: Path, seconds: float = 60, *extra: str) -> subprocess.Popen:
    """Another process that takes the lock on `out` and keeps it for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(OutputLocked) as info:
            lock_output(out, what="output.dir")
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "-c" in msg
        assert "--overwrite does not replace" in msg
        with pytest.raises(OutputLocked):  # merge/export/conversion destinations are guarded the same way
            with staged_dir(out):
                pass
        assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock"]  # the refused writer left nothing
    finally:
        proc.kill()
        proc.wait()


def test_sigkilled_holder_leaves_no_stuck_lock_only_a_noted_record(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # the dead run's record is still there
    notes = []
    lock = lock_output(out, log=notes.append)
    try:
        assert lock.stale["pid"] == proc.pid
        assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "gone" in notes[0]
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not lock_path(out).exists()  # a clean release leaves no file and so no stale note next time


def test_waiting_writer_takes_its_turn(tmp_path):
    """The model conversion cache waits for another conversion instead of failing."""
    out = tmp_path / "model"
    first = _holder(out, 1.5)
    t0 = time.monotonic()
    notes = []
    with staged_dir(out, wait=True, log=notes.append) as tmp:
        waited = time.monotonic() - t0
        (tmp / "config.json").write_text("{}")
        publish(tmp, out)
    first.wait()
    assert waited > 0.5 and any("waiting for" in n for n in notes)
    assert (out / "config.json").is_file() and not lock_path(out).exists()


def test_publish_renames_old_aside_and_restores_it_on_failure(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("new")
    publish(new, final)
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OSError):
        publish(tmp_path / "missing", final)  # the new output cannot go in: the old one must stay
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_writer_are_swept_under_the_lock(tmp_path):
    out = tmp_path / "merged"
    for name in (".merged.tmp-abc123xy", ".merged.old-4242", ".merged2.tmp-abc123xy", "merged.partial"):
        (tmp_path / name).mkdir()
    with staged_dir(out) as tmp:
        (tmp / "w").write_text("1")
        publish(tmp, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged2.tmp-abc123xy", "merged", "merged.partial"]


def test_cli_second_run_into_a_live_run_exits_2_and_the_live_run_keeps_its_files(tmp_path, tiny_model):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    r = recipe(tmp_path / "r.yaml", tiny_model, data, train={"max_steps": 100000, "batch_size": 2})
    out, metrics = tmp_path / "run", tmp_path / "run.partial" / "metrics.jsonl"
    live = subprocess.Popen([sys.executable, "-m", "ftkit", "sft", str(r)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        t0 = time.monotonic()
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            assert live.poll() is None, live.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 300, "the live run never started training"
            time.sleep(0.05)
        for extra in ((), ("--overwrite",)):
            res = ftkit("sft", str(r), "--output", str(out), *extra)
            assert res.returncode == 2, res.stderr
            assert f"pid {live.pid}" in res.stderr and socket.gethostname() in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
        size, t0 = metrics.stat().st_size, time.monotonic()
        while metrics.stat().st_size == size:  # the live run goes on logging steps, its files untouched
            assert live.poll() is None, live.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 60, "the live run stopped logging"
            time.sleep(0.05)
        assert not out.exists()
    finally:
        live.kill()
        live.wait()
