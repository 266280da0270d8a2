"""Speed levers: switchable in the recipe, refused clearly where they cannot run, and the fast
paths learn what the plain path learns (same losses on the same batches)."""

from __future__ import annotations

import json

import pytest
from conftest import ftkit, write_recipe

from ftkit import speed
from ftkit.hardware import Hardware
from ftkit.recipe import Recipe

GPU = Hardware("cuda", "test GPU", "bfloat16", "test", 1, 1)
CPU = Hardware("cpu", "test CPU", "float32", "test", 2, 0)


def test_auto_batch_size_starts_from_a_token_budget_on_gpus_and_is_fixed_on_cpus():
    def resolved(hw, max_length, **train):
        r = Recipe(data={"max_length": max_length}, train={"batch_size": "auto", **train})
        return speed.batch_size(r, hw), speed.speed_kwargs(r, hw, "llama")["auto_find_batch_size"]

    assert resolved(GPU, 2048) == (32, True)  # 64k tokens of 2048-token rows; shrinks by 10% on each out-of-memory
    assert resolved(GPU, 3000) == (16, True)  # a power of two at or under the budget
    assert resolved(GPU, 200_000) == (1, True)
    assert resolved(CPU, 2048) == (speed.AUTO_BATCH_CPU, False)
    fixed = Recipe(train={"batch_size": 6})
    assert speed.batch_size(fixed, GPU) == 6 and not speed.speed_kwargs(fixed, GPU, "llama")["auto_find_batch_size"]


def test_liger_auto_stays_off_without_a_gpu_or_the_package():
    r = Recipe()
    assert speed.speed_kwargs(r, CPU, "llama")["use_liger_kernel"] is False
    assert speed.speed_kwargs(Recipe(train={"liger": False}), GPU, "llama")["use_liger_kernel"] is False


def test_levers_are_refused_for_stages_they_do_not_apply_to(tmp_path):
    for field, value in (("batch_size", "auto"), ("liger", True), ("compile", True)):
        p = tmp_path / f"{field}.yaml"
        p.write_text(f"stage: dpo\nmodel: {{name: x}}\ndata: {{train: a.jsonl}}\ntrain:\n  {field}: {str(value).lower()}\n")
        res = ftkit("validate", str(p))
        assert res.returncode == 2, res.stderr
        assert f"{p}:5: train.{field}" in res.stderr and "Traceback" not in res.stderr


def test_liger_true_on_a_cpu_is_exit_2_before_the_model_loads(tmp_path, tiny_model, chat_file, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU run, also on a machine that has a GPU
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, train={"liger": True})
    res = ftkit("sft", str(recipe))
    assert res.returncode == 2, res.stderr
    assert f"{recipe}:" in res.stderr and "train.liger: true needs a CUDA GPU" in res.stderr
    assert "Traceback" not in res.stderr and "trainable params" not in res.stderr + res.stdout
    assert not (tmp_path / "run").exists()


def _losses(run_dir):
    return [h["loss"] for h in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in h]


def test_torch_compile_and_auto_batch_learn_what_the_plain_path_learns(tmp_path, tiny_model, chat_file):
    """train.compile: true (inductor on this CPU) and batch_size: auto give the same per-step losses."""
    plain = write_recipe(tmp_path / "plain.yaml", tiny_model, chat_file, output={"dir": str(tmp_path / "plain")})
    fast = write_recipe(tmp_path / "fast.yaml", tiny_model, chat_file, output={"dir": str(tmp_path / "fast")},
                        train={"compile": True, "batch_size": "auto"})
    for r in (plain, fast):
        res = ftkit("sft", str(r), "--no-cache")
        assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert {k: metrics["speed"][k] for k in ("liger", "compile", "auto_batch")} == {
        "liger": False, "compile": True, "auto_batch": False}
    assert metrics["batch_size"] == speed.AUTO_BATCH_CPU == 4  # the same batches as the plain recipe
    want, got = _losses(tmp_path / "plain"), _losses(tmp_path / "fast")
    assert len(want) == len(got) == 3
    assert got[0] == pytest.approx(want[0], rel=1e-6)  # the same batch through the same weights
    # Later steps follow updates from fused (reordered) gradient arithmetic: close, not bitwise.
    assert got == pytest.approx(want, rel=1e-3)

