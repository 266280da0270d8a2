"""rm, dpo, kto, orpo and rl stages: a few steps each on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ftkit
from ftkit.recipe import load_recipe

POS = ["great", "wonderful", "excellent", "lovely", "superb", "charming"]
NEG = ["terrible", "awful", "broken", "boring", "horrible", "dreadful"]
ITEMS = ["the lamp", "this cafe", "the movie", "my phone", "the hotel", "this book", "the bus", "the park"]


def pairs(n: int = 16, messages: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        item = ITEMS[i % len(ITEMS)]
        prompt, good, bad = f"Review {item}.", f"It is {POS[i % 6]}.", f"It is {NEG[i % 6]}."
        if messages:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def stage_recipe(tmp_path: Path, stage: str, model, data_file: Path, **sections) -> Path:
    recipe = {
        "stage": stage,
        "model": {"name": str(model)},
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data_file), "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "output": {"dir": str(tmp_path / f"run-{stage}")},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_stage(path: Path) -> Path:
    from ftkit.stages.lifecycle import run

    return run(load_recipe(path))


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def assert_run_dir(run: Path, stage: str) -> None:
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "recipe.yaml",
              "metrics.json"):
        assert (run / f).is_file(), f
    assert yaml.safe_load((run / "recipe.yaml").read_text())["stage"] == stage
    assert not Path(f"{run}.partial").exists()


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("rm")
    train = write_jsonl(tmp / "pairs.jsonl", pairs(16))
    evald = write_jsonl(tmp / "eval.jsonl", pairs(8, messages=True))
    path = stage_recipe(tmp, "rm", tiny_model, train, data={"eval": str(evald)},
                        train={"max_steps": 3, "learning_rate": 5e-3})
    return run_stage(path)


def test_rm_reports_pairwise_accuracy_before_and_after(rm_run):
    assert_run_dir(rm_run, "rm")
    m = metrics(rm_run)
    assert m["accuracy_measured_on"] == "eval pairs" and m["eval_pairs"] == 8
    for key in ("pairwise_accuracy_before", "pairwise_accuracy_after"):
        assert 0.0 <= m[key] <= 1.0
    assert m["mean_margin_before"] != m["mean_margin_after"]  # training moved the scores
    assert json.loads((rm_run / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_score_cli_and_merged_reward_model_agree(rm_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ftkit.reward_model import load_reward_model, score

    # float32 on every CPU: the comparison below is to 1e-3, finer than bf16's rounding of a score.
    res = ftkit("score", str(rm_run), "--prompt", "Review the lamp.", "-r", "It is great.", "-r", "It is awful.",
                "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["It is great.", "It is awful."]
    cli_scores = [float(line.split("\t")[0]) for line in lines]

    merged = tmp_path / "rm-merged"
    res = ftkit("merge-lora", str(rm_run), "-o", str(merged))
    assert res.returncode == 0, res.stderr
    model = AutoModelForSequenceClassification.from_pretrained(merged)  # plain transformers, no peft
    assert model.config.num_labels == 1
    m, tok = load_reward_model(str(merged))
    merged_scores = score(m, tok, [("Review the lamp.", "It is great."), ("Review the lamp.", "It is awful.")])
    assert merged_scores == pytest.approx(cli_scores, abs=1e-3)
    assert cli_scores[0] != cli_scores[1]


def test_generate_refuses_a_reward_model(rm_run):
    res = ftkit("generate", str(rm_run), "-p", "hi")
    assert res.returncode == 2 and "ftkit score" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_pair_stages_report_reward_accuracy_and_margin(stage, tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", pairs(8, messages=stage == "orpo"))
    run = run_stage(stage_recipe(tmp_path, stage, tiny_model, train, data={"eval_split": 0.25}))
    assert_run_dir(run, stage)
    m = metrics(run)
    assert m["steps"] == 2 and m["eval_pairs"] == 2
    assert set(m["eval_after"]) >= {"reward_accuracy", "reward_margin"}
    assert m["train_reward_margin_last"] is not None


def test_kto_on_unpaired_rows_with_csv_labels(tiny_model, tmp_path):
    lines = ["prompt,completion,label"] + [f"Review {it}.,It is {POS[i % 6]}.,{'true' if i % 2 else 'false'}"
                                           for i, it in enumerate(ITEMS)]
    train = tmp_path / "unpaired.csv"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = run_stage(stage_recipe(tmp_path, "kto", tiny_model, train))
    assert_run_dir(run, "kto")
    assert metrics(run)["steps"] == 2


def test_dpo_from_sft_run_folds_adapters_and_generates(tiny_model, tmp_path, chat_file):
    from conftest import write_recipe

    sft_recipe = write_recipe(tmp_path / "sft.yaml", tiny_model, chat_file)
    res = ftkit("sft", str(sft_recipe))
    assert res.returncode == 0, res.stderr
    sft_run = tmp_path / "run"
    train = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    run = run_stage(stage_recipe(tmp_path, "dpo", sft_run, train, method={"r": 2, "alpha": 4}))
    m = metrics(run)
    assert m["started_from"]["rank_saved"] == 4 + 2
    assert m["base_model"] == str(tiny_model)
    assert m["reference_model"].startswith("the starting run")
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["base_model_name_or_path"] == str(tiny_model)
    res = ftkit("generate", str(run), "-p", "hi", "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr


REWARD_MODULE = '''
def exclaim(completions, **kwargs):
    text = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    assert kwargs["topic"], "extra prompt columns reach reward functions"
    return [float(t.count("!")) for t in text]
'''


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rl_with_reward_model_builtin_and_python_rewards(algorithm, rm_run, tiny_model, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE, encoding="utf-8")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review {it}.", "topic": it} for it in ITEMS])
    rl = {"algorithm": algorithm, "reward_model": str(rm_run), "num_generations": 2, "max_completion_length": 6,
          "rewards": [{"type": "length", "target_chars": 20}, {"type": "format", "pattern": "!", "weight": 0.5},
                      {"type": "function", "function": "my_rewards:exclaim", "weight": 0.1}]}
    run = run_stage(stage_recipe(tmp_path, "rl", tiny_model, prompts, rl=rl))
    assert_run_dir(run, "rl")
    m = metrics(run)
    assert m["algorithm"] == algorithm and len(m["reward_by_step"]) == 2
    assert set(m["rewards"]) == {"reward_model", "length", "format", "exclaim"}
    assert m["rewards"]["format"]["weight"] == 0.5


# ---------------------------------------------------------------------------- bad input: exit 2, file:line


def _bad(tmp_path, stage, rows_text: str, suffix=".jsonl", **sections):
    data = tmp_path / f"bad{suffix}"
    data.write_text(rows_text, encoding="utf-8")
    path = stage_recipe(tmp_path, stage, "/nonexistent-model-never-loaded", data, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["name"] = "smollm2-135m-instruct"  # data errors come before any model loads
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return ftkit(stage, str(path)), data


@pytest.mark.parametrize("stage,text,needle", [
    ("dpo", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', ":2: missing column 'rejected'"),
    ("rm", '{"prompt": "a", "chosen": "b", "rejected": "b"}\n', ":1: chosen and rejected are identical"),
    ("orpo", '{"prompt": "a", "chosen": 5, "rejected": "c"}\n', ":1: 'chosen' must be a string or a non-empty list"),
    ("dpo", '{"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "c"}\n',
     ":1: 'chosen' must end with an assistant message"),
    ("kto", '{"prompt": "a", "completion": "b", "label": "maybe"}\n', ":1: 'label' must be true or false"),
    ("rl", '{"prompt": "a"}\n{"question": "b"}\n', ":2: missing column 'prompt'"),
])
def test_bad_preference_data_exit_2_with_file_line(stage, text, needle, tmp_path):
    extra = {"rl": {"rewards": [{"type": "length", "target_chars": 10}], "num_generations": 2}} if stage == "rl" else {}
    res, data = _bad(tmp_path, stage, text, **extra)
    assert res.returncode == 2, res.stderr
    assert f"{data}{needle}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / f"run-{stage}").exists() and not (tmp_path / f"run-{stage}.partial").exists()


def test_wrong_format_for_stage_is_exit_2(tmp_path):
    res, _ = _bad(tmp_path, "dpo", '{"messages": [{"role": "user", "content": "a"}]}\n', data={"format": "messages"})
    assert res.returncode == 2 and "data.format: stage dpo reads preference rows" in res.stderr


@pytest.mark.parametrize("rl,needle", [
    ({}, "rl: no reward"),
    ({"rewards": [{"type": "format", "pattern": "("}]}, "pattern is not a valid regex"),
    ({"rewards": [{"type": "length"}]}, "a length reward needs target_chars"),
    ({"rewards": [{"type": "function", "function": "no_such_module_xyz:f"}]}, "cannot import 'no_such_module_xyz'"),
    ({"reward_model": "/nonexistent/rm"}, "rl.reward_model: not a directory"),
    ({"rewards": [{"type": "length", "target_chars": 5}], "num_generations": 3}, "must be a multiple of"),
    ({"algorithm": "ppo"}, "rl.algorithm: must be one of: 'grpo' or 'rloo'"),
])
def test_bad_rl_recipes_exit_2(rl, needle, tmp_path):
    res, _ = _bad(tmp_path, "rl", '{"prompt": "a"}\n', rl=rl)
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
