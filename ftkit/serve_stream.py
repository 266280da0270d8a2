"""A streamed reply of `ftkit serve` that tells when it is over, however it ends."""

from __future__ import annotations

from typing import Callable

from starlette.responses import StreamingResponse


class WatchedStream(StreamingResponse):
    """Calls `on_end` (idempotent) as soon as the client is gone, and once the stream is over however
    it ends. Without it a client that leaves mid-stream frees its batch row and queue slot only when
    the stream's generator next yields (never, while a reply is all special tokens or held back by
    a stop string) or when the garbage collector finds it."""

    def __init__(self, content, on_end: Callable[[], object], **kw):
        super().__init__(content, **kw)
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        async def watched() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.on_end()
            return message

        try:
            await super().__call__(scope, watched, send)
        finally:
            self.on_end()
