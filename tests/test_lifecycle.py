"""One lifecycle for every stage: a SIGKILLed run resumes to the weights of an uninterrupted one, --json
prints one line, gates exit 3, -n 2 really runs two ranks, and an emptied training set is exit 2.
(sft's resume is covered in depth by test_resume.py; this file covers the other stages.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ci_helpers import adapter_tensors, max_abs_diff, wait_for
from conftest import ftkit
from test_rlhf import ITEMS, POS, pairs, write_jsonl

from ftkit.errors import UserError
from ftkit.recipe import load_recipe

STEPS = 6
TRAIN = {"max_steps": STEPS, "save_steps": 2, "save_total_limit": 2, "deterministic": True, "batch_size": 2,
         "learning_rate": 1e-3, "logging_steps": 1}
METHOD = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}  # dropout draws would differ between ranks


def stage_data(tmp: Path, stage: str) -> tuple[Path, dict]:
    """A small training file for the stage, and the recipe sections it needs beyond the defaults."""
    if stage == "pt":
        rows = [{"text": f"{it.capitalize()} is {POS[i % 6]} and the day is long." * 2} for i, it in enumerate(ITEMS)]
        return write_jsonl(tmp / "text.jsonl", rows), {}
    if stage == "kto":
        rows = [{"prompt": f"Review {it}.", "completion": f"It is {POS[i % 6]}.", "label": bool(i % 2)}
                for i, it in enumerate(ITEMS)]
        return write_jsonl(tmp / "unpaired.jsonl", rows), {}
    if stage == "rl":
        rows = [{"prompt": f"Review {it}."} for it in ITEMS]
        rl = {"num_generations": 2, "max_completion_length": 4, "rewards": [{"type": "length", "target_chars": 12}]}
        return write_jsonl(tmp / "prompts.jsonl", rows), {"rl": rl}
    return write_jsonl(tmp / "pairs.jsonl", pairs(8)), {}


def write_stage_recipe(tmp: Path, stage: str, model, train: dict | None = None, data: dict | None = None,
                       name: str = "run") -> Path:
    data_file, extra = stage_data(tmp, stage)
    recipe = {"stage": stage, "model": {"name": str(model)}, "method": METHOD,
              "data": {"train": str(data_file), "max_length": 48, **(data or {})},
              "train": {**TRAIN, **(train or {})}, "output": {"dir": str(tmp / name)}, **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_in_process(path: Path) -> Path:
    from ftkit.stages.lifecycle import run

    return run(load_recipe(path))


def kill_after_first_checkpoint(stage: str, recipe: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", stage, str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    from ftkit.resume import is_complete

    ckpt = recipe.parent / "run.partial" / "checkpoints" / "checkpoint-2"
    wait_for(lambda: is_complete(ckpt), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["pt", "rm", "dpo", "kto", "orpo", "rl"])
def test_sigkill_then_resume_json_gate_matches_uninterrupted(stage, tmp_path, tiny_model):
    (tmp_path / "ref").mkdir()
    reference = run_in_process(write_stage_recipe(tmp_path / "ref", stage, tiny_model))
    recipe = write_stage_recipe(tmp_path, stage, tiny_model)
    kill_after_first_checkpoint(stage, recipe)
    assert not (tmp_path / "run").exists() and (tmp_path / "run.partial").is_dir()

    res = ftkit(stage, str(recipe), "--resume", "--json", "--fail-if", f"steps < {STEPS + 1}")
    assert res.returncode == 3, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    summary = json.loads(lines[0])
    assert summary["status"] == "gate_failed" and summary["exit_code"] == 3 and summary["command"] == stage
    assert summary["gates"][0]["value"] == STEPS
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 2 <= m["resumed_from_step"] < STEPS, "the kill came too late to test a resume"
    assert m["steps"] == STEPS and m["stage"] == stage
    diff = max_abs_diff(adapter_tensors(tmp_path / "run"), adapter_tensors(reference))
    assert diff <= 1e-6, f"{stage}: resumed weights differ from the uninterrupted run by {diff}"


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_two_processes_run_two_ranks(stage, tmp_path, tiny_model):
    recipe = write_stage_recipe(tmp_path, stage, tiny_model, train={"max_steps": 2, "save_steps": None})
    res = ftkit(stage, str(recipe), "-n", "2", "--json", "--fail-if", "world_size < 2")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["metrics"]["world_size"] == 2
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2 and m["distributed"] == "ddp"
    assert res.stderr.count("done in") == 1, "only rank 0 reports"


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto", "orpo", "rl"])
def test_training_set_emptied_by_max_length_is_bad_input(stage, tmp_path, tiny_model, chat_file):
    recipe = write_stage_recipe(tmp_path, stage, tiny_model, data={"max_length": 9})
    if stage == "sft":
        raw = yaml.safe_load(recipe.read_text())
        raw["data"]["train"] = str(chat_file)
        recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(UserError, match="max_length") as exc:
        run_in_process(recipe)
    assert f"{recipe}:" in str(exc.value), "the message points at the recipe line"
    assert not (tmp_path / "run").exists()


def test_half_written_trainer_state_is_not_resumed_from(tmp_path):
    from ftkit.resume import latest_checkpoint, resolve_resume

    ckpts = tmp_path / "run.partial" / "checkpoints"
    for step in (2, 4):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')  # killed mid-write
    assert latest_checkpoint(tmp_path / "run.partial") == ckpts / "checkpoint-2"
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(str(ckpts / "checkpoint-4"), tmp_path / "run.partial")


def test_emptied_training_set_exits_2_on_the_command_line(tmp_path, tiny_model):
    recipe = write_stage_recipe(tmp_path, "dpo", tiny_model, data={"max_length": 9})
    res = ftkit("dpo", str(recipe), "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["exit_code"] == 2
