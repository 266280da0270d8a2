"""Canonical rows -> input_ids + labels, with loss only on the responses by default.

Assistant spans are found by rendering the conversation turn by turn with the chat
template; tokens whose characters fall inside an assistant turn (including its
end-of-turn/EOS marker, so the model learns to stop) keep their labels, every other
token gets -100. Every assistant turn is trained, not only the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftkit.errors import UserError

IGNORE = -100


@dataclass
class TokenStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    dropped_examples: list[str] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        lens = sorted(self.lengths)

        def pct(p):
            return lens[min(len(lens) - 1, int(p * (len(lens) - 1) + 0.5))] if lens else 0

        return {
            "rows": self.rows, "kept": self.kept, "truncated": self.truncated,
            "dropped_no_labels": self.dropped_no_labels, "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "length_min": lens[0] if lens else 0, "length_median": pct(0.5), "length_p95": pct(0.95),
            "length_max": lens[-1] if lens else 0,
        }


def _render(tokenizer, template: str, messages: list[dict], gen: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=gen)


def assistant_spans(tokenizer, template: str, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn."""
    full = _render(tokenizer, template, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], gen=True) if i else ""
        through = _render(tokenizer, template, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(
                f"{where}: the chat template does not render turns as prefixes of the whole conversation "
                "(it rewrites earlier turns), so response-only labels cannot be placed; "
                "set data.train_on: all or choose another data.template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _labels_from_spans(offsets, ids, spans) -> list[int]:
    labels = []
    j = 0
    for tid, (start, _end) in zip(ids, offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        inside = j < len(spans) and spans[j][0] <= start < spans[j][1]
        labels.append(tid if inside else IGNORE)
    return labels


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def encode_rows(rows: list[dict], tokenizer, template: str | None, train_on: str, max_length: int,
                stats: TokenStats | None = None) -> list[dict]:
    """Tokenize canonical rows; drops (and counts) rows that keep no trained token."""
    stats = stats or TokenStats()
    if not rows:
        return []
    texts, spans_list, prefix_lens = [], [], []
    for row in rows:
        if "messages" in row:
            if template is None:
                raise UserError(
                    f"{row['where']}: chat data but the tokenizer has no chat template; set data.template: chatml"
                )
            text, spans = assistant_spans(tokenizer, template, row["messages"], row["where"])
            texts.append(text)
            spans_list.append(spans)
            prefix_lens.append(None)
        elif "prompt" in row:
            texts.append(row["prompt"] + row["completion"])
            spans_list.append([(len(row["prompt"]), len(row["prompt"]) + len(row["completion"]))])
            prefix_lens.append("completion")
        else:
            texts.append(row["text"])
            spans_list.append([(0, len(row["text"]))])
            prefix_lens.append("text")
    # Chat text carries its own special tokens from the template; raw text gets the tokenizer's.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = _eos_id(tokenizer)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    out = []
    for row, ids, offsets, spans, kind in zip(rows, enc["input_ids"], enc["offset_mapping"], spans_list, prefix_lens):
        stats.rows += 1
        ids, offsets = list(ids), list(offsets)
        labels = _labels_from_spans(offsets, ids, spans)
        if kind is not None:  # raw text / completion: add BOS (if the model uses one) and EOS
            if bos is not None and (not ids or ids[0] != bos):
                ids, labels = [bos] + ids, [IGNORE] + labels
            if eos is not None and (not ids or ids[-1] != eos):
                ids, labels = ids + [eos], labels + [eos]
        if train_on == "all":
            labels = list(ids)
        if len(ids) > max_length:
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(1 for lab in labels if lab != IGNORE)
        if trained == 0:
            stats.dropped_no_labels += 1
            if len(stats.dropped_examples) < 5:
                stats.dropped_examples.append(row["where"])
            continue
        stats.kept += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        stats.lengths.append(len(ids))
        out.append({"input_ids": ids, "labels": labels})
    return out
