"""`ftkit bench`: a few timed steps and a projection for the whole run, leaving nothing behind."""

import json

from conftest import ftkit, write_recipe

from ftkit.hardware import detect


def test_bench_projects_the_whole_run(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, train={"epochs": 3})
    res = ftkit("bench", str(recipe), "--steps", "3", "--set", "train.max_steps=null", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["timed_steps"] == 3 and out["precision"] == detect().dtype
    assert out["total_steps"] == 9  # 12 rows / batch 4 = 3 steps per epoch, 3 epochs
    assert out["seconds_per_step"] > 0 and out["tokens_per_s"] > 0 and out["peak_memory_mb"] > 0
    assert abs(out["projected_s"] - 9 * out["seconds_per_step"]) < 0.1
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_bench_refuses_other_stages(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, stage="rm")
    res = ftkit("bench", str(recipe))
    assert res.returncode == 2 and "bench times sft and pt" in res.stderr and "Traceback" not in res.stderr
