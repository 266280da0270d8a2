"""Fuzz `ftkit serve`'s request path short of generation: body -> schema -> prompt ids -> token budget -> stop gate.

Byte 0 picks the endpoint (even: /v1/chat/completions, odd: /v1/completions); the rest is the body.
The model is a stand-in with a config (generation is not fuzzed); the tokenizer and chat template are real.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from _harness import instrumented, main

with instrumented("ftkit"):
    from ftkit.serve import APIError, ChatRequest, CompletionRequest, Engine, TextGate, parse_body

ENGINE: list[Engine] = []


def _engine() -> Engine:
    if not ENGINE:
        from ftkit.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("smollm2-135m-instruct", log=lambda *_: None), False, None)
        model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
        ENGINE.append(Engine(model, tok, "m"))
    return ENGINE[0]


def one(data: bytes) -> None:
    if not data:
        return
    engine = _engine()
    try:
        if data[0] % 2 == 0:
            req = parse_body(data[1:], ChatRequest)
            ids = engine.chat_ids(req.messages)
            budget = engine.budget(len(ids), req.max_completion_tokens or req.max_tokens)
        else:
            req = parse_body(data[1:], CompletionRequest)
            texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            ids = [engine.text_ids(t) for t in texts][:1] or [[]]
            budget = engine.budget(len(ids[0]), req.max_tokens)
            ids = ids[0]
        assert budget >= 1
        gate = TextGate([req.stop] if isinstance(req.stop, str) else list(req.stop or []), strip=True)
        text = engine.tok.decode(ids[-64:])
        out = "".join(gate.feed(text[i:i + 3]) for i in range(0, len(text), 3)) + gate.finish()
        assert len(out) <= len(text)
    except APIError as exc:
        assert 400 <= exc.status < 500, exc.status  # a bad request is the client's: 4xx, never a 5xx


def write_seeds(out: Path) -> int:
    bodies = [b'\x00{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}',
              b'\x00{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", '
              b'"content": [{"type": "text", "text": "Hi"}]}], "stream": true, "stop": ["\\n", "."]}',
              b'\x01{"model": "m", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0.5}',
              b'\x01{"model": "m", "prompt": ["a", "b"], "stop": "x", "seed": 3}']
    for i, b in enumerate(bodies):
        (out / f"body-{i}").write_bytes(b)
    return len(bodies)


if __name__ == "__main__":
    main(one, write_seeds, _engine)
