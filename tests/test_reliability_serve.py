"""ftkit serve under hostile input: every bad or excess request is a prompt 4xx/503, never a 500 or a hang.

One in-process server (uvicorn in a thread, loopback, the tiny model) with small limits.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time

import pytest

from ftkit.serve import APIError, ChatRequest, Limits, parse_body

pytest.importorskip("fastapi")
LIMITS = Limits(max_body_bytes=4096, read_timeout_s=0.5, max_tokens=16, queue=1, request_timeout_s=1.0)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def test_deeply_nested_body_is_a_400():
    with pytest.raises(APIError) as info:
        parse_body(b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", ChatRequest)
    assert info.value.status == 400 and "nested too deeply" in info.value.message


@pytest.fixture(scope="module")
def served(tiny_model):
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.serve import Engine, _listen, build_app

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model), "tiny", limits=LIMITS)
    sock = _listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield engine, sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


def request(port: int, body, headers: dict | None = None) -> tuple[int, dict, dict, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = (resp.status, json.loads(resp.read()), dict(resp.getheaders()), time.monotonic() - t0)
    conn.close()
    return out


def test_a_valid_request_is_answered(served):
    status, body, _, _ = request(served[1], CHAT)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_huge_body_is_413_before_it_is_read(served):
    status, body, _, took = request(served[1], json.dumps({**CHAT, "pad": "x" * 10_000}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large" and took < 1
    with socket.create_connection(("127.0.0.1", served[1]), timeout=5) as s:  # a header promising 10 GB
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n{")
        assert s.recv(200).startswith(b"HTTP/1.1 413")


def test_stalled_client_gets_408(served):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", served[1]), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        reply = b""
        while b"}}" not in reply:  # headers and body may come in separate packets
            chunk = s.recv(300)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert LIMITS.read_timeout_s <= time.monotonic() - t0 < LIMITS.read_timeout_s + 1


def test_max_tokens_over_the_cap_is_400(served):
    status, body, _, _ = request(served[1], {**CHAT, "max_tokens": LIMITS.max_tokens + 1})
    assert status == 400 and body["error"]["code"] == "max_tokens_too_large" and body["error"]["param"] == "max_tokens"


def test_full_queue_is_503_with_retry_after(served):
    engine, port = served
    held = [engine.queue.admit() for _ in range(engine.queue.capacity)]  # a batch generating and `queue` waiting
    assert engine.queue.capacity == LIMITS.queue + LIMITS.max_batch
    try:
        status, body, headers, took = request(port, CHAT)
        assert status == 503 and body["error"]["code"] == "overloaded" and took < 1
        assert headers["retry-after"] == str(LIMITS.retry_after_s)
        assert request(port, {**CHAT, "max_tokens": 10**9})[0] == 400  # a bad request stays a 400 when full
    finally:
        for slot in held:
            slot.release()
    assert request(port, CHAT)[0] == 200  # the slots came back


def test_request_timeout_bounds_the_wait_and_the_generation(served):
    engine, port = served
    with engine.lock:  # the model is busy for longer than the request may wait
        status, body, _, took = request(port, CHAT)
    assert status == 503 and LIMITS.request_timeout_s <= took < LIMITS.request_timeout_s + 1
    slow = engine.model.register_forward_hook(lambda *_: time.sleep(0.2))  # ~5 tokens fit in the time
    try:
        status, body, _, took = request(port, {**CHAT, "max_tokens": 16})
    finally:
        slow.remove()
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] < 16 and took < LIMITS.request_timeout_s + 1


def test_cli_defaults_are_the_limits_defaults():
    import inspect

    from ftkit.commands.deploy import serve

    p, d = inspect.signature(serve).parameters, Limits()
    assert (p["max_tokens"].default.default, p["queue"].default.default, p["request_timeout"].default.default,
            p["max_body_kb"].default.default * 1024, p["read_timeout"].default.default,
            p["max_batch"].default.default, p["batch_wait_ms"].default.default) == \
        (d.max_tokens, d.queue, d.request_timeout_s, d.max_body_bytes, d.read_timeout_s, d.max_batch, d.batch_wait_ms)


def test_bad_requests_are_answered_at_once_while_a_batch_generates(served):
    """Validation never waits on generation: the bad requests are refused in the event loop while
    the model thread is busy (the tiny model's generate is mostly Python, so it holds the GIL)."""
    engine, port = served
    results: list = []
    long = threading.Thread(target=lambda: results.append(request(port, {**CHAT, "max_tokens": LIMITS.max_tokens})))
    slow = engine.model.register_forward_hook(lambda *_: [sum(range(20_000))] and None)  # a busy, GIL-holding step
    try:
        long.start()
        batches = engine.batcher.batches
        while not (engine.batcher.batches > batches and engine.lock.locked()):
            time.sleep(0.01)  # until the generation holds the model
        bad = [b'{"model": "tiny", "messages": [', {**CHAT, "max_tokens": 10**9}, {**CHAT, "messages": "hi"},
               {**CHAT, "model": "gpt-9"}, json.dumps({**CHAT, "pad": "x" * 10_000}).encode()]
        answers = [request(port, body) for body in bad * 2]
        busy = engine.lock.locked()
    finally:
        long.join(timeout=30)
        slow.remove()
    assert busy, "the generation ended before the bad requests did: the test proved nothing"
    assert [a[0] for a in answers] == [400, 400, 400, 404, 413] * 2
    print("bad-request latencies (s):", [round(a[3], 3) for a in answers])
    assert max(a[3] for a in answers) < 1, [round(a[3], 3) for a in answers]
    assert results and results[0][0] == 200


def test_generation_leaves_a_core_for_answering_requests():
    import torch

    from ftkit.serve import _cpu_threads

    before = torch.get_num_threads()
    try:
        assert (_cpu_threads(None, 2), _cpu_threads(None, 1), _cpu_threads(None, 16), _cpu_threads(3, 2)) == (1, 1, 15, 3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_stream_whose_client_leaves_frees_its_slot_and_row_at_once(served):
    """Even when the reply has no text to send yet (here: only special tokens, which are not shown),
    so the stream never reaches a point where it could notice the client is gone by itself."""
    engine, port = served
    silent = next(i for i in engine.tok.all_special_ids if i not in (engine.tok.eos_token_id, engine.tok.pad_token_id))

    def slow_and_silent(module, args, out):
        time.sleep(0.2)  # 16 tokens: over 3 s
        out.logits[..., :] = -1e9
        out.logits[..., silent] = 0.0
        return out

    hook = engine.model.register_forward_hook(slow_and_silent)
    engine.limits, batches = dataclasses.replace(LIMITS, request_timeout_s=30), engine.batcher.batches
    try:
        body = json.dumps({**CHAT, "stream": True, "max_tokens": LIMITS.max_tokens}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            while engine.batcher.batches == batches:  # until its row is generating
                time.sleep(0.01)
        t0 = time.monotonic()
        while (engine.queue.held or engine.lock.locked()) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        took = time.monotonic() - t0
    finally:
        hook.remove()
        engine.limits = LIMITS
    assert engine.queue.held == 0 and not engine.lock.locked() and took < 1.5, took  # a step or two, not 16
