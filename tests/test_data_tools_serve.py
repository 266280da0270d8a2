"""Tool calls through `ftkit serve`'s OpenAI API, checked with the official openai client: the request's
tools reach the chat template, and replies carrying <tool_call> blocks come back as `tool_calls` (streamed
ones: test_serve_tool_choice). The model is replaced by canned replies here; test_data_tools_e2e runs a real one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from tool_templates import WEATHER

from ftkit.data.templates import CHATML_TOOLS
from ftkit.toolcalls import parse

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def client_for(engine):
    """The official openai client talking to `engine` in-process."""
    from fastapi.testclient import TestClient

    from ftkit.serve import build_app

    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(build_app(engine)),
                         max_retries=0)


@pytest.fixture(scope="module")
def canned(tiny_model):
    """(client, seen): the server answers seen["reply"] (ending as seen["finish"]) and records the prompt."""
    from ftkit.models import load_tokenizer
    from ftkit.serve import Engine

    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = CHATML_TOOLS
    seen = {}

    class Canned(Engine):
        def stream(self, ids, max_tokens, req, strip, outcome):
            seen["prompt"] = self.tok.decode(ids)
            reply = seen.get("reply", CALL)
            outcome.completion_tokens, outcome.finish_reason = len(reply), seen.get("finish", "stop")
            yield from (reply[i : i + 4] for i in range(0, len(reply), 4))

    engine = Canned(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)), tok, "m")
    return client_for(engine), seen


def test_tool_call_reply_in_openai_shape(canned):
    client, seen = canned
    seen["reply"] = CALL
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=WEATHER)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [c] = choice.message.tool_calls
    assert c.type == "function" and c.function.name == "get_weather" and c.id.startswith("call_")
    assert json.loads(c.function.arguments) == {"city": "Paris"}
    assert '"name": "get_weather"' in seen["prompt"].split("</tools>")[-2]  # the tools block reached the template


def test_tool_results_render_and_plain_reply_stays_content(canned):
    client, seen = canned
    seen["reply"] = "It is 18C in Paris."
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=WEATHER)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "It is 18C in Paris."
    assert not r.choices[0].message.tool_calls
    assert CALL in seen["prompt"] and "<tool_response>\n18C\n</tool_response>" in seen["prompt"]


def test_parse_by_template_markers():
    assert parse("<tool_call>\n{not json}\n</tool_call>", CHATML_TOOLS)[1] == []  # never a broken call
    content, calls = parse('{"name": "get_weather", "parameters": {"city": "Lima"}}', "llama-style")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Lima"}
    assert parse('The JSON {"name": "x"} is here', "llama-style") == ('The JSON {"name": "x"} is here', [])


def test_generate_tools_file_errors_before_loading(tmp_path):
    from conftest import ftkit

    res = ftkit("generate", "smollm2-135m-instruct", "--tools", str(tmp_path / "none.json"), "-p", "hi")
    assert res.returncode == 2 and "--tools" in res.stderr and "file not found" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('[{"type": "function", "function": {"name": 3}}]')
    res = ftkit("generate", "smollm2-135m-instruct", "--tools", str(bad), "-p", "hi")
    assert res.returncode == 2 and "a tool schema without a name" in res.stderr and "Traceback" not in res.stderr
