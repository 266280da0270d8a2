"""A newcomer's first commands: init anywhere, validate that reads the data, preview any language, plain flags."""

import json

import pytest
import yaml

from conftest import ftkit

STAGES = ["sft", "pt", "rm", "dpo", "kto", "orpo", "rl"]


def _cli(*args):
    """In-process CLI (the subprocess start-up would dominate this loop)."""
    from typer.testing import CliRunner

    from ftkit.cli import app

    return CliRunner().invoke(app, list(args))


def test_init_outside_the_repo_writes_a_recipe_that_validates_for_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for stage in STAGES:
        res = _cli("init", f"{stage}.yaml", "--stage", stage)
        assert res.exit_code == 0, res.output
        text = (tmp_path / f"{stage}.yaml").read_text()
        assert text.startswith("#") and f"stage: {stage}" in text
        recipe = yaml.safe_load(text)
        assert set(recipe) <= {"stage", "model", "method", "data", "train", "preference", "rl"}
        if stage not in ("rl",):
            assert "rl" not in recipe
        assert (tmp_path / recipe["data"]["train"]).is_file()
        # validated from another directory: the data path is relative to the recipe
        monkeypatch.chdir(tmp_path.parent)
        res = _cli("validate", str(tmp_path / f"{stage}.yaml"))
        monkeypatch.chdir(tmp_path)
        assert res.exit_code == 0, (stage, res.output)
    res = ftkit("validate", "sft.yaml", cwd=tmp_path)  # and once as a user runs it
    assert res.returncode == 0, res.stderr


def test_init_refuses_to_overwrite_and_checks_its_train_file(tmp_path):
    assert ftkit("init", "r.yaml", cwd=tmp_path).returncode == 0
    res = ftkit("init", "r.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    res = ftkit("init", "s.yaml", "--train", "nope.jsonl", cwd=tmp_path)
    assert res.returncode == 2 and "--train nope.jsonl" in res.stderr and not (tmp_path / "s.yaml").exists()
    (tmp_path / "mine.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                  {"role": "assistant", "content": "b"}]}) + "\n")
    res = ftkit("init", "t.yaml", "--train", "mine.jsonl", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((tmp_path / "t.yaml").read_text())["data"]["train"] == "mine.jsonl"
    assert not (tmp_path / "t_data.jsonl").exists()


def _csv_recipe(tmp_path, columns=None):
    (tmp_path / "qa.csv").write_text("question,answer\nWhat about returns?,Within 30 days.\n", encoding="utf-8")
    data = {"train": "qa.csv"}
    if columns:
        data["columns"] = columns
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"stage": "sft", "data": data}, sort_keys=False), encoding="utf-8")
    return p


def test_validate_reads_the_first_rows_and_names_the_problem(tmp_path):
    res = ftkit("validate", str(_csv_recipe(tmp_path)))
    assert res.returncode == 2 and "qa.csv:2" in res.stderr and "match no format" in res.stderr
    p = _csv_recipe(tmp_path, {"instruction": "question", "output": "answr"})
    res = ftkit("validate", str(p))
    assert res.returncode == 2, res.stderr
    flat = " ".join(res.stderr.split())
    assert f"{p}:6: data.columns.output: 'answr' is not a column of qa.csv" in flat, flat
    assert "Traceback" not in res.stderr


def test_validate_prints_one_ok_line_and_the_recipe_only_when_asked(tmp_path):
    p = _csv_recipe(tmp_path, {"instruction": "question", "output": "answer"})
    res = ftkit("validate", str(p))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert "qa.csv (alpaca)" in res.stderr
    res = ftkit("validate", str(p), "--print")
    assert res.returncode == 0 and yaml.safe_load(res.stdout)["data"]["columns"] == {"instruction": "question",
                                                                                      "output": "answer"}


def test_flags_show_no_value_and_completion_is_offered():
    res = ftkit("sft", "--help")
    assert res.returncode == 0 and "--overwrite" in res.stdout and "<bool>" not in res.stdout
    assert "--install-completion" in ftkit("--help").stdout


@pytest.mark.parametrize("text", ["这是一个中文句子，测试完成。", "Crème brûlée à Köln 🎉👍🏽", "日本語のテキスト"])
def test_preview_spans_decode_like_the_file(embedded_dir, text):
    from transformers import AutoTokenizer

    from ftkit.commands.data import labelled_spans

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # every split point of the labels, so runs end inside multi-byte characters too
    for cut in range(1, len(ids)):
        labels = [-100] * cut + ids[cut:]
        spans = labelled_spans(tok, ids, labels, -100)
        assert "".join(p for p, _ in spans) == text
        assert all("\ufffd" not in p for p, _ in spans)


