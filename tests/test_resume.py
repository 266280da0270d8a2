"""Checkpoints and resume: a killed run continues where its last checkpoint left off, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ci_helpers import adapter_tensors, max_abs_diff, read_jsonl, recipe, wait_for
from conftest import CHAT_ROWS, ftkit

STEPS = 12
TRAIN = {"max_steps": STEPS, "save_steps": 2, "save_total_limit": 2, "deterministic": True, "batch_size": 2}
OUT = {"samples": 0}  # no sample replies: nothing here reads them, and every run here would pay for them


def _data(tmp: Path) -> Path:
    p = tmp / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    return p


def _start(r: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ftkit", "sft", str(r), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The same recipe run without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    r = recipe(tmp / "r.yaml", tiny_model, _data(tmp), train=TRAIN, output=OUT)
    res = ftkit("sft", str(r))
    assert res.returncode == 0, res.stderr
    return tmp / "run"


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_model, reference):
    r = recipe(tmp_path / "r.yaml", tiny_model, _data(tmp_path), train=TRAIN, output={**OUT, "keep_checkpoints": True})
    partial = tmp_path / "run.partial"
    proc = _start(r)
    from ftkit.resume import is_complete

    # Complete, not merely present: a kill while trainer_state.json is being written leaves checkpoint-4
    # unusable, and --resume rightly falls back to checkpoint-2.
    wait_for(lambda: is_complete(partial / "checkpoints" / "checkpoint-4"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run").exists() and partial.is_dir()

    res = ftkit("sft", str(r))  # without --resume the interrupted run is not silently thrown away
    assert res.returncode == 2 and "--resume" in res.stderr
    assert "loading" not in res.stdout + res.stderr, "said before the model loads"

    res = ftkit("sft", str(r), "--resume")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert 4 <= m["resumed_from_step"] < STEPS, "the kill came too late to test a resume"
    assert m["steps"] == STEPS
    assert "resuming from" in res.stdout and f"step {m['resumed_from_step']}" in res.stdout
    steps = [h["step"] for h in read_jsonl(run / "metrics.jsonl") if h["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), "the step count continues, and each step is logged once"
    # Same final weights as the uninterrupted run: the data order and RNG continued too.
    assert max_abs_diff(adapter_tensors(run), adapter_tensors(reference)) <= 1e-6
    ref_losses = [h["loss"] for h in read_jsonl(reference / "metrics.jsonl") if h["kind"] == "train"]
    losses = [h["loss"] for h in read_jsonl(run / "metrics.jsonl") if h["kind"] == "train"]
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    # The numbers are as true as an uninterrupted run's: the first loss is step 1's, not the resumed
    # step's, and tokens/s counts only the tokens this process trained on.
    ref = json.loads((reference / "metrics.json").read_text())
    assert m["first_loss"] == pytest.approx(ref["first_loss"], abs=1e-6) and m["tokens"] == ref["tokens"]
    at_resume = [h["tokens_seen"] for h in read_jsonl(run / "metrics.jsonl")
                 if h["kind"] == "train" and h["step"] == m["resumed_from_step"]][0]
    assert 0 < at_resume < m["tokens"]
    assert m["tokens_per_s"] * m["wall_s"] == pytest.approx(m["tokens"] - at_resume, rel=0.02)
    assert not (reference / "checkpoints").exists(), "a finished run drops its checkpoints by default"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert kept == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"]  # save_total_limit: 2


def test_sigterm_saves_checkpoint_exits_130_then_resume_path(tmp_path, tiny_model, reference):
    train = {**TRAIN, "save_steps": None}  # no periodic checkpoints: the signal alone must produce one
    r = recipe(tmp_path / "r.yaml", tiny_model, _data(tmp_path), train=train, output=OUT)
    log = tmp_path / "run.partial" / "metrics.jsonl"
    proc = _start(r, "--json")
    wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    hint = [line for line in err.splitlines() if "resume with:" in line]
    assert len(hint) == 1 and hint[0].endswith(f"ftkit sft {r} --json --resume"), err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    ckpt = tmp_path / "run.partial" / "checkpoints" / f"checkpoint-{summary['step']}"
    assert (ckpt / "trainer_state.json").is_file()
    assert not (tmp_path / "run").exists()

    res = ftkit("sft", str(r), f"--resume={ckpt}")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["resumed_from_step"] == summary["step"] and m["steps"] == STEPS
    assert max_abs_diff(adapter_tensors(tmp_path / "run"), adapter_tensors(reference)) <= 1e-6


def test_deterministic_same_recipe_same_weights(tmp_path, tiny_model, reference):
    r = recipe(tmp_path / "r.yaml", tiny_model, _data(tmp_path), train=TRAIN, output={**OUT, "keep_checkpoints": True})
    assert ftkit("sft", str(r)).returncode == 0
    a, b = adapter_tensors(tmp_path / "run"), adapter_tensors(reference)
    assert all(bool((a[k] == b[k]).all()) for k in a), "deterministic runs must be bit-identical"
    init = adapter_tensors(tmp_path / "run" / "checkpoints" / f"checkpoint-{STEPS}")
    assert max_abs_diff(a, init) == 0.0  # the final adapter is the last step's weights
    r2 = recipe(tmp_path / "r2.yaml", tiny_model, _data(tmp_path), train={**TRAIN, "seed": 7},
                output={**OUT, "dir": str(tmp_path / "run7")})
    assert ftkit("sft", str(r2)).returncode == 0
    assert max_abs_diff(adapter_tensors(tmp_path / "run7"), b) > 1e-4  # the seed matters, so the test can fail
