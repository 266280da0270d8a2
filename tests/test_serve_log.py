"""`ftkit serve` logs one stderr line per request (method, path, status, tokens, ms); --quiet turns it off."""

import json
import re
import urllib.error
import urllib.request

from test_serve import start_server, stop_server


def _post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_one_line_per_request_with_status_tokens_and_ms(tiny_model):
    proc, url = start_server(tiny_model, "--name", "tiny")
    try:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert _post(f"{url}/v1/chat/completions", chat) == 200
        assert _post(f"{url}/v1/chat/completions", {**chat, "model": "nope"}) == 404
        assert _post(f"{url}/v1/chat/completions", {**chat, "stream": True}) == 200
    finally:
        stop_server(proc)
    out = proc.stdout.read()
    lines = [ln for ln in out.splitlines() if ln.startswith(("GET ", "POST "))]
    assert lines[0].startswith("GET /health 200 · ") and lines[0].endswith(" ms"), out
    chat_ok, missing, streamed = lines[-3:]
    m = re.fullmatch(r"POST /v1/chat/completions 200 · (\d+)\+(\d+) tokens · (\d+) ms", chat_ok)
    assert m and int(m[1]) > 3 and 1 <= int(m[2]) <= 3, chat_ok
    assert re.fullmatch(r"POST /v1/chat/completions 404 · \d+ ms", missing), missing
    s = re.fullmatch(r"POST /v1/chat/completions 200 · (\d+)\+(\d+) tokens · \d+ ms", streamed)
    assert s and s[1] == m[1] and 1 <= int(s[2]) <= 3, streamed  # a stream is logged once it has ended


def test_quiet_serves_without_the_log(capsys):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ftkit.serve_log import with_request_log

    app = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"))])
    assert TestClient(with_request_log(app, quiet=True)).get("/x").status_code == 200
    assert TestClient(with_request_log(app)).get("/nope").status_code == 404
    err = capsys.readouterr().err
    assert "/x" not in err and re.fullmatch(r"GET /nope 404 · \d+ ms\n", err), err
