"""Fuzz `ftkit serve`'s request path short of generation: body -> schema -> tools/tool_choice -> prompt ids
-> token budget -> stop gate, and the parsing of a reply's tool calls (whole and streamed).

Byte 0 picks the path (mod 4): 0 /v1/chat/completions with the model's own template (SmolLM2's, which
cannot show tools), 1 /v1/completions, 2 chat with the built-in chatml-tools template, 3 the rest is a
model's reply, parsed for tool calls as a whole and streamed in 3-character pieces. The model is a
stand-in with a config (generation is not fuzzed); the tokenizer and chat templates are real.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from _harness import instrumented, main

with instrumented("ftkit"):
    from ftkit import toolcalls
    from ftkit.serve import APIError, ChatRequest, CompletionRequest, Engine, TextGate, parse_body

ENGINE: list[Engine] = []


def _engine(tools_template: bool = False) -> Engine:
    """[0]: the embedded model's own template; [1]: the same tokenizer with chatml-tools."""
    if not ENGINE:
        import copy

        from ftkit.data.templates import CHATML_TOOLS
        from ftkit.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("smollm2-135m-instruct", log=lambda *_: None), False, None)
        model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
        tools_tok = copy.deepcopy(tok)
        tools_tok.chat_template = CHATML_TOOLS
        ENGINE.extend([Engine(model, tok, "m"), Engine(model, tools_tok, "m")])
    return ENGINE[int(tools_template)]


def _reply(text: str) -> None:
    """A model's reply parsed for tool calls: whole (non-streamed) and streamed must both hold up."""
    template = _engine(True).tok.chat_template
    msg, called = toolcalls.message(text, template)
    assert called == bool(msg.get("tool_calls"))
    finish: dict = {}
    deltas = list(toolcalls.stream_deltas((text[i:i + 3] for i in range(0, len(text), 3)), template, finish))
    for d in deltas:
        for call in d.get("tool_calls") or []:
            assert isinstance(call["index"], int)


def one(data: bytes) -> None:
    if not data:
        return
    path = data[0] % 4
    if path == 3:
        _reply(data[1:].decode("utf-8", "replace"))
        return
    engine = _engine(tools_template=path == 2)
    try:
        if path != 1:
            req = parse_body(data[1:], ChatRequest)
            try:  # as serve's chat handler does
                tools, must_call = toolcalls.choose(req.tool_choice, [t.model_dump() for t in req.tools or []])
            except ValueError:
                return  # answered 400 naming tool_choice
            prefill = toolcalls.prefill(engine.tok.chat_template, must_call) if tools else ""
            ids = engine.chat_ids(req.messages, tools, prefill)
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
              b'\x01{"model": "m", "prompt": ["a", "b"], "stop": "x", "seed": 3}',
              b'\x02{"model": "m", "messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", '
              b'"content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", '
              b'"arguments": "{\\"city\\": \\"Oslo\\"}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "4 C"}], '
              b'"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
              b'"properties": {"city": {"type": "string"}}}}}], "tool_choice": "required"}',
              b'\x02{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", '
              b'"function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "f"}}}',
              b'\x03Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
              b'\x03<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "\\u00e9"}]}}\n</tool_call><tool_call>{"name"']
    for i, b in enumerate(bodies):
        (out / f"body-{i}").write_bytes(b)
    return len(bodies)


if __name__ == "__main__":
    main(one, write_seeds, _engine)
