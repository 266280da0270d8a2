"""`ftkit pipeline`: references between stages, validation up front, skipping finished stages,
stopping at the first failure with its exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ftkit
from ftkit.errors import UserError
from ftkit.pipeline import load_pipeline, run_pipeline
from test_rlhf import pairs, write_jsonl

LORA = {"type": "lora", "r": 4, "alpha": 8}
TRAIN = {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-3}


def write_pipeline(tmp_path: Path, stages: dict, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "runs"), "stages": stages}, sort_keys=False),
                    encoding="utf-8")
    return path


def sft_stage(model, data) -> dict:
    return {"recipe": {"stage": "sft", "model": {"name": str(model)}, "method": LORA,
                       "data": {"train": str(data), "max_length": 48}, "train": TRAIN}}


def rm_stage(model, data, **data_extra) -> dict:
    return {"recipe": {"stage": "rm", "model": {"name": str(model)}, "method": LORA,
                       "data": {"train": str(data), "max_length": 48, **data_extra}, "train": TRAIN}}


def test_references_resolve_to_earlier_outputs(tmp_path, chat_file):
    pref = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    recipe_file = tmp_path / "dpo.yaml"
    recipe_file.write_text(yaml.safe_dump({"stage": "dpo", "data": {"train": str(pref)}}), encoding="utf-8")
    path = write_pipeline(tmp_path, {
        "sft": sft_stage("smollm2-135m-instruct", chat_file),
        "pref": {"recipe": str(recipe_file), "set": {"model.name": "${sft.output}", "train.max_steps": 7}},
        "rl": {"recipe": {"stage": "rl", "model": {"name": "${pref.output}"}, "data": {"train": str(pref)},
                          "rl": {"reward_model": "${sft.output}/../rm-made-elsewhere"}}},
    })
    with pytest.raises(UserError) as exc:  # rl.reward_model is not produced by any stage and does not exist
        load_pipeline(str(path))
    assert "stage rl" in str(exc.value) and "rl.reward_model: not a directory" in str(exc.value)

    doc = yaml.safe_load(path.read_text())
    doc["stages"]["rl"]["recipe"]["rl"] = {"rewards": [{"type": "length", "target_chars": 10}]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    stages, root = load_pipeline(str(path))
    sft, pref_stage, rl = stages
    assert sft.output == str(tmp_path / "runs" / "sft")
    assert pref_stage.recipe.model.name == sft.output and pref_stage.recipe.train.max_steps == 7
    assert pref_stage.recipe.stage == "dpo" and pref_stage.recipe.output.dir == str(tmp_path / "runs" / "pref")
    assert rl.recipe.model.name == pref_stage.output
    # Errors in a `set:` value point at the pipeline file's line.
    assert pref_stage.recipe.where("train", "max_steps").startswith(f"{path}:")


@pytest.mark.parametrize("ref,needle", [
    ("${nope.output}", "no earlier stage named 'nope'"),
    ("${rm.output}", "stage 'rm' runs later"),
    ("${sft.dir}", "only ${STAGE.output} references"),
])
def test_bad_references_exit_2(ref, needle, tmp_path, chat_file):
    pref = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    path = write_pipeline(tmp_path, {
        "sft": sft_stage("smollm2-135m-instruct", chat_file),
        "dpo": {"recipe": {"stage": "dpo", "model": {"name": ref}, "data": {"train": str(pref)}}},
        "rm": rm_stage("smollm2-135m-instruct", pref),
    })
    res = ftkit("pipeline", str(path))
    assert res.returncode == 2 and needle in res.stderr and f"{path}:" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()


def test_every_stage_is_validated_before_the_first_runs(tmp_path, chat_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    path = write_pipeline(tmp_path, {
        "sft": sft_stage("smollm2-135m-instruct", chat_file),
        "rm": rm_stage("smollm2-135m-instruct", bad),
    })
    res = ftkit("pipeline", str(path))
    assert res.returncode == 2, res.stderr
    assert "stage rm" in res.stderr and f"{bad}:2: missing column 'rejected'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "sft").exists()  # nothing ran


def test_skips_finished_stages_and_stops_at_the_first_failure(tmp_path, tiny_model, chat_file):
    pref = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    stages = {
        "sft": sft_stage(tiny_model, chat_file),
        "rm": rm_stage(tiny_model, pref),
        # Every pair is longer than 9 tokens, so TRL keeps none: a failure found only at run time.
        "rm2": rm_stage(tiny_model, pref, max_length=9),
        "never": rm_stage(tiny_model, pref),
    }
    path = write_pipeline(tmp_path, stages)
    runs = tmp_path / "runs"

    assert run_pipeline(str(path)) == 2
    assert (runs / "sft" / "metrics.json").is_file() and (runs / "rm" / "metrics.json").is_file()
    assert not (runs / "rm2").exists() and not (runs / "never").exists()
    summary = json.loads((runs / "pipeline.json").read_text())
    assert [s["status"] for s in summary] == ["ran", "ran", "failed (exit 2)"]
    stamp = {n: (runs / n / "metrics.json").stat().st_mtime_ns for n in ("sft", "rm")}

    res = ftkit("pipeline", str(path))  # the same failure again, through the CLI: its exit code
    assert res.returncode == 2 and "stage rm2" in res.stderr, res.stderr
    assert [s["status"] for s in json.loads((runs / "pipeline.json").read_text())] == \
        ["skipped", "skipped", "failed (exit 2)"]

    # Fix the failing stage; the finished ones stay untouched and the rest runs.
    stages["rm2"] = rm_stage(tiny_model, pref, max_length=48)
    write_pipeline(tmp_path, stages)
    assert run_pipeline(str(path)) == 0
    assert [s["status"] for s in json.loads((runs / "pipeline.json").read_text())] == \
        ["skipped", "skipped", "ran", "ran"]
    assert {n: (runs / n / "metrics.json").stat().st_mtime_ns for n in ("sft", "rm")} == stamp

    # A changed recipe is not "finished": that stage and every later one re-run.
    stages["rm"]["recipe"]["train"] = {**TRAIN, "learning_rate": 2e-3}
    write_pipeline(tmp_path, stages)
    stages_loaded, _ = load_pipeline(str(path))
    from ftkit.pipeline import finished

    assert [finished(s) for s in stages_loaded] == [True, False, True, True]


def test_a_failed_rm_gate_stops_the_pipeline_with_exit_3(tmp_path, tiny_model):
    pref = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    rm = rm_stage(tiny_model, pref)
    rm["recipe"]["gates"] = [{"fail_if": "steps < 100"}]
    dpo = {"recipe": {"stage": "dpo", "model": {"name": str(tiny_model)}, "method": LORA,
                      "data": {"train": str(pref), "max_length": 48}, "train": TRAIN}}
    path = write_pipeline(tmp_path, {"rm": rm, "dpo": dpo})
    runs = tmp_path / "runs"
    res = ftkit("pipeline", str(path))
    assert res.returncode == 3, res.stderr
    assert "gate failed" in res.stderr and "stage rm" in res.stderr and "steps < 100" in res.stderr
    assert (runs / "rm" / "metrics.json").is_file() and not (runs / "dpo").exists()
    assert [s["status"] for s in json.loads((runs / "pipeline.json").read_text())] == ["failed (exit 3)"]
    # A rerun skips the finished rm run but checks its gate again: still stopped before dpo.
    assert run_pipeline(str(path)) == 3 and not (runs / "dpo").exists()
