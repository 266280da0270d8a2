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


@pytest.fixture(params=["libyaml", "pure_python"])
def parser(request, monkeypatch):
    """The limits hold over both parsers safe_yaml can use (libyaml where installed, else PyYAML's own)."""
    from ftkit import safe_yaml

    if request.param == "libyaml" and safe_yaml._CParser is None:
        pytest.skip("libyaml is not installed")
    monkeypatch.setattr(safe_yaml, "PURE_PYTHON", request.param == "pure_python")


@pytest.mark.parametrize("name", sorted(BAD))
def test_hostile_recipe_is_a_user_error_with_its_line(tmp_path, name, parser):
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
def test_hostile_set_items(item, expected, parser):
    with pytest.raises(UserError, match="--set") as info:
        load_recipe(None, [item])
    assert expected in str(info.value)


def test_set_values_that_are_not_yaml_stay_text(parser):
    r = load_recipe(None, ["stage=sft", "data.train=a: b: c.jsonl"])
    assert r.data.train == "a: b: c.jsonl"
    # Undecodable argv bytes arrive as lone surrogates; libyaml cannot even encode them (a fuzz finding).
    r = load_recipe(None, ["data.train=a\udcff.jsonl"])
    assert r.data.train == "a\udcff.jsonl"


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


# A run dir's recipe.yaml is read back by merge, export, serve, chat and push; a downloaded run dir
# may carry a hostile one. Each reader goes through the same bounded loader.
RUN_DIR_RECIPES = {
    "self_alias": (BAD["self_alias"][0], "alias refers to a node that contains it"),
    "alias_bomb": (BOMB, "alias bomb"),
    "not_a_mapping": ("- a\n- b\n", "expected a recipe (a mapping of sections), found list"),
    "section_not_a_mapping": ("model: [a, b]\n", "model: expected a mapping, found list"),
    "wrong_type": ("model:\n  name: 5\n", "model.name: expected str, found 5"),
    "bits_bool": ("method:\n  type: qlora\n  bits: true\n", "method.bits: expected int"),
    "not_utf8": ("model:\n  name: caf\udce9\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(RUN_DIR_RECIPES))
def test_hostile_run_dir_recipe_is_a_user_error(tmp_path, name):
    from ftkit import runmeta
    from ftkit.export import _run_system
    from ftkit.model_card import _read

    text, expected = RUN_DIR_RECIPES[name]
    (tmp_path / "recipe.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}', encoding="utf-8")
    readers = [lambda: runmeta.adapter_base_name(tmp_path), lambda: runmeta.run_bits(tmp_path),
               lambda: runmeta.run_trust_remote_code(tmp_path), lambda: runmeta.run_method(tmp_path)]
    if name not in ("wrong_type", "bits_bool"):  # readers of other fields: those files are fine for them
        readers += [lambda: _run_system(tmp_path), lambda: _read(tmp_path / "recipe.yaml")]
    failed = 0
    for read in readers:
        try:
            read()
        except UserError as exc:
            failed += 1
            assert expected in str(exc) and "recipe.yaml" in str(exc), exc
    assert failed >= 1


def test_cli_hostile_run_dir_recipe_exit_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}', encoding="utf-8")
    (run / "recipe.yaml").write_text(BOMB, encoding="utf-8")
    res = ftkit("merge-lora", str(run), "--output", str(tmp_path / "merged"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "alias bomb" in res.stderr, res.stderr
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("tail,expected", [
    ("output:\n  rl: {recipe: {stage: rl}}\n", "output: a directory for the stages' run dirs"),  # fuzz finding
    ("output: 5\n", "not a int"),
])
def test_pipeline_output_must_be_a_path(tmp_path, tail, expected):
    from ftkit.pipeline import load_pipeline

    p = tmp_path / "pipe.yaml"
    p.write_text("stages:\n  sft: {recipe: {stage: sft}}\n" + tail, encoding="utf-8")
    with pytest.raises(UserError, match="pipe.yaml:") as info:
        load_pipeline(str(p))
    assert expected in str(info.value)


@pytest.mark.parametrize("section,expected", [("[a]", "output: a mapping"), ("{dir: 7}", "output.dir: a directory path")])
def test_pipeline_stage_output_must_be_a_mapping_with_a_path(tmp_path, section, expected):
    from ftkit.pipeline import load_pipeline

    p = tmp_path / "pipe.yaml"
    p.write_text(f"stages:\n  sft: {{recipe: {{stage: sft, output: {section}}}}}\n", encoding="utf-8")
    with pytest.raises(UserError, match="stage sft") as info:
        load_pipeline(str(p))
    assert expected in str(info.value)


@pytest.mark.parametrize("item", ["str=1", "int=x", "train.str=1", "method.function-after=1"])
def test_unknown_key_named_like_a_pydantic_union_tag(item):
    # Fuzz finding: a key `str:` was taken for pydantic's union-member tag and dropped, leaving an
    # empty key path (IndexError) instead of "unknown key".
    with pytest.raises(UserError, match=f"unknown key '{item.split('=')[0]}'"):
        load_recipe(None, [item])


def test_tilde_path_of_an_unknown_user_is_a_user_error(tmp_path):
    # Fuzz finding: `~name/...` for a user the machine lacks made pathlib raise RuntimeError (a traceback).
    from ftkit.recipe import check_files

    r = load_recipe(None, ["data.train=~no-such-user-ftkit/train.jsonl"])
    with pytest.raises(UserError, match="no user 'no-such-user-ftkit' on this machine"):
        check_files(r)


def test_pipeline_recipe_path_of_an_unknown_user_is_a_user_error(tmp_path):
    from ftkit.pipeline import load_pipeline  # the same fuzz finding, through a stage's `recipe:` path

    p = tmp_path / "pipe.yaml"
    p.write_text("stages:\n  sft: {recipe: ~no-such-user-ftkit/r.yaml}\n", encoding="utf-8")
    with pytest.raises(UserError, match="no user 'no-such-user-ftkit'"):
        load_pipeline(str(p))


def test_cli_path_of_an_unknown_user_is_exit_2(tmp_path):
    # Any command, any path: pathlib's RuntimeError for `~name` is mapped to exit 2, not a traceback.
    from typer.testing import CliRunner

    from ftkit.cli import app

    res = CliRunner().invoke(app, ["export", "~no-such-user-ftkit/run", "--format", "safetensors",
                                   "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "for a user this machine does not have" in res.output, res.output


@pytest.mark.parametrize("item", ["data.train=" + "a" * 300 + ".jsonl", "model.name=/" + "b" * 300])
def test_path_longer_than_the_filesystem_allows_is_not_found(item):
    # Fuzz finding (pipeline): Path.exists() raised OSError ENAMETOOLONG from check_files.
    from ftkit.recipe import check_files

    with pytest.raises(UserError, match="not found"):
        check_files(load_recipe(None, ["data.train=x.jsonl", item]))
