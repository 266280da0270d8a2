"""What one client of `ftkit serve` can cost the server, and the checks that keep it bounded.

Every bad or excess request is refused in well under a second, in OpenAI's error shape: a body
too large (413, by its header before reading, or by count), a body that stalls (408), JSON
nested too deeply (400), more new tokens than allowed (400), a full queue (503 + Retry-After),
and a request past its time (its generation stops; finish_reason "length").
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 413 above this (a chat request is a few kB)
    read_timeout_s: float = 10.0  # 408 when the body has not fully arrived by then (a stalled client)
    max_tokens: int = 2048  # 400 when a request asks for more new tokens than this
    queue: int = 16  # requests admitted beyond those generating; more get 503 + Retry-After at once
    request_timeout_s: float = 300.0  # a request's wait for the model plus its generation
    retry_after_s: int = 5
    max_batch: int = 8  # waiting requests generated together in one batch (1: one at a time)
    batch_wait_ms: float = 10.0  # how long a request waits for others to join its batch when the model is idle

    def busy(self, why: str) -> APIError:
        return APIError(503, f"the server is busy ({why}); retry in {self.retry_after_s} s", type_="server_error",
                        code="overloaded", headers={"Retry-After": str(self.retry_after_s)})


class Slot:
    """One admitted request's place; released once, whichever of finish, error or garbage collection comes first."""

    def __init__(self, free):
        self._free, self._guard, self._held = free, threading.Lock(), True

    def release(self) -> None:
        with self._guard:
            if self._held:
                self._held = False
                self._free()


class Admission:
    """A bounded queue: a batch (up to `limits.max_batch`) generating and `limits.queue` waiting;
    the next gets a 503 at once."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.capacity = limits.queue + max(1, limits.max_batch)
        self._sem = threading.BoundedSemaphore(self.capacity)
        self._count = threading.Lock()
        self.held = 0  # admitted requests not yet finished (the batcher reads it to wait for arrivals)

    def admit(self) -> Slot:
        if not self._sem.acquire(blocking=False):
            raise self.limits.busy(f"{self.limits.queue} requests already waiting")
        with self._count:
            self.held += 1
        return Slot(self._free)

    def _free(self) -> None:
        with self._count:
            self.held -= 1
        self._sem.release()


async def read_body(request, limits: Limits) -> bytes:
    """The body, refused early: 413 past max_body_bytes (by header or by count), 408 when it stalls."""
    import asyncio

    from starlette.requests import ClientDisconnect

    too_big = APIError(413, f"The request body is larger than this server accepts ({limits.max_body_bytes:,} bytes).",
                       code="request_too_large")
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limits.max_body_bytes:
        raise too_big

    async def collect() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise too_big
        return bytes(body)

    try:
        return await asyncio.wait_for(collect(), limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {limits.read_timeout_s:g} s.",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(400, "The client disconnected before sending the whole request.") from None


def validation_message(errors: list) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    where = ".".join(loc) or "body"
    if first.get("type") == "missing":
        return f"Missing required parameter: '{where}'.", (loc[0] if loc else None)
    return f"Invalid value for '{where}': {first.get('msg', 'invalid')}", (loc[0] if loc else None)


def parse_body(raw: bytes, schema):
    """A request body as `schema`, or an APIError 400. Parsed by hand so a missing or wrong
    Content-Type still gets JSON semantics, as OpenAI's API does."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request.") from None
    except RecursionError:  # [[[[... a few hundred kB deep: a 400, not a 500
        raise APIError(400, "The JSON body of your request is nested too deeply.") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise APIError(400, message, param=param) from None
