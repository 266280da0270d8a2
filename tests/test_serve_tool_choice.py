"""`tool_choice` and streamed tool calls through `ftkit serve`'s OpenAI API, with the official openai client.
Canned replies check the request handling and the stream's shape; the tiny random model checks that a
forced call's start really is written into the prompt and comes back as the reply's start."""

from __future__ import annotations

import json
import pytest
from test_data_tools_serve import canned, client_for  # noqa: F401 (the canned-reply server)
from tool_templates import LLAMA31, WEATHER

from ftkit.data.templates import CHATML_TOOLS
from ftkit.json_prefix import JsonObjectScan
from ftkit.toolcalls import prefill, stream_deltas

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ARGS = '{"city": "Paris", "unit": "celsius"}'
CALL = '<tool_call>\n{"name": "get_weather", "arguments": ' + ARGS + '}\n</tool_call>'
TWO = WEATHER + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def _collect(stream) -> tuple[str, list, str | None]:
    content, deltas, finish = "", [], None
    for ev in stream:
        d = ev.choices[0].delta
        content += d.content or ""
        deltas += d.tool_calls or []
        finish = ev.choices[0].finish_reason or finish
    return content, deltas, finish


def test_none_offers_no_tools_and_parses_nothing(canned):
    client, seen = canned
    seen["reply"] = CALL
    r = client.chat.completions.create(model="m", messages=USER, tools=WEATHER, tool_choice="none")
    assert "<tools>" not in seen["prompt"] and "get_weather" not in seen["prompt"]
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


def test_required_and_named_choice_start_the_reply_inside_a_call(canned):
    client, seen = canned
    seen["reply"] = CALL[len("<tool_call>\n"):]
    r = client.chat.completions.create(model="m", messages=USER, tools=TWO, tool_choice="required")
    assert seen["prompt"].endswith("<|im_start|>assistant\n<tool_call>\n")
    [c] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and c.function.name == "get_weather"

    seen["reply"] = " " + ARGS + "}\n</tool_call>"
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="m", messages=USER, tools=TWO, tool_choice=named)
    assert seen["prompt"].endswith('assistant\n<tool_call>\n{"name": "get_weather", "arguments":')
    [c] = r.choices[0].message.tool_calls
    assert c.function.name == "get_weather" and json.loads(c.function.arguments) == json.loads(ARGS)
    content, deltas, finish = _collect(client.chat.completions.create(model="m", messages=USER, tools=TWO,
                                                                      tool_choice=named, stream=True))
    assert content == "" and finish == "tool_calls" and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(ARGS)


@pytest.mark.parametrize("choice, tools, words", [
    ({"type": "function", "function": {"name": "get_news"}}, WEATHER, "'get_news', which is not among"),
    ({"type": "function", "name": "get_weather"}, WEATHER, 'tool_choice must be "none", "auto", "required"'),
    ("sometimes", WEATHER, 'got "sometimes"'),
    ("required", None, "needs tools, and the request has none"),
])
def test_bad_tool_choice_is_a_400_naming_it(canned, choice, tools, words):
    client, seen = canned
    seen["reply"] = "hi"
    kw = {"tools": tools} if tools else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=USER, tool_choice=choice, **kw)
    assert err.value.status_code == 400 and words in err.value.message
    assert err.value.body["param"] == "tool_choice"


def test_streamed_call_announces_name_first_then_arguments_in_pieces(canned):
    client, seen = canned
    seen["reply"] = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    content, deltas, finish = _collect(client.chat.completions.create(model="m", messages=USER, tools=WEATHER,
                                                                      stream=True))
    assert content == "Let me check." and finish == "tool_calls"
    firsts = [d for d in deltas if d.id]
    assert [(d.index, d.type, d.function.name, d.function.arguments) for d in firsts] == [
        (0, "function", "get_weather", ""), (1, "function", "get_weather", "")]
    assert firsts[0].id.startswith("call_") and firsts[0].id != firsts[1].id
    pieces = [d for d in deltas if not d.id]
    assert len([d for d in pieces if d.index == 0]) > 3 and all(d.function.name is None for d in pieces)
    args = ["".join(d.function.arguments for d in pieces if d.index == k) for k in (0, 1)]
    assert [json.loads(a)["city"] for a in args] == ["Paris", "Rome"]


def test_stream_cut_inside_a_call_does_not_finish_as_tool_calls(canned):
    client, seen = canned
    seen["reply"], seen["finish"] = CALL[:-30], "length"
    try:
        content, deltas, finish = _collect(client.chat.completions.create(model="m", messages=USER, tools=WEATHER,
                                                                          stream=True))
    finally:
        seen.pop("finish")
    assert finish == "length" and content == "" and deltas[0].function.name == "get_weather"
    assert "<tool_call>" not in content


