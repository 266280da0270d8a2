"""serve: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over a run dir, merged dir or base model.

One model, one worker thread driving it (a shared model is not safe to drive from two threads):
requests waiting for it are batched into one generate() call (ftkit/serve_batch.py).
Greedy requests use the same prompt rendering and generate() arguments as `ftkit generate`,
so the same request gives the same text. Every bad request gets OpenAI's error shape and a
4xx; streams end with an error event rather than a dropped connection.
"""


import json
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr

from ftkit import toolcalls
from ftkit.errors import UserError
from ftkit.serve_limits import Admission, APIError, Limits, Slot, parse_body, read_body, validation_message  # noqa: F401

DEFAULT_MAX_TOKENS = 512  # when a request names none; OpenAI's "up to the context" is minutes on a CPU
STREAM_STALL_S = 300  # a stream gives up if the generation thread produces nothing for this long
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---- request schemas: unknown OpenAI fields are accepted and ignored; known ones are type-checked strictly.

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: StrictStr


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None


class StreamOptions(_Open):
    include_usage: StrictBool = False


class _Sampling(_Open):
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per request")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None
    logprobs: Union[StrictBool, StrictInt, None] = None
    _gone: threading.Event = PrivateAttr(default_factory=threading.Event)  # set when the client leaves


class ToolFunction(_Open):
    name: StrictStr


class Tool(_Open):
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Union[StrictStr, dict, None] = None  # checked against the tools by toolcalls.choose
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr]]


# ---- generation

@dataclass
class Outcome:
    completion_tokens: int = 0
    finish_reason: str = "stop"


class TextGate:
    """Turns streamed pieces into the final text incrementally: trims like `ftkit generate` (strip)
    and cuts at stop strings, holding back only what a later piece could still change."""

    def __init__(self, stops: list[str], strip: bool):
        self.stops, self.strip = [s for s in stops if s], strip
        self.buf, self.started, self.stopped = "", not strip, False

    def feed(self, piece: str) -> str:
        self.buf += piece
        if not self.started:
            self.buf = self.buf.lstrip()
            self.started = bool(self.buf)
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out = self.buf[: min(hits)]
            self.buf = ""
            return out.rstrip() if self.strip else out
        keep = len(self.buf) - len(self.buf.rstrip()) if self.strip else 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out.rstrip() if self.strip else out


