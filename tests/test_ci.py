"""CI ergonomics: gates (exit 3), --json, metrics files, reports, eval, robustness messages."""

from __future__ import annotations

import json
import re

import pytest
from ci_helpers import read_jsonl, recipe
from conftest import ftkit

from ftkit.errors import GateFailed, UserError

# ----------------------------------------------------------------------------- units (no model)


def test_gate_parse_and_check():
    from ftkit.gates import check
    from ftkit.recipe import parse_gate

    assert parse_gate("eval_loss > 1.2") == ("eval_loss", ">", 1.2)
    assert parse_gate("data.train.kept>=-3") == ("data.train.kept", ">=", -3.0)
    for bad in ("eval_loss", "eval_loss > high", "> 1", "eval loss > 1"):
        with pytest.raises(ValueError):
            parse_gate(bad)
    metrics = {"eval_loss": 1.5, "steps": 10, "data": {"train": {"kept": 7}}}
    ok = check(metrics, ["eval_loss > 2", "data.train.kept < 5"])
    assert [r["failed"] for r in ok] == [False, False]
    with pytest.raises(GateFailed) as exc:
        check(metrics, ["eval_loss > 1.2", "steps < 5"])
    assert "eval_loss > 1.2" in str(exc.value) and "1.5" in str(exc.value) and "steps" not in str(exc.value)
    with pytest.raises(GateFailed) as exc:  # a gate on a metric the run lacks fails rather than passing silently
        check(metrics, ["exact_match < 0.5"])
    assert "not recorded" in str(exc.value)


def test_recipe_gates_are_validated_with_file_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  train: x.jsonl\ngates:\n  - fail_if: eval_loss >> 2\n", encoding="utf-8")
    res = ftkit("validate", str(p))
    assert res.returncode == 2
    assert f"{p}:4" in res.stderr and "METRIC OP NUMBER" in res.stderr
    p.write_text("distributed: mpi\n", encoding="utf-8")
    res = ftkit("validate", str(p))
    assert res.returncode == 2 and "distributed" in res.stderr


def test_worker_args_and_resume_command():
    from ftkit.launch import worker_args
    from ftkit.resume import resume_command

    argv = ["sft", "r.yaml", "--num-processes", "2", "--json", "--fail-if", "eval_loss > 1", "-s", "train.seed=1",
            "--fail-if=steps < 2", "-n", "4", "--overwrite"]
    assert worker_args(argv) == ["sft", "r.yaml", "-s", "train.seed=1", "--overwrite"]
    assert resume_command(["sft", "r.yaml", "--overwrite", "-n", "2"]) == "ftkit sft r.yaml -n 2 --resume"
    assert resume_command(["sft", "r.yaml", "--resume", "/x/checkpoint-4"]) == "ftkit sft r.yaml --resume"


def test_checkpoint_lookup_skips_incomplete_and_trims_log(tmp_path):
    from ftkit.resume import latest_checkpoint, resolve_resume, trim_metrics_log

    ck = tmp_path / "checkpoints"
    for step, complete in ((2, True), (10, True), (12, False)):  # 12 was cut short by a kill
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"  # numeric order, not text order
    assert resolve_resume("latest", tmp_path).name == "checkpoint-10"
    assert resolve_resume("latest", tmp_path / "nowhere") is None
    with pytest.raises(UserError, match="incomplete"):
        resolve_resume(str(ck / "checkpoint-12"), tmp_path)
    with pytest.raises(UserError, match="no such"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 14)) + '{"step": 14, "lo')
    trim_metrics_log(log, 10)
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, 11))


def test_oom_message_names_the_memory_knobs(tmp_path):
    import torch

    from ftkit.recipe import load_recipe
    from ftkit.stages.common import explain_oom

    p = tmp_path / "r.yaml"
    p.write_text("train:\n  batch_size: 16\n", encoding="utf-8")
    r = load_recipe(p)
    with pytest.raises(UserError) as exc, explain_oom(r):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(exc.value)
    for knob in ("train.batch_size=16", f"{p}:2", "grad_accum", "data.max_length", "activation_checkpointing", "QLoRA"):
        assert knob in msg


