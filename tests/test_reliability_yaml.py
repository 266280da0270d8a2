"""Hostile recipes, --set items and pipelines: every one ends in exit 2 with file:line, never a traceback.

Each case is a fuzz finding (issue 19) or its next of kin; fuzz/ runs the generators that found them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import ftkit

from ftkit.errors import UserError
from ftkit.recipe import load_recipe

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 10)}]\n" for i in range(1, 9))

BAD = {
    "self_alias": ("stage: sft\nmethod:\n  type: &a [*a]\n", ":3: an alias refers to a node that contains it"),
    "self_alias_map": ("stage: &s {x: *s}\n", ":1: an alias refers to a node that contains it"),
    "alias_bomb": (BOMB, "alias bomb"),
    "deep_nesting": ("data: " + "[" * 50000 + "\n", "nested more than 100 levels"),
    "deep_block_nesting": ("data:\n" + "".join(" " * i + "- \n" for i in range(0, 400, 2)), "nested more than 100"),
    "deep_via_aliases": ("a: &a " + "[" * 60 + "1" + "]" * 60 + "\nb: &b " + "[" * 60 + "*a" + "]" * 60 + "\n",
                         "nest more than 100 levels"),
    "bad_timestamp": ("stage: sft\ntrain:\n  seed: 2024-13-45\n", ":3: '2024-13-45' is not a valid value"),
    "huge_int": ("train:\n  max_steps: " + "9" * 30 + "\n", ":2: the integer 9999"),
    "huge_int_digits": ("train:\n  max_steps: " + "1" * 5000 + "\n", ":2: '1111"),
    "int_key": ("stage: sft\n1: x\n", ":2: the key '1' is read as int"),
    "bool_key": ("data:\n  columns:\n    yes: answer\n", ":3: the key 'yes' is read as bool"),
    "null_key": ("~: 1\n", "read as null"),
    "list_key": ("? [a]\n: b\n", "keys must be text"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_hostile_recipe_is_a_user_error_with_its_line(tmp_path, name):
    text, expected = BAD[name]
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        load_recipe(p)
    assert expected in str(info.value) and str(p) in str(info.value)
    assert time.monotonic() - t0 < 2


def test_non_utf8_recipe_names_the_byte(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"stage: sft\nmodel:\n  name: caf\xe9\n")
    with pytest.raises(UserError, match=r"r.yaml:3: not UTF-8 text \(byte 0xe9"):
        load_recipe(p)


@pytest.mark.parametrize("item,expected", [
    ("train.epochs=&a [*a]", "alias refers to a node that contains it"),
    ("data.columns={1: a}", "the key '1' is read as int"),
    ("train.max_steps=" + "7" * 40, "too large"),
    ("train.seed=2024-02-30", "is not a valid value"),
])
def test_hostile_set_items(item, expected):
    with pytest.raises(UserError, match="--set") as info:
        load_recipe(None, [item])
    assert expected in str(info.value)


def test_set_values_that_are_not_yaml_stay_text():
    r = load_recipe(None, ["stage=sft", "data.train=a: b: c.jsonl"])
    assert r.data.train == "a: b: c.jsonl"


def test_anchors_and_merges_still_work(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stage: sft\nmethod: &m {type: lora, r: 4}\ntrain:\n  <<: {epochs: 2}\n  seed: 3\n", encoding="utf-8")
    r = load_recipe(p)
    assert r.train.epochs == 2 and r.train.seed == 3 and r.method.r == 4


@pytest.mark.parametrize("name", ["self_alias", "alias_bomb", "int_key"])
def test_pipeline_files_are_bounded_too(tmp_path, name):
    from ftkit.pipeline import load_pipeline

    text, expected = BAD[name]
    p = tmp_path / "pipe.yaml"
    p.write_text("stages:\n  - name: one\n    recipe: r.yaml\n" + text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_pipeline(p)
    assert expected.split(":")[-1].strip() in str(info.value)


def test_cli_exit_2_without_traceback(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(BAD["self_alias"][0], encoding="utf-8")
    res = ftkit("validate", str(p))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "r.yaml:3" in res.stderr, res.stderr
    bad = Path(tmp_path / "bad.yaml")
    bad.write_bytes(b"stage: sft\n\xff\xfe\n")
    res = ftkit("validate", str(bad))
    assert res.returncode == 2 and "not UTF-8" in res.stderr and "Traceback" not in res.stderr, res.stderr
