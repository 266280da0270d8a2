"""Each command words its fixes in its own flags: eval and data convert map columns with --column/--role,
never with a recipe key they do not read; recipes keep data.columns."""

import json

from conftest import ftkit

QA = "question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n"


def _cli(*args):
    from typer.testing import CliRunner

    from ftkit.cli import app

    return CliRunner().invoke(app, list(args))


def test_eval_maps_csv_columns_with_column_flags(tmp_path, tiny_model):
    data = tmp_path / "qa.csv"
    data.write_text(QA, encoding="utf-8")
    out = tmp_path / "eval.json"
    res = ftkit("eval", str(tiny_model), "--data", str(data), "--column", "instruction=question",
                "--column", "output=answer", "--max-new-tokens", "2", "--output", str(out))
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    assert "eval_loss" in got and [s["reference"] for s in got["samples"]] == ["4", "Paris"], got


def test_eval_without_column_names_the_flag_not_the_recipe_key(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text(QA, encoding="utf-8")
    res = _cli("eval", "unused-model", "--data", str(data))
    assert res.exit_code == 2, res.output
    msg = " ".join(res.output.split())
    assert "qa.csv:2" in msg and "--column instruction=question --column output=answer" in msg, msg
    assert "--format" in msg and "data.columns" not in msg and "data.format" not in msg, msg
    res = _cli("eval", "unused-model", "--data", str(data), "--format", "alpaca", "--column", "output=answer")
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and "--column instruction=<name>" in msg and "data.columns" not in msg, msg
    res = _cli("eval", "unused-model", "--data", str(data), "--column", "answer")
    assert res.exit_code == 2 and "--column 'answer': expected name=value" in res.output, res.output


def test_data_convert_errors_name_its_flags(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text(QA, encoding="utf-8")
    out = tmp_path / "o.jsonl"
    res = _cli("data", "convert", str(data), "--to", "messages", "-o", str(out))
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and "--from" in msg and "--column instruction=question" in msg, msg
    assert "data.columns" not in msg and not out.exists(), msg
    res = _cli("data", "convert", str(data), "--to", "messages", "-o", str(out), "--from", "alpaca",
               "--column", "bogus=question")
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and "--column maps 'bogus'" in msg and "data.columns" not in msg, msg
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "patient", "content": "hi"},
                                             {"role": "doctor", "content": "hello"}]}) + "\n", encoding="utf-8")
    res = _cli("data", "convert", str(chat), "--to", "sharegpt", "-o", str(out))
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and "--role patient=assistant" in msg and "data.roles" not in msg, msg
    res = _cli("data", "convert", str(data), "--to", "messages", "-o", str(out),
               "--column", "instruction=question", "--column", "output=answer")
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text().splitlines()[1])["messages"][1]["content"] == "Paris"
