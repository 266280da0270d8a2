"""`ftkit serve` under load and under hostile load, on loopback only, bounded in count and time.

    nice python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--seconds 20] [--hostile-clients 64]

1. Throughput: valid chat requests (max_tokens 16, greedy) from 1, 8 and 32 concurrent clients for
   --seconds each: requests/s and p50/p95 latency, once per --batch setting (a server started with
   `--max-batch N` each; default 8 = dynamic batching, then 1 = one request at a time), with the
   ratio of each level's requests/s to the last setting's. Requests past the queue get 503 +
   Retry-After and are counted apart.
2. Hostile (on a server with the first --batch setting): --hostile-clients concurrent clients, each sending --per-client requests of one kind
   (valid chat, valid stream, malformed JSON, 2 MB body, huge max_tokens, wrong types, a slow
   client that sends half a request and stalls, a client that leaves mid-stream).
   Checked: the server never dies, every bad request gets a 4xx within 1 s (a slow client's 408
   comes after the server's read timeout, by design), every valid one gets an answer (200, or 503
   with Retry-After when the queue is full), no connection is left open afterwards, and the
   server's memory ends within 10% of where it started the hostile phase.
Prints one JSON object; nothing is written unless --out is given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16}
BAD = {"malformed": b'{"model": "m", "messages": [', "huge_body": None, "huge_max_tokens": {**CHAT, "max_tokens": 10**9},
       "wrong_types": {"model": "m", "messages": "hello", "max_tokens": "lots"}}


def start(model: str, port: int, read_timeout: float, max_batch: int, threads: int | None,
          extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ftkit", "serve", model, "--port", str(port), "--name", "m",
           "--read-timeout", str(read_timeout), "--request-timeout", "60", "--quiet", "--max-batch", str(max_batch),
           *(["--threads", str(threads)] if threads else []), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            call(port, "GET", "/health", None)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def call(port: int, method: str, path: str, body, timeout: float = 120) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) before reading the whole body: its answer is still there
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_connections(port: int) -> int:
    """Established TCP connections to the server's port (from /proc/net/tcp*, loopback)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                n += 1
    return n


def throughput(port: int, clients: int, seconds: float) -> dict:
    latencies, busy, errors = [], 0, 0
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker():
        nonlocal busy, errors
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                status, _, _ = call(port, "POST", "/v1/chat/completions", CHAT)
            except OSError:  # a timeout or reset: counted, never fatal to the benchmark
                status = 0
            with lock:
                if status == 200:
                    latencies.append(time.monotonic() - t0)
                elif status == 503:
                    busy += 1
                    time.sleep(0.2)
                else:
                    errors += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: worker(), range(clients)))
    wall = time.monotonic() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {"clients": clients, "ok": len(latencies), "busy_503": busy, "errors": errors,
            "req_per_s": round(len(latencies) / wall, 2), "p50_s": round(statistics.median(latencies), 3)
            if latencies else None, "p95_s": round(q[18], 3)}


