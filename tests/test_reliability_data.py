"""Fuzz findings in the data readers (issue 19), each kept as a regression test: exit 2, never a traceback."""

from __future__ import annotations

import json

import pytest
from conftest import ftkit

from ftkit.data import load_canonical
from ftkit.errors import UserError
from ftkit.recipe import Recipe, load_recipe


def _recipe(path, fmt="auto", stage="sft") -> Recipe:
    return Recipe.model_validate({"stage": stage, "data": {"train": str(path), "format": fmt}})


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_a_user_error(tmp_path, suffix):
    p = tmp_path / f"train{suffix}"
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    p.write_text('{"text": "ok"}\n' + deep + "\n" if suffix == ".jsonl" else f"[{deep}]", encoding="utf-8")
    with pytest.raises(UserError, match="nested too deeply"):
        load_canonical(_recipe(p))


def test_yaml_reader_errors_are_user_errors(tmp_path):
    """Found by fuzz_recipe/fuzz_pipeline: a control character raised yaml's ReaderError before parsing began."""
    p = tmp_path / "r.yaml"
    p.write_bytes(b"stage: sft\ntrain: {epochs: \x17}\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(p)
    # --set arguments arrive with undecodable bytes as lone surrogates: they stay text, or are a clear error
    try:
        load_recipe(None, ["output.dir=caf\udce9"])
    except UserError:
        pass


def test_preference_rows_on_the_sft_path_are_a_user_error(tmp_path, tiny_model):
    """Found by fuzz_data: preference rows reached the SFT tokenizer and raised KeyError: 'completion'."""
    from transformers import AutoTokenizer

    from ftkit.data import prepare

    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(UserError, match=r"pairs.jsonl:1: these rows are preference pairs \(ftkit dpo"):
        prepare(_recipe(p, "preference"), tok, log=lambda *_: None, cache=False)


def test_data_check_on_preference_data_exits_0(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": "good", "rejected": "bad"}) + "\n"
                         for i in range(4)), encoding="utf-8")
    r = tmp_path / "r.yaml"
    r.write_text(f"stage: dpo\ndata: {{train: {p}, format: preference}}\n", encoding="utf-8")
    res = ftkit("data", "check", str(r))
    assert res.returncode == 0, res.stderr
    assert "tokenized by the dpo trainer" in res.stdout and "Traceback" not in res.stderr
