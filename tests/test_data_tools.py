"""Tool calls, reasoning and per-turn loss: labels checked token by token against hand-written expected
trained text, for three templates with different tool/reasoning syntax (tests/tool_templates.py)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, ftkit, write_recipe
from tool_templates import LLAMA31, LLAMA_TOKENS, QWEN3, QWEN_TOKENS, WEATHER, call

from ftkit.data.chat import for_template
from ftkit.data.formats import to_canonical
from ftkit.data.render import SpanFinder, assistant_spans
from ftkit.data.sources import read_rows
from ftkit.data.templates import CHATML, CHATML_TOOLS
from ftkit.data.tokenize import IGNORE, TokenStats, encode_rows


def _tok(tiny_model, special=(), plain=()):
    from ftkit.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if plain:
        tok.add_tokens(list(plain))
    return tok


@pytest.fixture(scope="module")
def tok(tiny_model):
    return _tok(tiny_model)


def _canonical(tmp_path, rows: list[dict], name: str = "d.jsonl") -> list[dict]:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return to_canonical(read_rows(p), "auto", {}, None)[1]


def _check(tok, template, row, expected: list[list[str]], reasoning=True):
    """Each sample's labels, token by token: trained exactly where a character of an expected segment starts."""
    st = TokenStats()
    samples = encode_rows([row], tok, template, "responses", 4096, st, train_on_reasoning=reasoning)
    assert len(samples) == len(expected) and st.extra_samples == len(expected) - 1
    for sample, segments in zip(samples, expected):
        ids, labels = sample["input_ids"], sample["labels"]
        text = tok.decode(ids)
        enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        assert enc.ids == ids
        ranges, pos = [], 0
        for seg in segments:
            at = text.index(seg, pos)
            ranges.append((at, at + len(seg)))
            pos = at + len(seg)
        for i, (tid, lab) in enumerate(zip(ids, labels)):
            want = any(a <= enc.offsets[i][0] < b for a, b in ranges)
            assert lab == (tid if want else IGNORE), f"token {i} {tok.decode([tid])!r}: label {lab}, want {want}"
        runs, cur = [], []
        for tid, lab in zip(ids + [0], labels + [IGNORE]):
            if lab != IGNORE:
                cur.append(tid)
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        assert runs == segments


def _hermes_row(tmp_path):
    raw = {"tools": WEATHER, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "20C"},
        {"role": "assistant", "reasoning_content": "Both answered.", "content": "Paris 18, Rome 20."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "Welcome", "train": False}]}
    return _canonical(tmp_path, [raw])[0]


CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n')


@pytest.mark.parametrize("reasoning", [True, False])
def test_hermes_chatml_tools_masking(tok, tmp_path, reasoning):
    row = _hermes_row(tmp_path)
    answer = ("<think>\nBoth answered.\n</think>\n\n" if reasoning else "") + "Paris 18, Rome 20.<|im_end|>\n"
    _check(tok, CHATML_TOOLS, row, [[CALLS, answer]], reasoning)
    text = tok.decode(encode_rows([row], tok, CHATML_TOOLS, "all", 4096)[0]["input_ids"])
    assert '"name": "get_weather"' in text.split("\n</tools>")[0]  # the tools system block
    assert "<tool_response>\n18C\n</tool_response>" in text and "Be brief." in text


def test_qwen3_style_reasoning_is_trained_per_turn_group(tiny_model, tmp_path):
    tok = _tok(tiny_model, plain=QWEN_TOKENS)
    raw = {"tools": WEATHER, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\ngreet back\n</think>\n\nHello!"},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "thinking": "need the tool", "content": "", "tool_calls": [call("a", "Oslo")]},
        {"role": "tool", "tool_call_id": "a", "content": "-3C"},
        {"role": "assistant", "reasoning_content": "cold", "content": "It is -3C."}]}
    row = _canonical(tmp_path, [raw])[0]
    oslo = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
    # The full rendering drops the first reply's reasoning (an earlier query): that turn is its own sample.
    _check(tok, QWEN3, row, [["<think>\ngreet back\n</think>\n\nHello!<|im_end|>\n"],
                             ["<think>\nneed the tool\n</think>\n\n" + oslo,
                              "<think>\ncold\n</think>\n\nIt is -3C.<|im_end|>\n"]])
    _check(tok, QWEN3, row, [["Hello!<|im_end|>\n"], [oslo, "It is -3C.<|im_end|>\n"]], reasoning=False)


