"""ftkit serve: a real server process on 127.0.0.1, queried with the official openai client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ftkit

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "sk-ftkit-test"
PROMPT = "What is 2 plus 3?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", "serve", str(model), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {proc.stdout.read()}")
        try:
            req = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=2):
                return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("server did not come up within 180 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("server ignored SIGTERM for 30 s")


@pytest.fixture(scope="module")
def server(tiny_model):
    proc, url = start_server(tiny_model, "--api-key", KEY, "--name", "tiny")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=120, max_retries=0)


def post(url: str, body: bytes | str, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body.encode() if isinstance(body, str) else body
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with urllib.request.urlopen(urllib.request.Request(f"{server}/health", headers={"Authorization": f"Bearer {KEY}"}),
                                timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "model": "tiny"}


def test_chat_greedy_matches_ftkit_generate(client, tiny_model):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    cli = ftkit("generate", str(tiny_model), "-p", PROMPT, "--max-new-tokens", "12")
    assert cli.returncode == 0, cli.stderr
    assert choice.message.content == cli.stdout.rstrip("\n")


def test_stream_gives_the_same_text(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_plain_and_stream(client):
    plain = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert plain.choices[0].finish_reason == "length" or plain.usage.completion_tokens < 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert streamed == plain.choices[0].text
    two = client.completions.create(model="tiny", prompt=["a b c", "The capital of France is"], max_tokens=6)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == plain.choices[0].text


def test_stop_string_cuts_the_reply(client):
    full = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8).choices[0].text
    words = full.split()
    assert len(words) >= 2, full
    cut = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, stop=[words[1]])
    assert cut.choices[0].text == full[: full.index(words[1])]
    assert cut.choices[0].finish_reason == "stop"


BAD = [
    ("malformed json", '{"model": "tiny", "messages": [', 400, None),
    ("not an object", "[1, 2]", 400, None),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ("too many tokens", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
     400, "context_length_exceeded"),
    ("max_tokens wrong type", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
     400, None),
    ("stream wrong type", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, None),
    ("content wrong type", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("no messages", {"model": "tiny", "messages": []}, 400, None),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ("negative temperature", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     400, None),
    ("n > 1", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, None),
]


@pytest.mark.parametrize("case,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, case, body, status, code):
    raw = body if isinstance(body, str) else json.dumps(body)
    got, reply = post(f"{server}/v1/chat/completions", raw)
    assert got == status, reply
    err = reply["error"]
    assert err["message"] and err["type"]
    assert err["code"] == code


def test_bad_requests_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_api_key_is_checked_on_every_route(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    status, reply = post(f"{server}/v1/completions", json.dumps({"model": "tiny", "prompt": "x"}), key=None)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"


def test_concurrent_requests_are_queued(client):
    def ask(out: list, i: int):
        out[i] = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=8, temperature=0).choices[0].message.content

    results: list = [None] * 4
    threads = [threading.Thread(target=ask, args=(results, i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(not t.is_alive() for t in threads)
    assert results[0] is not None and results == [results[0]] * 4


def test_client_leaving_mid_stream_frees_the_model(client, server):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell a story."}],
                                            max_tokens=2000, stream=True)
    next(iter(stream))
    stream.close()
    t0 = time.monotonic()
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - t0 < 60  # 2000 tokens would take far longer than this


def test_shutdown_and_default_localhost(tiny_model):
    proc, url = start_server(tiny_model)
    try:
        assert url.startswith("http://127.0.0.1:")
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0).models.list()
        model_id = reply.data[0].id
        assert model_id == tiny_model.name
    finally:
        rc = stop_server(proc)
    out = proc.stdout.read()
    assert rc == 0, out
    assert f"on {url}/v1" in out and "server stopped" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()


def test_taken_port_is_exit_2(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = ftkit("serve", str(tiny_model), "--port", str(s.getsockname()[1]), timeout=120)
    assert r.returncode == 2
    assert "cannot listen" in r.stderr and "Traceback" not in r.stderr
