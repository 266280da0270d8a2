"""Response-only labels, checked token by token against an independent oracle on multi-turn samples."""

from __future__ import annotations

import pytest

from ftkit.data.templates import ALPACA, CHATML
from ftkit.data.tokenize import IGNORE, TokenStats, encode_rows

CONV = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "Ten, of course."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome!"},
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from ftkit.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


def _chatml_oracle(tok, ids: list[int]) -> list[int]:
    """Trained = every token after '<|im_start|>assistant\\n' up to and including '<|im_end|>' and its newline."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok.encode("assistant\n", add_special_tokens=False)
    newline = tok.encode("\n", add_special_tokens=False)
    labels, inside, i = [IGNORE] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i] == start and ids[i + 1 : i + 1 + len(header)] == header:
            inside, i = True, i + 1 + len(header)
            continue
        if inside:
            labels[i] = ids[i]
            if ids[i] == end:
                inside = False
                if ids[i + 1 : i + 1 + len(newline)] == newline:
                    labels[i + 1] = ids[i + 1]
                    i += 1
        i += 1
    return labels


@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_every_assistant_turn_trained_with_its_end_token_and_nothing_else(tok, template):
    tmpl = tok.chat_template if template == "tokenizer" else CHATML
    [enc] = encode_rows([{"messages": CONV, "where": "t:1"}], tok, tmpl, "responses", 4096)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids == tok.apply_chat_template(CONV, chat_template=tmpl, tokenize=True, return_dict=False)
    expected = _chatml_oracle(tok, ids)
    for i, (got, want) in enumerate(zip(labels, expected)):
        assert got == want, f"token {i} {tok.decode([ids[i]])!r}: label {got}, expected {want}"
    trained = tok.decode([t for t in labels if t != IGNORE])
    assert trained == "It is 5.<|im_end|>\nTen, of course.<|im_end|>\nYou are welcome!<|im_end|>\n"
    assert labels.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3  # each turn learns to stop


def test_alpaca_template_trains_responses_and_eos(tok):
    [enc] = encode_rows([{"messages": CONV[1:5], "where": "t:1"}], tok, ALPACA, "responses", 4096)
    trained = tok.decode([t for t in enc["labels"] if t != IGNORE])
    eos = tok.eos_token
    assert trained == f"It is 5.{eos}\n\nTen, of course.{eos}\n\n"
    prompt_part = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE])
    assert "What is 2 plus 3?" in prompt_part and "It is 5" not in prompt_part


def test_train_on_all_labels_everything(tok):
    [enc] = encode_rows([{"messages": CONV, "where": "t:1"}], tok, CHATML, "all", 4096)
    assert enc["labels"] == enc["input_ids"]


def test_completion_trains_completion_and_eos_only(tok):
    [enc] = encode_rows([{"prompt": "2+3=", "completion": " 5", "where": "t:1"}], tok, None, "responses", 64)
    trained = [t for t in enc["labels"] if t != IGNORE]
    assert tok.decode(trained) == " 5" + tok.eos_token
    assert enc["input_ids"][-1] == tok.eos_token_id


def test_truncation_policies_and_drop_counts(tok):
    rows = [{"messages": CONV, "where": "t:1"}, {"messages": CONV[:3], "where": "t:2"}]
    full = encode_rows(rows[:1], tok, CHATML, "responses", 4096)[0]
    st = TokenStats()
    [kept_start] = encode_rows(rows[:1], tok, CHATML, "responses", 40, st, "keep_start")
    assert kept_start["input_ids"] == full["input_ids"][:40] and st.truncated == 1
    [kept_end] = encode_rows(rows[:1], tok, CHATML, "responses", 40, TokenStats(), "keep_end")
    assert kept_end["input_ids"] == full["input_ids"][-40:] and kept_end["labels"] == full["labels"][-40:]
    # 12 tokens hold only the system prompt: no trained token survives -> dropped and counted, not silent
    st = TokenStats()
    out = encode_rows(rows, tok, CHATML, "responses", 12, st, "keep_start")
    assert out == [] and st.dropped_no_labels == 2 and st.dropped_examples == ["t:1", "t:2"]


def test_prepare_warns_with_counts_when_truncation_drops_rows(tmp_path, tok, chat_file):
    from conftest import write_recipe

    from ftkit.data import prepare
    from ftkit.recipe import load_recipe

    logs = []
    long = tmp_path / "long.jsonl"
    long.write_text(chat_file.read_text() + '{"messages": [{"role": "user", "content": "' + "word " * 200
                    + '"}, {"role": "assistant", "content": "ok"}]}\n', encoding="utf-8")
    r = load_recipe(write_recipe(tmp_path / "r.yaml", "x", long, data={"max_length": 60}))
    data = prepare(r, tok, log=logs.append, cache=False)
    assert data.train_stats.dropped_no_labels == 1 and len(data.train) == 12
    assert any("1 of 13 train rows dropped" in m and "data.max_length=60" in m for m in logs), logs