def test_llama31_style_python_tag_calls(tiny_model, tmp_path):
    tok = _tok(tiny_model, special=LLAMA_TOKENS)
    raw = {"tools": WEATHER, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lima"}}]},
        {"role": "ipython", "content": "22C"},
        {"role": "assistant", "content": "<think>\nwarm\n</think>\n\nIt is 22C.", "weight": 0},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "<think>\nno forecast tool\n</think>\nI cannot tell."}]}
    row = _canonical(tmp_path, [raw])[0]
    assert row["messages"][4]["train"] is False and row["messages"][6]["reasoning"] == "no forecast tool"
    lima = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}<|eom_id|>'
    _check(tok, LLAMA31, row, [[lima, "<think>\nno forecast tool\n</think>\n\nI cannot tell.<|eot_id|>"]])
    _check(tok, LLAMA31, row, [[lima, "I cannot tell.<|eot_id|>"]], reasoning=False)


def test_fast_render_path_equals_reference_on_tool_and_reasoning_data(tok):
    rows = []
    for name in ("reasoning.jsonl", "tool_calling.jsonl", "tool_calling_sharegpt.jsonl"):
        rows += to_canonical(read_rows(REPO / "data_templates" / name), "auto", {}, None)[1]
    for template in (CHATML_TOOLS, CHATML, tok.chat_template):
        finder = SpanFinder(tok, template)
        with_tools = 0
        for row in rows:
            msgs, tools = for_template(row["messages"], template), row.get("tools")
            if template != CHATML_TOOLS and tools:
                continue  # these two cannot render tools (refused before training)
            with_tools += bool(tools)
            assert finder(msgs, row["where"], tools) == assistant_spans(tok, template, msgs, "t", tools=tools)
        assert finder.fast and any(finder.shapes.values())  # reasoning rows took the fast path
        assert finder.reference_rows == with_tools  # tool rows fell back, counted


def test_sharegpt_function_call_and_observation_turns():
    [row] = to_canonical(read_rows(REPO / "data_templates" / "tool_calling_sharegpt.jsonl"), "auto", {}, None)[1][:1]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert row["tools"][0]["function"]["name"] == "get_weather"


def test_malformed_calls_listed_with_file_line(tmp_path, tiny_model):
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
               {"function": {"name": "get_weather", "arguments": "{city: Paris"}}]},
            {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("z", "Rome")]},
                         {"role": "user", "content": "hello?"}, {"role": "assistant", "content": "a"}]}]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bad), encoding="utf-8")
    res = ftkit("data", "check", str(write_recipe(tmp_path / "r.yaml", tiny_model, data)))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "2 malformed tool call(s)" in res.stderr
    assert f"{data}:1: turn 2: arguments of get_weather are not a JSON object" in res.stderr
    assert f"{data}:2: turn 3: tool call(s) get_weather got no tool result" in res.stderr


def test_template_without_tools_is_refused_and_chatml_tools_counts(tmp_path, tiny_model):
    data = REPO / "data_templates" / "tool_calling.jsonl"
    res = ftkit("data", "check", str(write_recipe(tmp_path / "r.yaml", tiny_model, data)))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "the tokenizer's own chat template cannot render them" in res.stderr and "chatml-tools" in res.stderr
    ok = write_recipe(tmp_path / "ok.yaml", tiny_model, data, data={"template": "chatml-tools", "max_length": 512})
    res = ftkit("data", "check", str(ok), "--no-cache")
    assert res.returncode == 0, res.stderr
    assert "104 rows with tools · 80 tool calls · 80 tool results · 104 rows on the reference render path" in res.stdout


@pytest.mark.parametrize("name", ["tool_calling.jsonl", "tool_calling_sharegpt.jsonl", "reasoning.jsonl"])
def test_tiny_model_trains_two_steps_on_each_starter_file(tmp_path, tiny_model, name):
    data = {"template": "chatml-tools", "max_length": 512} if name.startswith("tool") else {"max_length": 128}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, REPO / "data_templates" / name, data=data,
                          train={"max_steps": 2, "batch_size": 2})
    res = ftkit("sft", str(recipe))
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics.get("global_step", metrics.get("steps")) == 2 or "train_loss" in metrics


def test_preview_names_untrained_turns_and_check_counts_reasoning(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, REPO / "data_templates" / "reasoning.jsonl",
                          data={"max_length": 128, "train_on_reasoning": False})
    res = ftkit("data", "preview", str(recipe), "-n", "4")
    assert res.returncode == 0, res.stderr
    assert "turn(s) 2: train: false (no loss)" in res.stdout and "<think>" in res.stdout
    res = ftkit("data", "check", str(recipe), "--no-cache")
    assert res.returncode == 0 and "12 reasoning turns · 3 untrained turns" in res.stdout, res.stdout
