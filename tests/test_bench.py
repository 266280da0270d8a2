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
    assert abs(out["projected_train_s"] - 9 * out["seconds_per_step"]) < 0.1
    # the whole command: training + the rest (loading, evaluation, samples, saving), each timed in the run
    phases = out["phases_s"]
    assert set(phases) == {"start-up (torch, hardware)", "loading model and data", "importing the trainer", "preparing the trainer", "evaluation",
                           "saving",
                           "samples and report", "other"}
    assert phases["loading model and data"] > 0 and phases["saving"] > 0 and phases["samples and report"] > 0
    assert abs(out["projected_rest_s"] - sum(phases.values())) < 0.2
    assert out["projected_s"] >= out["projected_train_s"] + phases["loading model and data"]
    assert abs(out["projected_s"] - out["projected_train_s"] - out["projected_rest_s"]) < 0.2
    # the bench itself is a run of the whole command: its phases and training fit inside its wall time
    assert sum(v for k, v in phases.items() if k != "other") + out["training_s"] <= out["command_s"] + 0.1
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_periodic_evaluation_is_counted_as_often_as_it_runs():
    from ftkit.commands.bench import project_rest, projection_line

    timed = {"start-up (torch, hardware)": 0.2, "loading model and data": 5.8, "importing the trainer": 1.0, "preparing the trainer": 3.0, "evaluation": 2.0, "saving": 1.0, "samples and report": 5.0,
             "training": 7.0}
    proj = {"seconds_per_step": 3.0, "timed_steps": 2, "total_steps": 100}
    once = project_rest(timed, 30.0, {"wall_s": 7.0}, proj)
    assert once["phases_s"] == {"start-up (torch, hardware)": 0.2, "loading model and data": 5.8, "importing the trainer": 1.0,
                                "preparing the trainer": 3.0, "evaluation": 2.0,
                                "saving": 1.0,
                                "samples and report": 5.0, "other": 6.0}  # 30 - 18 - 2 steps x 3 s
    assert once["projected_s"] == 300 + 24
    every = project_rest(timed, 30.0, {"wall_s": 7.0}, proj, evals_during_training=4)
    assert every["phases_s"]["evaluation"] == 10.0 and every["projected_s"] == 300 + 32
    line = projection_line({**proj, **once})
    assert line == ("projected: 5.4 min for the whole command = training 100 steps 5.0 min + the rest 24s "
                    "(loading model and data 6s + importing the trainer 1s + preparing the trainer 3s + evaluation 2s "
                    "+ saving 1s + samples and report 5s + other 6s)"), line


def test_bench_refuses_other_stages(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, stage="rm")
    res = ftkit("bench", str(recipe))
    assert res.returncode == 2 and "bench times sft and pt" in res.stderr and "Traceback" not in res.stderr
