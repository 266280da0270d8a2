"""A streamed reply of `ftkit serve` that tells when it is over, however it ends."""

from __future__ import annotations

from typing import Callable

from starlette.responses import StreamingResponse


class WatchedStream(StreamingResponse):
    """Calls `on_end` once the stream is over: sent in full, its client gone, or cancelled. A client
    that leaves mid-stream otherwise frees its batch row and queue slot only when the garbage
    collector finds the abandoned generator (seconds, or never, when a traceback holds it)."""

    def __init__(self, content, on_end: Callable[[], object], **kw):
        super().__init__(content, **kw)
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()