@dataclass
class Engine:
    model: object
    tok: object
    name: str
    aliases: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        from ftkit.serve_batch import Batcher

        self.queue = Admission(self.limits)
        # Rows end where generate() ends them: at the tokenizer's eos (as `ftkit generate` asks), else
        # at the generation config's.
        eos = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else _eos_ids(self.tok, self.model)
        self.batcher = Batcher(self.model, self.tok, self.lock, eos,
                               max_batch=self.limits.max_batch, wait_s=self.limits.batch_wait_ms / 1000,
                               admitted=lambda: self.queue.held)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def check_model(self, requested: str) -> None:
        if requested != self.name and requested not in self.aliases:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{self.name}`.",
                           param="model", code="model_not_found")

    def chat_ids(self, messages: list[Message], tools: list[dict] | None = None, prefill: str = "") -> list[int]:
        """The prompt's token ids; `prefill` (the reply's forced start) follows the generation prompt."""
        from ftkit.inference import render_prompt
        from ftkit.toolcalls import request_messages

        msgs = []
        for m in messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            extra = {k: v for k, v in (m.model_extra or {}).items() if k in ("tool_calls", "tool_call_id", "name")}
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text, **extra})
        try:
            text = render_prompt(self.tok, request_messages(msgs), tools)
        except Exception as exc:  # the model's own template rejected the conversation (e.g. role order)
            raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
        return self.tok(text + prefill, add_special_tokens=False)["input_ids"]

    def text_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt)["input_ids"]

    def budget(self, prompt_len: int, requested: int | None) -> int:
        room = self.context_length - prompt_len
        if requested is None:
            if room < 1:
                raise APIError(400, f"This model's maximum context length is {self.context_length} tokens; the "
                                    f"prompt has {prompt_len}.", param="messages", code="context_length_exceeded")
            return min(DEFAULT_MAX_TOKENS, room)
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                                f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                                "for the completion).", param="max_tokens", code="context_length_exceeded")
        self.check_max_tokens(requested)
        return requested

    def check_max_tokens(self, requested: int | None) -> None:
        """Before a request takes a queue slot: a huge max_tokens is a 400 at once, never a 503."""
        if requested is not None and requested > self.context_length:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                                f"requested {requested} tokens for the completion alone.", param="max_tokens",
                           code="context_length_exceeded")
        if requested is not None and requested > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most {self.limits.max_tokens} "
                                f"new tokens per request (ftkit serve --max-tokens)", param="max_tokens",
                           code="max_tokens_too_large")

    def stream(self, ids: list[int], max_tokens: int, req: _Sampling, strip: bool, outcome: Outcome) -> Iterator[str]:
        """Text pieces of one completion, generated by the batcher (alone or beside other requests);
        fills `outcome` at the end."""
        from ftkit.serve_batch import Job

        job = Job(ids, max_tokens, req.temperature, req.top_p, req.seed,
                  deadline=time.monotonic() + self.limits.request_timeout_s, gone=req._gone)
        self.batcher.submit(job)
        if not job.started.wait(self.limits.request_timeout_s) and self.batcher.withdraw(job):
            raise self.limits.busy(f"no turn at the model within {self.limits.request_timeout_s:g} s")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        gate = TextGate(stops, strip=strip)
        try:
            yield from _pieces(job, gate)
        finally:
            job.cancel.set()  # the client left or a stop string matched: its row stops at the next token
        new = job.tokens
        outcome.completion_tokens = len(new)
        hit_eos = bool(new) and new[-1] in _eos_ids(self.tok, self.model)
        cut = (len(new) >= max_tokens or job.timed_out) and not hit_eos and not gate.stopped
        outcome.finish_reason = "length" if cut else "stop"  # a request out of time is cut short like max_tokens


def _pieces(job, gate: TextGate) -> Iterator[str]:
    """A job's text through the gate until its end; after a stop string, waits for the row to stop
    (one token) so the token count is final."""
    from ftkit.serve_batch import DONE

    while True:
        item = job.pieces.get(timeout=STREAM_STALL_S)
        if item is DONE:
            break
        if isinstance(item, BaseException):
            raise item
        if gate.stopped:
            continue
        text = gate.feed(item)
        if text:
            yield text
        if gate.stopped:
            job.cancel.set()
    if not gate.stopped:
        tail = gate.finish()
        if tail:
            yield tail


def _eos_ids(tok, model) -> set:
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return ids - {None}


# ---- the app

def _error(exc: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _install_errors_and_auth(app, api_key: str | None) -> None:
    """Every failure answers in OpenAI's error shape; with an API key, every request must carry it."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return _error(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return _error(APIError(401, "Incorrect API key provided.", type_="invalid_request_error",
                                       code="invalid_api_key"))
        return await call_next(request)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _whole_reply(engine: Engine, kind: str, rid: str, now: int, req: _Sampling, prompts: list[list[int]],
                 budgets: list[int], strip: bool, prefill: str | None) -> dict:
    choices, completion = [], 0
    for i, (ids, budget) in enumerate(zip(prompts, budgets)):
        outcome = Outcome()
        text = "".join(engine.stream(ids, budget, req, strip, outcome))
        completion += outcome.completion_tokens
        body = ({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
        if prefill is not None:  # OpenAI tool_calls, parsed by the template's markers
            body["message"], called = toolcalls.message(prefill + text, engine.tok.chat_template)
            outcome.finish_reason = "tool_calls" if called else outcome.finish_reason
        choices.append({"index": i, **body, "logprobs": None, "finish_reason": outcome.finish_reason})
    prompt_tokens = sum(len(p) for p in prompts)
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": now,
            "model": engine.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


def _stream_events(engine: Engine, kind: str, rid: str, now: int, req: _Sampling, prompts: list[list[int]],
                   budgets: list[int], strip: bool, usage: dict, slot: Slot, prefill: str | None):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False, delta: dict | None = None) -> dict:
        if kind == "chat":
            delta = delta or ({"role": "assistant", "content": ""} if first else ({"content": text} if text else {}))
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": now, "model": engine.name, "choices": [choice]}

    completion = 0
    try:
        for i, (ids, budget) in enumerate(zip(prompts, budgets)):
            if kind == "chat":
                yield _sse(chunk(i, None, None, first=True))
            outcome = Outcome()
            if prefill is not None:  # content streams; calls stream as they are written (toolcalls.ToolStream)
                called: dict = {}
                for delta in toolcalls.stream_deltas(engine.stream(ids, budget, req, strip, outcome),
                                                     engine.tok.chat_template, called, prefill):
                    yield _sse(chunk(i, None, None, delta=delta))
                outcome.finish_reason = "tool_calls" if called["tool_calls"] else outcome.finish_reason
            else:
                for piece in engine.stream(ids, budget, req, strip, outcome):
                    yield _sse(chunk(i, piece, None))
            completion += outcome.completion_tokens
            usage["completion_tokens"] = completion
            yield _sse(chunk(i, None, outcome.finish_reason))
        if req.stream_options and req.stream_options.include_usage:
            p = sum(len(x) for x in prompts)
            yield _sse({"id": rid, "object": obj, "created": now, "model": engine.name, "choices": [],
                        "usage": {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}})
    except APIError as exc:
        yield _sse(exc.body())
    except Exception as exc:  # headers are out: report in-band, then end the stream cleanly
        yield _sse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").body())
    finally:
        slot.release()
    yield "data: [DONE]\n\n"


def _respond(engine: Engine, kind: str, req: _Sampling, prompts: list[list[int]], max_tokens: int | None,
             strip: bool, usage: dict, slot: Slot, prefill: str | None = None):
    """`prefill`: None when no tools are offered, else the reply's forced start ("" for none); replies
    are then parsed for tool calls."""
    from ftkit.serve_stream import WatchedStream

    engine.check_model(req.model)
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by ftkit serve", param="logprobs")
    budgets = [engine.budget(len(ids), max_tokens) for ids in prompts]
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    now = int(time.time())
    usage.update(prompt_tokens=sum(len(ids) for ids in prompts), completion_tokens=0)  # for the request log
    if not req.stream:
        reply = _whole_reply(engine, kind, rid, now, req, prompts, budgets, strip, prefill)
        usage.update(reply["usage"])
        return reply
    events = _stream_events(engine, kind, rid, now, req, prompts, budgets, strip, usage, slot, prefill)
    weakref.finalize(events, slot.release)  # in case the response is never sent at all
    return WatchedStream(events, on_end=lambda: (req._gone.set(), slot.release()), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _admitted(engine: Engine, handler, request, schema):
    """Parse within the body limits, take a queue slot, run handler in the worker pool (generation
    blocks; the event loop keeps answering). A stream releases its slot when it ends."""
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    req = parse_body(await read_body(request, engine.limits), schema)
    engine.check_model(req.model)  # every check that needs no model runs here, before a queue slot
    engine.check_max_tokens(getattr(req, "max_completion_tokens", None) or req.max_tokens)
    slot = engine.queue.admit()
    try:
        result = await run_in_threadpool(handler, req, _usage(request), slot)
    except BaseException:
        slot.release()
        raise
    if not isinstance(result, StreamingResponse):
        slot.release()
    return result


def _usage(request) -> dict:
    """Where a request's token counts go for the request log (a throwaway dict when nothing logs)."""
    from ftkit.serve_log import USAGE_KEY

    return request.scope.get(USAGE_KEY, {})


def build_app(engine: Engine, api_key: str | None = None):
    from fastapi import FastAPI, Request

    app = FastAPI(title="ftkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    _install_errors_and_auth(app, api_key)

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "ftkit"}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        engine.check_model(model_id)
        return model_card()

    def chat(req: ChatRequest, usage: dict, slot: Slot):
        engine.check_model(req.model)
        try:
            tools, must_call = toolcalls.choose(req.tool_choice, [t.model_dump() for t in req.tools or []])
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        prefill = toolcalls.prefill(engine.tok.chat_template, must_call) if tools else None
        prompts = [engine.chat_ids(req.messages, tools, prefill or "")]
        return _respond(engine, "chat", req, prompts, req.max_completion_tokens or req.max_tokens, True, usage, slot,
                        prefill)

    def completion(req: CompletionRequest, usage: dict, slot: Slot):
        engine.check_model(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        prompts = [engine.text_ids(t) for t in texts]
        # Raw continuation keeps its leading space ("The capital is" -> " Paris"), unlike a chat reply.
        return _respond(engine, "completion", req, prompts, req.max_tokens, False, usage, slot)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _admitted(engine, chat, request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _admitted(engine, completion, request, CompletionRequest)

    return app


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _cpu_threads(requested: int | None, cores: int) -> int:
    """Generation threads on a CPU: by default all cores but one, which stays free for the event loop
    (parsing and refusing requests) and tokenizing. Measured on 2 shared cores under load: torch's
    default (a thread per core) made a 16-token reply 14x slower than one thread, because its
    threads spin waiting for each other whenever the scheduler parks one (docs/reliability.md)."""
    import torch

    n = requested or max(1, cores - 1)
    torch.set_num_threads(n)
    return n


def serve(target: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, base: str | None = None, log=print, quiet: bool = False,
          limits: Limits = Limits(), threads: int | None = None) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("ftkit serve needs FastAPI and uvicorn: pip install 'ftkit[serve]'") from None
    from pathlib import Path

    from ftkit.hardware import detect
    from ftkit.inference import load_for_inference
    from ftkit.serve_log import with_request_log

    if not 0 <= port <= 65535:
        raise UserError(f"--port: {port} is not a TCP port (0-65535)")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key: empty; give a key or leave the option out")
    _listen(host, port).close()  # fail fast on a taken port, before a minute of model loading
    # A clean exit on SIGTERM too: uvicorn shuts down gracefully, then re-raises the signal here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    hw = detect()
    if hw.device == "cpu":
        _cpu_threads(threads, hw.threads)
    model, tok = load_for_inference(target, dtype=hw.dtype, base=base, log=log)
    path = Path(target).expanduser()
    served = name or (path.resolve().name if path.exists() else target)
    engine = Engine(model, tok, served, aliases={target}, limits=limits)
    app = build_app(engine, api_key=api_key)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    if host not in LOOPBACK and api_key is None:
        log(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this port can use it")
    log(f"serving [bold]{served}[/] on http://{host}:{bound}/v1 (OpenAI-compatible; model id {served!r})"
        + (" · api key required" if api_key else "") + " · Ctrl-C to stop")
    # limit_concurrency bounds open connections (a flood of idle sockets), far above the request queue.
    config = uvicorn.Config(with_request_log(app, quiet), log_level="warning", timeout_graceful_shutdown=5,
                            lifespan="off", timeout_keep_alive=5, limit_concurrency=max(256, 4 * (limits.queue + 1)))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        log("server stopped")
