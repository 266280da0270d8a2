"""Canonical rows -> input_ids + labels, with loss only on the responses by default.

The chat template gives the character span of every assistant turn (`ftkit.data.render`);
tokens whose characters fall inside one (including its end-of-turn/EOS marker, so the model
learns to stop) keep their labels, every other token gets -100. Every assistant turn is
trained, not only the last.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from ftkit.data.render import SpanFinder
from ftkit.data.turns import chat_samples
from ftkit.errors import UserError

IGNORE = -100


@dataclass
class TokenStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    dropped_empty: int = 0  # of those, rows that had no trained token even before truncation
    dropped_examples: list[str] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    extra_samples: int = 0  # samples beyond one per row (templates that rewrite earlier turns)
    reference_rows: int = 0  # chat rows the fast render path sent to the reference method

    def summary(self) -> dict:
        lens = sorted(self.lengths)

        def pct(p):
            return lens[min(len(lens) - 1, int(p * (len(lens) - 1) + 0.5))] if lens else 0

        return {
            "rows": self.rows, "kept": self.kept, "truncated": self.truncated,
            "dropped_no_labels": self.dropped_no_labels, "dropped_empty": self.dropped_empty, "tokens": self.tokens,
            "trained_tokens": self.trained_tokens, "extra_samples": self.extra_samples,
            "reference_rows": self.reference_rows,
            "length_min": lens[0] if lens else 0, "length_median": pct(0.5), "length_p95": pct(0.95),
            "length_max": lens[-1] if lens else 0,
        }


def _labels_from_spans(enc, ids: list[int], spans, n_chars: int) -> tuple[list[int], int]:
    """Tokens whose first character lies inside a span keep their id; others get IGNORE.
    Returns the labels and how many tokens they train.

    Asks the Rust encoding for the two boundary tokens of each span (the first token starting
    at or after each edge) instead of converting every token's offsets to Python: that
    conversion alone cost as much as the chat rendering. Falls back to the offsets when a
    character belongs to no token."""
    labels = [IGNORE] * len(ids)
    trained, starts = 0, None
    char_to_token, token_to_chars, n = enc.char_to_token, enc.token_to_chars, len(ids)
    for a, b in spans:
        edges = []
        for pos in (a, b):
            if pos >= n_chars:
                edges.append(n)
                continue
            t = char_to_token(pos)
            if t is None:
                break
            edges.append(t if token_to_chars(t)[0] >= pos else t + 1)
        if len(edges) < 2:
            if starts is None:
                starts = [o[0] for o in enc.offsets]
            edges = [bisect_left(starts, a), bisect_left(starts, b)]
        i0, i1 = edges
        labels[i0:i1] = ids[i0:i1]
        trained += max(0, i1 - i0)
    return labels, trained


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


class _Encoded:
    """The slow tokenizer's answer shaped like a Rust Encoding (ids, offsets, char_to_token)."""

    def __init__(self, ids, offsets):
        self.ids, self.offsets = ids, offsets

    def char_to_token(self, pos):
        return None  # makes _labels_from_spans use the offsets

    def token_to_chars(self, t):
        return self.offsets[t]


def _encode(tokenizer, texts: list[str]) -> list:
    """Batched fast tokenization; the Rust backend directly when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [_Encoded(i, o) for i, o in zip(enc["input_ids"], enc["offset_mapping"])]


def _render_rows(rows: list[dict], template: str | None, spans_of, train_on: str,
                 train_on_reasoning: bool) -> tuple[list[dict], list[str], list, list]:
    """Rendered texts with their trained spans; a chat row may become several samples (rows repeat)."""
    out_rows, texts, spans_list, kinds = [], [], [], []
    for row in rows:
        if "messages" in row:
            if template is None:
                raise UserError(
                    f"{row['where']}: chat data but the tokenizer has no chat template; set data.template: chatml"
                )
            for text, spans in chat_samples(spans_of, row, train_on, train_on_reasoning):
                out_rows.append(row)
                texts.append(text)
                spans_list.append(spans)
                kinds.append(None)
            continue
        if "prompt" in row and not isinstance(row.get("completion"), str):
            # preference / unpaired / prompt-only rows: their TRL trainer tokenizes them, never this SFT path
            kind = ("preference pairs (ftkit dpo/orpo/rm)" if "chosen" in row else
                    "labelled replies (ftkit kto)" if "label" in row else "prompts only (ftkit rl)")
            raise UserError(f"{row['where']}: these rows are {kind}, not supervised data; sft and pt train on "
                            f"messages, prompt/completion or text rows (set data.format to one of those)")
        out_rows.append(row)
        if "prompt" in row:
            texts.append(row["prompt"] + row["completion"])
            spans_list.append([(len(row["prompt"]), len(row["prompt"]) + len(row["completion"]))])
            kinds.append("completion")
        else:
            texts.append(row["text"])
            spans_list.append([(0, len(row["text"]))])
            kinds.append("text")
    return out_rows, texts, spans_list, kinds


def _render_and_encode(rows: list[dict], tokenizer, template: str | None, stats: TokenStats, train_on: str,
                       train_on_reasoning: bool):
    """(row, text, encoding, spans, kind) in row order. (Overlapping the rendering with the
    Rust encoding in a thread was tried: with one render per row it lost more to contention than it hid.)"""
    spans_of = SpanFinder(tokenizer, template) if template is not None else None
    rows_out, texts, spans_list, kinds = _render_rows(rows, template, spans_of, train_on, train_on_reasoning)
    stats.extra_samples += len(rows_out) - len(rows)
    stats.reference_rows += spans_of.reference_rows if spans_of is not None else 0
    return zip(rows_out, texts, _encode(tokenizer, texts), spans_list, kinds)


def encode_rows(rows: list[dict], tokenizer, template: str | None, train_on: str, max_length: int,
                stats: TokenStats | None = None, truncation: str = "keep_start",
                train_on_reasoning: bool = True) -> list[dict]:
    """Tokenize canonical rows; drops (and counts) rows that keep no trained token."""
    stats = stats or TokenStats()
    if not rows:
        return []
    eos = _eos_id(tokenizer)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    out = []
    # Chat text carries its own special tokens from the template; raw text gets the tokenizer's.
    for row, text, enc, spans, kind in _render_and_encode(rows, tokenizer, template, stats, train_on,
                                                          train_on_reasoning):
        stats.rows += 1
        ids = enc.ids  # a fresh list (the Rust Encoding builds one per access)
        if train_on == "all":
            labels, trained = list(ids), len(ids)
        else:
            labels, trained = _labels_from_spans(enc, ids, spans, len(text))
        if kind is not None:  # raw text / completion: add BOS (if the model uses one) and EOS
            if bos is not None and (not ids or ids[0] != bos):
                ids, labels = [bos] + ids, [bos if train_on == "all" else IGNORE] + labels
                trained += train_on == "all"
            if eos is not None and (not ids or ids[-1] != eos):
                ids, labels, trained = ids + [eos], labels + [eos], trained + 1
        had_labels = trained > 0
        if len(ids) > max_length:
            stats.truncated += 1
            cut = slice(None, max_length) if truncation == "keep_start" else slice(len(ids) - max_length, None)
            ids, labels = ids[cut], labels[cut]
            trained = len(labels) - labels.count(IGNORE)
        if trained == 0:
            stats.dropped_no_labels += 1
            if not had_labels:
                stats.dropped_empty += 1
            if len(stats.dropped_examples) < 5:
                stats.dropped_examples.append(row["where"])
            continue
        stats.kept += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        stats.lengths.append(len(ids))
        out.append({"input_ids": ids, "labels": labels})
    return out