@pytest.mark.parametrize("text", [CALL, "plain <tool_ text", "<tool_call>\n{broken}\n</tool_call> after",
                                  '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>',
                                  # fuzz findings: a name that is no JSON string (a control character, a bad
                                  # escape) ended the stream with a JSONDecodeError
                                  '<tool_call>\n{"name": "ge\x07t", "arguments": {"a": 1}}\n</tool_call>',
                                  '<tool_call>\n{"name": "g\\q", "arguments": {"a": 1}}\n</tool_call>'])
def test_stream_pieces_add_up_to_the_whole_reply(text):
    """However the text is cut into pieces, the stream says what the non-streamed parse says."""
    from ftkit.toolcalls import parse

    want_content, want_calls = parse(text, CHATML_TOOLS)
    for size in (1, 2, 5, 64):
        finish: dict = {}
        deltas = list(stream_deltas((text[i : i + size] for i in range(0, len(text), size)), CHATML_TOOLS, finish))
        content = "".join(d.get("content", "") for d in deltas)
        calls: dict = {}
        for d in deltas:
            for c in d.get("tool_calls", []):
                calls.setdefault(c["index"], {"name": "", "arguments": ""})
                calls[c["index"]]["name"] += c["function"].get("name", "")
                calls[c["index"]]["arguments"] += c["function"].get("arguments", "")
        assert (content or None) == (want_content or None) and finish["tool_calls"] == bool(want_calls)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
            (w["function"]["name"], json.loads(w["function"]["arguments"])) for w in want_calls]


def test_json_prefix_scan_stops_at_the_first_impossible_character():
    def accepted(text: str) -> tuple[int, bool]:
        scan = JsonObjectScan()
        n = next((i for i, ch in enumerate(text) if not scan.push(ch)), len(text))
        return n, scan.done

    whole = '{"a": [1, -2.5e3, true, null, "x\\u00e9\\""], "b": {}}'
    assert accepted(whole) == (len(whole), True)
    assert accepted('{"a": tru') == (9, False)  # still on its way
    assert accepted('{"a": trux}') == (9, False)
    assert accepted('{"a": 01}') == (7, False)
    assert accepted("{'a': 1}") == (1, False)
    assert accepted('{"a": 1,}') == (8, False)


def test_prefill_follows_the_template_syntax():
    assert prefill(CHATML_TOOLS, None) == ""
    assert prefill(CHATML_TOOLS, "") == "<tool_call>\n"
    assert prefill(LLAMA31, "get_weather") == '{"name": "get_weather", "parameters":'
    assert prefill(LLAMA31, "") == '{"name":'


def test_named_choice_on_the_tiny_model_writes_the_call_start(tiny_model):
    """A real (random) model: the forced start is in the prompt it continues, and the reply, which
    cannot parse as a call, comes back as content beginning with that start (never a half call)."""
    from ftkit.inference import load_for_inference
    from ftkit.serve import Engine

    model, tok = load_for_inference(str(tiny_model), log=lambda *a: None)
    tok.chat_template = CHATML_TOOLS
    client = client_for(Engine(model, tok, "m"))
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="m", messages=USER, tools=WEATHER, tool_choice=named, max_tokens=4)
    start = prefill(CHATML_TOOLS, "get_weather")
    text = tok.apply_chat_template(USER, tools=WEATHER, tokenize=False, add_generation_prompt=True) + start
    assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    assert r.choices[0].message.content.startswith(start) and not r.choices[0].message.tool_calls


def test_generate_tool_choice(tmp_path, tiny_model):
    """`ftkit generate --tool-choice NAME` writes the call's start after the prompt and prints the reply
    as a message starting with it; a name not in --tools is exit 2 before the model loads."""
    from conftest import ftkit

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(WEATHER))
    res = ftkit("generate", str(tiny_model), "--tools", str(tools), "--tool-choice", "get_news", "-p", "hi")
    assert res.returncode == 2 and "--tool-choice" in res.stderr and "'get_news', which is not among" in res.stderr
    assert "Traceback" not in res.stderr and "loading" not in res.stderr
    res = ftkit("generate", str(tiny_model), "--tools", str(tools), "--tool-choice", "get_weather", "-p", "hi",
                "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    start = prefill(None, "get_weather")  # the tiny model's own template has no <tool_call> markers
    assert json.loads(res.stdout.strip().splitlines()[-1])["content"].startswith(start)
