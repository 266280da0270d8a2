"""The one-render span finder must give exactly the reference (render-every-prefix) spans."""

from __future__ import annotations

import random

import pytest

from ftkit.data.render import SpanFinder, assistant_spans, content_opaque
from ftkit.data.templates import ALPACA, CHATML
from ftkit.errors import UserError

TRIM = (  # Llama-3 style: contents are trimmed, so the fast path must stay off
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
COND = (  # literal text that depends on the content: not opaque
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if 'x' in m['content'] %}!{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
TWICE = "{% for m in messages %}{{ m.role + m.content + m.content + '|' }}{% endfor %}"
BRACKETS = (  # text between the header and the content that the generation prompt lacks
    "{% if messages[0]['role'] == 'system' %}{{ 'S: ' + messages[0]['content'] + '\n' }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ 'A: [' + m.content + ']' }}"
    "{% elif m.role == 'user' %}{{ 'U: ' + m.content }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)
TOJSON = "{% for m in messages %}{{ m | tojson }}{% endfor %}"

PIECES = ["", " ", "hi", "  padded  ", "x marks", "line\nbreak", "émoji 🎉", "中文字符", "<|im_end|>", "A: [",
          "\ue000 private", "\ue0010s\ue001", "}} {{ not jinja", "trailing\n\n"]


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(PIECES)}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(PIECES, k=rng.randint(1, 3)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(PIECES, k=rng.randint(1, 3)))})
        if rng.random() < 0.2:
            msgs.append({"role": "user", "content": rng.choice(PIECES)})
        out.append(msgs)
    return out


@pytest.fixture(scope="module")
def tok(tiny_model):
    from ftkit.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


def _reference(tok, template, msgs):
    try:
        return assistant_spans(tok, template, msgs, "t:1")
    except UserError as exc:
        return str(exc)


@pytest.mark.parametrize("name", ["tokenizer", "chatml", "alpaca", "trim", "cond", "twice", "brackets"])
def test_one_render_spans_equal_the_reference(tok, name):
    template = {"tokenizer": tok.chat_template, "chatml": CHATML, "alpaca": ALPACA, "trim": TRIM, "cond": COND,
                "twice": TWICE, "brackets": BRACKETS}[name]
    finder = SpanFinder(tok, template)
    for msgs in _conversations(300):
        try:
            got = finder(msgs, "t:1")
        except UserError as exc:
            got = str(exc)
        assert got == _reference(tok, template, msgs), msgs
    fast_shapes = [s for s, d in finder.shapes.items() if d is not None]
    if name in ("tokenizer", "chatml", "alpaca", "brackets"):
        assert finder.fast and len(fast_shapes) >= 4  # the fast path really ran, over many role sequences
    else:
        assert not fast_shapes


def test_content_opacity_is_decided_from_the_syntax_tree(tok):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    def opaque(t):
        return content_opaque(_compile_jinja_template(t).environment, t)

    assert opaque(CHATML) and opaque(ALPACA) and opaque(tok.chat_template) and opaque(BRACKETS)
    assert not opaque(TRIM) and not opaque(COND) and not opaque(TOJSON)
    assert not opaque("{% for m in messages %}{% if m.content %}{{ m.content }}{% endif %}{% endfor %}")
    assert not opaque("{% set ms = messages %}{% for m in ms %}{{ m.content }}{% endfor %}")
    assert not opaque("{% for m in messages %}{{ m[key] }}{% endfor %}")
    assert not opaque("{% for m in messages %}{% if loop.nextitem and loop.nextitem.content %}x{% endif %}"
                      "{{ m.content }}{% endfor %}")
    assert not opaque("{% for m in messages %}{{ loop.previtem | tojson }}{% endfor %}")
    assert not opaque("{% for m in messages %}{{ m.content[:10] }}{% endfor %}")


def test_boundary_token_labels_equal_full_offset_labels(tok):
    """The labels placed via char_to_token (two Rust calls per span) equal the labels from every
    token's offsets, also across emoji/CJK (several tokens per character) and odd whitespace."""
    from ftkit.data.tokenize import _encode, _Encoded, _labels_from_spans

    finder = SpanFinder(tok, CHATML)
    rendered = [finder(m, "t:1") for m in _conversations(200, seed=1)]
    encs = _encode(tok, [t for t, _ in rendered])
    for (text, spans), enc in zip(rendered, encs):
        fast = _labels_from_spans(enc, enc.ids, spans, len(text))
        via_offsets = _labels_from_spans(_Encoded(enc.ids, enc.offsets), enc.ids, spans, len(text))
        assert fast == via_offsets
        assert fast[1] == sum(lab != -100 for lab in fast[0])