def _qa_recipe(tmp_path, keep=None):
    (tmp_path / "qa.csv").write_text("question,answer\nWhat about returns?,\nWhat about shipping?,Two days.\n"
                                     "What about shipping?,Two days.\nHow?,   \nWhy?,Because.\n", encoding="utf-8")
    data = {"train": "qa.csv", "columns": {"instruction": "question", "output": "answer"}}
    if keep is not None:
        data["keep_empty_replies"] = keep
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"stage": "sft", "data": data}, sort_keys=False), encoding="utf-8")
    return p


def test_empty_replies_are_dropped_and_named_duplicates_counted(tmp_path):
    from ftkit.data import load_canonical
    from ftkit.recipe import load_recipe

    canon = load_canonical(load_recipe(_qa_recipe(tmp_path)))
    assert len(canon.train) == 3
    assert [w.split("/")[-1] for w in canon.screened.empty] == ["qa.csv:2", "qa.csv:5"]
    assert [w.split("/")[-1] for w in canon.screened.duplicates] == ["qa.csv:4"]
    kept = load_canonical(load_recipe(_qa_recipe(tmp_path, keep=True)))
    assert len(kept.train) == 5 and kept.screened.dropped == 0


def test_data_check_reports_empty_replies_with_file_line(tmp_path, embedded_dir):
    res = ftkit("data", "check", str(_qa_recipe(tmp_path)), "--set", f"model.name={embedded_dir}", "--no-cache")
    assert res.returncode == 0, res.stderr
    flat = " ".join((res.stdout + res.stderr).split())
    assert "2 rows have an empty reply, dropped" in flat and "qa.csv:2" in flat and "qa.csv:5" in flat
    assert "1 rows repeat an earlier row exactly" in flat and "qa.csv:4" in flat


def test_set_method_type_drops_the_files_fields_that_no_longer_apply(tmp_path, chat_file):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"method": {"type": "lora", "r": 8, "alpha": 16}, "data": {"train": str(chat_file)}}))
    res = _cli("validate", str(p), "--set", "method.type=prefix", "--print")
    assert res.exit_code == 0, res.output
    assert "do not apply to prefix: alpha, r" in " ".join(res.output.split())
    res = _cli("validate", str(p), "--set", "method.type=prefix", "--set", "method.r=4")
    assert res.exit_code == 2 and "method.r" in res.output  # asked for on the command line: still checked


def test_published_outputs_take_the_users_umask(tmp_path):
    import os

    from ftkit.atomic import publish, staged_dir

    final = tmp_path / "out"
    old = os.umask(0o027)
    try:
        with staged_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "model.safetensors").chmod(0o600)  # as transformers writes it
            publish(tmp, final)
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o750
    assert (final / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_a_captured_log_shows_a_live_job_and_every_phase(tmp_path, tiny_model, chat_file):
    """Without a terminal: plain progress lines, a line per phase, bounded samples, the whole
    command's time beside the training time, and no checkpoints left in the finished run dir."""
    import os
    import subprocess
    import sys

    from conftest import write_recipe

    r = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file,
                     output={"samples": 1, "sample_tokens": 4}, train={"save_steps": 1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FTKIT_PROGRESS_EVERY": "0"}
    res = subprocess.run([sys.executable, "-m", "ftkit", "sft", str(r)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for step in (1, 2, 3):
        assert f"train step {step}/3 · loss " in out, out
    assert "ETA 0:00:00" in out and "━" not in out  # plain lines, no bar drawn into the log
    order = [out.index(s) for s in ("loading ", "train step 1/3 · loss", "saving ...", "sampling 1 replies (≤ 4 tokens",
                                    "done in ")]
    assert order == sorted(order), out
    done = next(line for line in out.splitlines() if line.startswith("done in "))
    assert "(training " in done
    run = tmp_path / "run"
    assert len((run / "samples.jsonl").read_text().splitlines()) == 1
    assert not (run / "checkpoints").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert m["total_s"] >= m["wall_s"] > 0
    # the lifecycle times its own phases; they happen inside the command, training among them
    assert m["phases_s"]["loading model and data"] > 0 and m["phases_s"]["training"] == pytest.approx(m["wall_s"], abs=0.5)
    assert sum(m["phases_s"].values()) <= m["total_s"] + 0.05