def slow_client(port: int, stall: float) -> tuple[int, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=stall + 30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{\"model\": \"m\"")
        reply = s.recv(64)
    return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0, time.monotonic() - t0


def leave_mid_stream(port: int) -> tuple[int, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        body = json.dumps({**CHAT, "stream": True, "max_tokens": 64}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reply = s.recv(64)  # the headers (or a 503): then hang up without reading the stream
    return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0, time.monotonic() - t0


def one_hostile(port: int, kind: str, read_timeout: float) -> tuple[str, int, float, bool]:
    """(kind, status, seconds, retry_after_present)."""
    if kind == "slow_client":
        return (kind, *slow_client(port, read_timeout), False)
    if kind == "leave_mid_stream":
        return (kind, *leave_mid_stream(port), False)
    body = {"valid_chat": CHAT, "valid_stream": {**CHAT, "stream": True}}.get(kind, BAD.get(kind))
    if kind == "huge_body":
        body = json.dumps({**CHAT, "pad": "x" * (2 << 20)}).encode()
    t0 = time.monotonic()
    status, _, headers = call(port, "POST", "/v1/chat/completions", body)
    return kind, status, time.monotonic() - t0, "retry-after" in headers


KINDS = ("valid_chat", "valid_stream", "malformed", "huge_body", "huge_max_tokens", "wrong_types", "slow_client",
         "leave_mid_stream")


def hostile(proc: subprocess.Popen, port: int, clients: int, per_client: int, read_timeout: float) -> dict:
    before = rss_mb(proc.pid)
    jobs = [KINDS[i % len(KINDS)] for i in range(clients)]
    def guarded(kind: str) -> tuple[str, int, float, bool]:
        t0 = time.monotonic()
        try:
            return one_hostile(port, kind, read_timeout)
        except OSError:  # no answer at all (reset or timed out): status 0
            return kind, 0, time.monotonic() - t0, False

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(lambda k: [guarded(k) for _ in range(per_client)], jobs) for r in rs]
    time.sleep(7)  # past uvicorn's 5 s keep-alive: what is still open now is hung
    by_kind: dict = {}
    for kind, status, took, retry in results:
        k = by_kind.setdefault(kind, {"n": 0, "statuses": {}, "max_s": 0.0, "503_without_retry_after": 0})
        k["n"] += 1
        k["statuses"][str(status)] = k["statuses"].get(str(status), 0) + 1
        k["max_s"] = round(max(k["max_s"], took), 3)
        k["503_without_retry_after"] += status == 503 and not retry and kind.startswith("valid")
    bad = [r for r in results if not r[0].startswith(("valid", "leave"))]
    late = [r for r in bad if r[2] > (read_timeout + 1 if r[0] == "slow_client" else 1)]
    return {"clients": clients, "requests": len(results), "by_kind": by_kind,
            "bad_not_4xx": sum(not 400 <= r[1] < 500 for r in bad), "bad_answered_late": len(late),
            "valid_unanswered": sum(r[1] not in (200, 503) for r in results if r[0].startswith("valid")),
            "server_alive": proc.poll() is None, "open_connections_after": open_connections(port),
            "rss_mb_before": round(before, 1), "rss_mb_after": round(rss_mb(proc.pid), 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, max_batch: int, hostile_phase: bool) -> dict:
    port = free_port()
    proc = start(args.model, port, args.read_timeout, max_batch, args.threads, args.serve_args.split())
    try:
        call(port, "POST", "/v1/chat/completions", CHAT)  # warm-up
        out = {"max_batch": max_batch,
               "throughput": [throughput(port, int(c), args.seconds) for c in args.levels.split(",")]}
        if hostile_phase:
            out["hostile"] = hostile(proc, port, args.hostile_clients, args.per_client, args.read_timeout)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seconds", type=float, default=20, help="per throughput level")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--batch", default="8,1", help="--max-batch settings compared; the last is the baseline")
    ap.add_argument("--threads", type=int, help="the server's --threads (default: its own, all cores but one)")
    ap.add_argument("--serve-args", default="", help="more `ftkit serve` options, e.g. '--batch-wait-ms 50'")
    ap.add_argument("--hostile-clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--read-timeout", type=float, default=2.0)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    result = {"model": args.model, "cpu_count": os.cpu_count(), "threads": args.threads, "serve_args": args.serve_args,
              "load_avg_start": [round(x, 1) for x in os.getloadavg()], "runs": []}
    for i, b in enumerate(int(x) for x in args.batch.split(",")):
        result["runs"].append(measure(args, b, hostile_phase=i == 0 and args.hostile_clients > 0))
    result["load_avg_end"] = [round(x, 1) for x in os.getloadavg()]
    base = result["runs"][-1]["throughput"]
    for run in result["runs"]:
        run["req_per_s_ratio_to_last"] = [round(t["req_per_s"] / b["req_per_s"], 2) if b["req_per_s"] else None
                                          for t, b in zip(run["throughput"], base)]
    h = result["runs"][0].get("hostile")
    if h:
        result["targets_met"] = (h["server_alive"] and h["bad_not_4xx"] == 0 and h["bad_answered_late"] == 0
                                 and h["valid_unanswered"] == 0 and h["open_connections_after"] == 0
                                 and h["rss_mb_after"] <= 1.1 * h["rss_mb_before"])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
