"""One stderr line per finished HTTP request of `ftkit serve`: method, path, status, tokens, ms.

A plain ASGI wrapper around the whole app, so every answer is logged, errors and 500s included,
and a stream is logged when its last byte has gone (its tokens are known only then)."""

from __future__ import annotations

import sys
import time
from typing import Callable

USAGE_KEY = "ftkit.usage"  # scope key: a dict the endpoints fill with prompt_tokens/completion_tokens


def request_line(method: str, path: str, status: int, usage: dict, seconds: float) -> str:
    parts = [f"{method} {path} {status}"]
    if "prompt_tokens" in usage:
        parts.append(f"{usage['prompt_tokens']}+{usage.get('completion_tokens', 0)} tokens")
    parts.append(f"{seconds * 1000:.0f} ms")
    return " · ".join(parts)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class RequestLog:
    def __init__(self, app, write: Callable[[str], None] = _stderr):
        self.app, self.write = app, write

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, usage = time.perf_counter(), [500], {}
        scope[USAGE_KEY] = usage

        async def tap(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tap)
        finally:
            self.write(request_line(scope["method"], scope["path"], status[0], usage, time.perf_counter() - start))


def with_request_log(app, quiet: bool = False):
    """The app as served: wrapped in the request log unless `--quiet`."""
    return app if quiet else RequestLog(app)
