"""Every bad-data message through the real CLI: exit 2, one clear message, no traceback, no model loaded."""

from __future__ import annotations

import json

import pytest
from conftest import ftkit, write_recipe

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _check(tmp_path, name: str, body: str, **data):
    f = tmp_path / name
    f.write_text(body, encoding="utf-8")
    # A model path that does not exist: any attempt to load it would fail differently, so exit 2 with the
    # data message proves the data was checked before any model was touched.
    recipe = write_recipe(tmp_path / "r.yaml", "org/not-a-cached-model", f, data=data)
    res = ftkit("data", "check", str(recipe))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return " ".join(res.stderr.split())  # rich wraps long lines


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    msg = _check(tmp_path, "d.jsonl", _jsonl(GOOD, GOOD) + '{"messages": [oops\n')
    assert "d.jsonl:3" in msg and "not valid JSON" in msg


def test_missing_column_names_it_and_the_existing_ones(tmp_path):
    msg = _check(tmp_path, "d.jsonl", _jsonl({"instruction": "a", "answer": "b"}), format="alpaca")
    assert "missing column 'output'" in msg and "answer, instruction" in msg and "d.jsonl:1" in msg


def test_partial_column_mapping_never_keyerrors(tmp_path):
    # instruction mapped, output left to its default name, which the rows do not have
    msg = _check(tmp_path, "d.jsonl", _jsonl({"q": "a", "a": "b"}), format="alpaca", columns={"instruction": "q"})
    assert "missing column 'output'" in msg and "KeyError" not in msg


def test_mapping_a_column_the_format_does_not_read(tmp_path):
    msg = _check(tmp_path, "d.jsonl", _jsonl(GOOD), format="messages", columns={"instruction": "q"})
    assert "'instruction'" in msg and "does not read" in msg


def test_empty_file(tmp_path):
    assert "empty" in _check(tmp_path, "d.jsonl", "")


def test_blank_lines_only_is_empty(tmp_path):
    assert "empty" in _check(tmp_path, "d.jsonl", "\n\n")


def test_unknown_role(tmp_path):
    row = {"messages": [{"role": "patient", "content": "ow"}, {"role": "assistant", "content": "hm"}]}
    msg = _check(tmp_path, "d.jsonl", _jsonl(GOOD, row))
    assert "d.jsonl:2" in msg and "unknown role 'patient'" in msg and "data.roles" in msg


def test_no_assistant_turn(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}]}
    msg = _check(tmp_path, "d.jsonl", _jsonl(row))
    assert "d.jsonl:1" in msg and "no assistant turn" in msg


@pytest.mark.parametrize("content", [None, 42, ["a"]])
def test_non_string_content(tmp_path, content):
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
    msg = _check(tmp_path, "d.jsonl", _jsonl(row))
    assert "turn 1 content must be a string" in msg and "d.jsonl:1" in msg


def test_auto_format_with_unknown_columns(tmp_path):
    msg = _check(tmp_path, "d.jsonl", _jsonl({"foo": 1}))
    assert "match no format" in msg and "foo" in msg


def test_hub_dataset_offline_is_a_clear_message(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "org/not-a-cached-model", tmp_path / "x.jsonl",
                          data={"train": "someorg/not-a-real-dataset-xyz"})
    res = ftkit("data", "check", str(recipe))
    msg = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "someorg/not-a-real-dataset-xyz" in msg and "hub dataset" in msg and "Offline" in msg


def test_bad_role_mapping_target_is_a_recipe_error(tmp_path):
    msg = _check(tmp_path, "d.jsonl", _jsonl(GOOD), roles={"doctor": "physician"})
    assert "r.yaml:" in msg and "data.roles" in msg