def test_report_from_metrics(tmp_path):
    from ftkit.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    hist = [{"step": s, "kind": "train", "loss": 3.0 - 0.1 * s, "learning_rate": 1e-3 * (1 - s / 10)} for s in range(1, 9)]
    hist.insert(4, {"step": 4, "kind": "eval", "eval_loss": 2.9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    (run / "metrics.json").write_text(json.dumps({"train_loss": 2.5, "steps": 8}))
    (run / "recipe.yaml").write_text("train:\n  learning_rate: 0.001\n")
    (run / "samples.jsonl").write_text(json.dumps({"prompt": "2+2?", "reference": "4", "generated": "<4>"}) + "\n")
    png, page = write_report(run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = page.read_text()
    assert "data:image/png;base64," in text and "learning_rate: 0.001" in text and "&lt;4&gt;" in text
    curves = json.loads(re.search(r'<script type="application/json" id="curves">(.*?)</script>', text, re.S).group(1))
    assert curves["loss"]["step"] == list(range(1, 9))
    assert curves["loss"]["value"] == [h["loss"] for h in hist if "loss" in h]
    assert curves["eval_loss"] == {"step": [4], "value": [2.9]}
    assert curves["learning_rate"]["value"][0] == pytest.approx(9e-4)
    res = ftkit("report", str(tmp_path / "nope"))
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr


def test_unwritable_output_is_a_clear_error(tmp_path, tiny_model, chat_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = recipe(tmp_path / "r.yaml", tiny_model, chat_file, output={"dir": str(blocker / "run")})
    res = ftkit("sft", str(r), "--json")
    assert res.returncode == 2, res.stderr
    assert "cannot write under" in res.stderr and "Traceback" not in res.stderr
    assert blocker.read_text() == "not a folder"
    assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "error"


# ----------------------------------------------------------------------------- one real (tiny) training run


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, tiny_model):
    from conftest import CHAT_ROWS

    tmp = tmp_path_factory.mktemp("gated")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    r = recipe(tmp / "r.yaml", tiny_model, data, data={"eval_split": 0.25}, train={"max_steps": 4},
               gates=[{"fail_if": "steps < 1"}])
    # A random tiny model has eval_loss ~10.8: '< 1000' holds, so the gate fails.
    res = ftkit("sft", str(r), "--json", "--fail-if", "eval_loss < 1000", "--fail-if", "train_loss > 1e9")
    return tmp, data, res


def test_gate_failure_exits_3_with_values_and_json(gated_run):
    tmp, _, res = gated_run
    assert res.returncode == 3, res.stderr
    assert "gate failed" in res.stderr and "eval_loss < 1000" in res.stderr
    value = float(re.search(r"eval_loss < 1000 \(value: ([0-9.]+)", res.stderr).group(1))
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, "with --json, stdout holds only the summary line"
    summary = json.loads(lines[0])
    assert summary["status"] == "gate_failed" and summary["exit_code"] == 3
    assert summary["metrics"]["eval_loss"] == pytest.approx(value)
    assert [g["failed"] for g in summary["gates"]] == [True, False, False]  # CLI gates, then the recipe's
    assert (tmp / "run" / "adapter_model.safetensors").is_file(), "a failed gate keeps the finished run dir"


def test_metrics_files_schema(gated_run):
    tmp, _, _ = gated_run
    run = tmp / "run"
    m = json.loads((run / "metrics.json").read_text())
    for key, typ in (("train_loss", float), ("eval_loss", float), ("steps", int), ("world_size", int),
                     ("global_batch_size", int), ("tokens", int), ("wall_s", float), ("versions", dict)):
        assert isinstance(m[key], typ), key
    assert m["steps"] == 4 and m["world_size"] == 1 and m["resumed_from_step"] is None
    log = read_jsonl(run / "metrics.jsonl")
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"step", "epoch", "elapsed_s", "tokens_seen", "loss", "learning_rate", "grad_norm"} <= r.keys()
    assert train[-1]["loss"] == pytest.approx(m["last_loss"])
    assert any(r["kind"] == "eval" and "eval_loss" in r for r in log)
    kinds = [r["kind"] for r in log]
    assert kinds.count("summary") == 1 and kinds.index("summary") > max(i for i, k in enumerate(kinds) if k == "train")
    assert not (tmp / "run.partial").exists()


def test_report_written_at_end_of_run(gated_run):
    tmp, _, _ = gated_run
    run = tmp / "run"
    assert (run / "report.png").stat().st_size > 5000
    page = (run / "report.html").read_text()
    curves = json.loads(re.search(r'id="curves">(.*?)</script>', page, re.S).group(1))
    assert curves["loss"]["value"] == [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and {"prompt", "reference", "generated"} <= samples[0].keys()


def test_eval_command_on_run_and_base(gated_run, tiny_model):
    tmp, data, _ = gated_run
    res = ftkit("eval", str(tmp / "run"), "--data", str(data), "--max-new-tokens", "4", "--limit", "4",
                "--regex", r"(\d+)", "--json", "--output", str(tmp / "eval.json"))
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout.strip().splitlines()[-1])["metrics"]
    assert s["rows"] == 4 and 5 < s["eval_loss"] < 20
    assert s["perplexity"] == pytest.approx(2.718281828 ** s["eval_loss"], rel=1e-6)
    assert 0 <= s["exact_match"] <= 1 and 0 <= s["regex"] <= 1  # --regex implies --metric regex
    assert len(json.loads((tmp / "eval.json").read_text())["samples"]) == 4
    # every reply metric by name, and gates on them (rouge_l is at most 1, so this gate always fails)
    res = ftkit("eval", str(tmp / "run"), "--data", str(data), "--max-new-tokens", "4", "--limit", "4",
                "--metric", "rouge_l", "--metric", "accuracy", "--metric", "macro_f1", "--json",
                "--fail-if", "rouge_l < 2")
    assert res.returncode == 3 and "rouge_l < 2" in res.stderr, res.stderr
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["status"] == "gate_failed" and line["gates"][0]["metric"] == "rouge_l"
    assert all(0 <= line["metrics"][m] <= 1 for m in ("rouge_l", "accuracy", "macro_f1"))
    assert "exact_match" not in line["metrics"]
    bad = ftkit("eval", str(tmp / "run"), "--data", str(data), "--metric", "regex")
    assert bad.returncode == 2 and "--metric regex needs --regex" in bad.stderr
    bad = ftkit("eval", str(tmp / "run"), "--data", str(data), "--metric", "bleu")
    assert bad.returncode == 2 and "'bleu' is not one of 'exact_match', 'regex', 'accuracy'" in bad.stderr
    # the base model before training: usable as a baseline, and gates apply to eval too
    res = ftkit("eval", str(tiny_model), "--data", str(data), "--no-generate", "--fail-if", "perplexity > 10")
    assert res.returncode == 3, res.stderr
    assert "perplexity > 10" in res.stderr
