"""Formats round-trip through the canonical form; sources, mixing, roles, shuffling, data_templates/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, ftkit, write_recipe

from ftkit.data import load_canonical
from ftkit.data.formats import Columns, from_canonical, to_canonical
from ftkit.data.sources import read_rows
from ftkit.recipe import load_recipe

ROWS = {
    "messages": [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                               {"role": "assistant", "content": "a2"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}],
    "alpaca": [{"system": "S", "instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]},
               {"instruction": "q", "input": "", "output": "a"}],
    "completion": [{"prompt": "2+2=", "completion": "4"}],
    "text": [{"text": "Once upon a time."}],
}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_round_trip(tmp_path, fmt):
    f = _write(tmp_path / f"{fmt}.jsonl", ROWS[fmt])
    detected, items = to_canonical(read_rows(f), "auto", {}, None)
    assert detected == fmt
    assert [from_canonical(i, fmt) for i in items] == ROWS[fmt]


def test_sharegpt_and_alpaca_become_the_same_conversation(tmp_path):
    _, a = to_canonical(read_rows(_write(tmp_path / "a.jsonl", ROWS["alpaca"][:1])), "alpaca", {}, None)
    _, m = to_canonical(read_rows(_write(tmp_path / "m.jsonl", ROWS["messages"])), "messages", {}, None)
    assert a[0]["messages"] == m[0]["messages"]


def test_convert_cli_sharegpt_to_messages(tmp_path):
    src = _write(tmp_path / "in.jsonl", ROWS["sharegpt"])
    res = ftkit("data", "convert", str(src), "--from", "sharegpt", "--to", "messages", "-o", str(tmp_path / "o.jsonl"))
    assert res.returncode == 0, res.stderr
    [row] = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert row == {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}
    # a row that cannot be expressed: nothing written, exit 2
    bad = ftkit("data", "convert", str(_write(tmp_path / "t.jsonl", ROWS["text"])), "--to", "messages",
                "-o", str(tmp_path / "never.jsonl"))
    assert bad.returncode == 2 and "t.jsonl:1" in bad.stderr and not (tmp_path / "never.jsonl").exists()


def test_roles_and_inner_key_mapping(tmp_path):
    rows = [{"chat": [{"speaker": "patient", "text": "it hurts"}, {"speaker": "doctor", "text": "where?"}]}]
    f = _write(tmp_path / "d.jsonl", rows)
    cols = Columns({"messages": "chat", "role": "speaker", "content": "text"}, {"patient": "user", "doctor": "assistant"})
    _, [item] = to_canonical(read_rows(f), "messages", cols, "Be kind.")
    assert item["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "it hurts"},
                                {"role": "assistant", "content": "where?"}]


def test_csv_parquet_txt_and_saved_dataset_sources(tmp_path):
    from datasets import Dataset

    (tmp_path / "a.csv").write_text("instruction,output\nq,a\n", encoding="utf-8")
    Dataset.from_list(ROWS["completion"]).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "t.txt").write_text("para one\nline two\n\npara two\n", encoding="utf-8")
    Dataset.from_list(ROWS["text"]).save_to_disk(str(tmp_path / "saved"))
    got = {p: to_canonical(read_rows(tmp_path / p), "auto", {}, None)[0] for p in ("a.csv", "c.parquet", "t.txt", "saved")}
    assert got == {"a.csv": "alpaca", "c.parquet": "completion", "t.txt": "text", "saved": "text"}
    assert [r.data["text"] for r in read_rows(tmp_path / "t.txt")] == ["para one\nline two", "para two"]


def test_mixed_sources_are_shuffled_deterministically_by_seed(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    m = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": f"u{i}"},
                                                    {"role": "assistant", "content": f"v{i}"}]} for i in range(10)])

    def order(seed, **data):
        r = load_recipe(write_recipe(tmp_path / "r.yaml", "x", a, data={"train": [str(a), str(m)], **data}),
                        [f"train.seed={seed}"])
        c = load_canonical(r)
        return c, [row["where"] for row in c.train]

    c, first = order(1)
    assert c.format == "alpaca+messages" and [s["rows"] for s in c.sources] == [10, 10]
    assert first == order(1)[1] and first != order(2)[1]
    assert sorted(first) != first  # actually interleaved
    _, unshuffled = order(1, shuffle=False)
    assert unshuffled == sorted(unshuffled, key=lambda w: (w.split(":")[0], int(w.split(":")[1])))
    c, _ = order(1, eval_split=0.25)
    assert (len(c.train), len(c.eval)) == (15, 5)


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "text", "completion"])
def test_data_templates_are_valid_and_documented(fmt):
    files = list((REPO / "data_templates").glob(f"{fmt}.*"))
    assert len(files) == 1, files
    detected, items = to_canonical(read_rows(files[0]), "auto", {}, None)
    assert detected == fmt and len(items) >= 3
    readme = (REPO / "data_templates" / "README.md").read_text(encoding="utf-8")
    assert f"format: {fmt}" in readme and files[0].name in readme
