"""Teach the embedded model one tool (recipes/tool_calling.yaml on data_templates/tool_calling.jsonl) and
count well-formed get_weather calls on held-out prompts through `ftkit serve`, before and after: a call
counts when the OpenAI client gets a tool_calls reply naming get_weather with a JSON object whose city
is the one asked about. The base is served with the same chatml-tools template, so it sees the tools too.
Below 80% tuned (or above 10% base) it fails; docs/data.md has the last measured numbers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import REPO, ftkit
from test_serve import start_server, stop_server

openai = pytest.importorskip("openai")

TRAIN = REPO / "data_templates" / "tool_calling.jsonl"
TOOLS = json.loads(TRAIN.read_text().splitlines()[0])["tools"]
CITIES = ["Reykjavik", "Nairobi", "Tokyo", "Seoul", "Lima", "Bogota", "Cairo", "Sydney", "Mumbai", "Montreal",
          "Seattle", "Dallas", "Havana", "Manila", "Jakarta", "Istanbul", "Marseille", "Lyon", "Hamburg", "Valencia"]
ASK = ["Could you check the weather in {c}?", "What's it like outside in {c}?", "Weather report for {c}, please.",
       "Is it raining in {c}?", "How is the weather in {c} today?"]
HELD_OUT = [(c, ASK[i % len(ASK)].format(c=c)) for i, c in enumerate(CITIES)]


def test_held_out_prompts_stay_out_of_the_training_data():
    """No held-out city anywhere in the starter file, and no training question in a held-out phrasing."""
    text = TRAIN.read_text(encoding="utf-8")
    assert not [c for c in CITIES if re.search(rf"\b{c}\b", text, re.I)]
    asked = [json.loads(ln)["messages"][0]["content"].lower() for ln in text.splitlines()]
    for ask in ASK:
        head, tail = ask.lower().split("{c}")
        assert not [q for q in asked if q.startswith(head) and q.endswith(tail)], ask


def well_formed_rate(url: str, model: str) -> tuple[float, list]:
    """Share of held-out prompts answered by one get_weather call naming the asked city, and the misses.
    The prompts go in together, so the server generates them in batches (as alone, token for token)."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900, max_retries=0)

    def ask(prompt: str):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              tools=TOOLS, max_tokens=40, temperature=0).choices[0].message

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, [p for _, p in HELD_OUT]))
    good, misses = 0, []
    for (city, prompt), msg in zip(HELD_OUT, replies):
        calls = msg.tool_calls or []
        ok = len(calls) == 1 and calls[0].function.name == "get_weather"
        if ok:
            args = json.loads(calls[0].function.arguments)
            ok = isinstance(args, dict) and str(args.get("city", "")).lower() == city.lower()
        good += ok
        if not ok:
            misses.append((prompt, msg.content, [c.function.arguments for c in calls]))
    return good / len(HELD_OUT), misses


def _base_with_tools_template(src: Path, out: Path) -> Path:
    """The embedded model as is, its tokenizer carrying chatml-tools (what the tuned run dir carries)."""
    from transformers import AutoTokenizer

    from ftkit.data.templates import CHATML_TOOLS

    out.mkdir()
    for f in src.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            os.symlink(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = CHATML_TOOLS
    tok.save_pretrained(out)
    return out


@pytest.mark.e2e
def test_teach_one_tool_then_serve_parses_its_calls(tmp_path, embedded_dir):
    run = tmp_path / "run"
    # No sample replies after training: the served model is measured below.
    res = ftkit("sft", str(REPO / "recipes" / "tool_calling.yaml"), "-o", str(run), "--set", "output.samples=0",
                timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [round(r["loss"], 3) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    print(f"training loss by step: {losses}")

    base = _base_with_tools_template(Path(embedded_dir), tmp_path / "base")
    rates = {}
    for name, target in (("base", base), ("tuned", run)):
        proc, url = start_server(target, "--name", name)
        try:
            rates[name], misses = well_formed_rate(url, name)
        finally:
            stop_server(proc)
        print(f"{name}: {rates[name]:.0%} well-formed get_weather calls; misses: {misses[:6]}")
    assert rates["base"] <= 0.1 and rates["tuned"] >= 0.8, rates
