"""ftkit serve under hostile input: every bad request is a 4xx, never a 500 or a hang."""

from __future__ import annotations

import pytest

from ftkit.serve import APIError, ChatRequest, parse_body


def test_deeply_nested_body_is_a_400():
    with pytest.raises(APIError) as info:
        parse_body(b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", ChatRequest)
    assert info.value.status == 400 and "nested too deeply" in info.value.message
