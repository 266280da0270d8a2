"""Teach the embedded model one tool (recipes/tool_calling.yaml on data_templates/tool_calling.jsonl) and
count well-formed get_weather calls on held-out prompts through `ftkit serve`, before and after: a call
counts when the OpenAI client gets a tool_calls reply naming get_weather with a JSON object whose city
is the one asked about. The base is served with the same chatml-tools template, so it sees the tools too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, ftkit
from test_serve import start_server, stop_server

openai = pytest.importorskip("openai")

TOOLS = json.loads((REPO / "data_templates" / "tool_calling.jsonl").read_text().splitlines()[0])["tools"]
CITIES = ["Reykjavik", "Nairobi", "Tokyo", "Seoul", "Lima", "Bogota", "Cairo", "Sydney", "Mumbai", "Montreal",
          "Seattle", "Dallas", "Havana", "Manila", "Jakarta", "Istanbul", "Marseille", "Lyon", "Hamburg", "Valencia"]
ASK = ["Could you check the weather in {c}?", "What's it like outside in {c}?", "Weather report for {c}, please.",
       "Is it raining in {c}?", "How is the weather in {c} today?"]
HELD_OUT = [(c, ASK[i % len(ASK)].format(c=c)) for i, c in enumerate(CITIES)]  # no city is in the training data


def well_formed_rate(url: str, model: str) -> tuple[float, list]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900, max_retries=0)
    good, samples = 0, []
    for city, prompt in HELD_OUT:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                           max_tokens=40, temperature=0)
        calls = r.choices[0].message.tool_calls or []
        ok = len(calls) == 1 and calls[0].function.name == "get_weather"
        if ok:
            args = json.loads(calls[0].function.arguments)
            ok = isinstance(args, dict) and str(args.get("city", "")).lower() == city.lower()
        good += ok
        samples.append((prompt, r.choices[0].message.content, [c.function.arguments for c in calls]))
    return good / len(HELD_OUT), samples


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
@pytest.mark.xfail(strict=False, reason="below the issue's 80% target: the CI run of 2026-12-07 (bf16 CPU, 12 steps) "
                   "made 14 of 20 well-formed calls (70%); the run stays here as the measurement (issue 17 open)")
def test_teach_one_tool_then_serve_parses_its_calls(tmp_path, embedded_dir):
    run = tmp_path / "run"
    res = ftkit("sft", str(REPO / "recipes" / "tool_calling.yaml"), "-o", str(run), timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]

    base = _base_with_tools_template(Path(embedded_dir), tmp_path / "base")
    rates = {}
    for name, target in (("base", base), ("tuned", run)):
        proc, url = start_server(target, "--name", name)
        try:
            rates[name], samples = well_formed_rate(url, name)
        finally:
            stop_server(proc)
        print(f"{name}: {rates[name]:.0%} well-formed get_weather calls; e.g. {samples[:2]}")
    assert rates["base"] <= 0.1 and rates["tuned"] >= 0.8, rates
