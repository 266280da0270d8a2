"""Canonical rows -> input_ids + labels, with loss only on the responses by default.

Assistant spans are found by rendering the conversation turn by turn with the chat
template; tokens whose characters fall inside an assistant turn (including its
end-of-turn/EOS marker, so the model learns to stop) keep their labels, every other
token gets -100. Every assistant turn is trained, not only the last.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

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

    def summary(self) -> dict:
        lens = sorted(self.lengths)

        def pct(p):
            return lens[min(len(lens) - 1, int(p * (len(lens) - 1) + 0.5))] if lens else 0

        return {
            "rows": self.rows, "kept": self.kept, "truncated": self.truncated,
            "dropped_no_labels": self.dropped_no_labels, "dropped_empty": self.dropped_empty, "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "length_min": lens[0] if lens else 0, "length_median": pct(0.5), "length_p95": pct(0.95),
            "length_max": lens[-1] if lens else 0,
        }


class Renderer:
    """Renders conversations with a chat template exactly as `apply_chat_template(tokenize=False)` does.

    Rendering dominates data prep (several renders per conversation to place the assistant
    spans), so it calls transformers' own compiled template directly and skips the per-call
    message normalisation, which our canonical rows (plain str dicts) do not need. The first
    render is checked against apply_chat_template; on any difference it uses that instead."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.compiled = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.compiled = _compile_jinja_template(template)
            self.kwargs = dict(tokenizer.special_tokens_map)
        except Exception:  # a transformers without it: the public path is only slower
            self.compiled = None
        self.checked = False

    def _slow(self, messages: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=gen)

    def __call__(self, messages: list[dict], gen: bool = False) -> str:
        if self.compiled is None:
            return self._slow(messages, gen)
        fast = self.compiled.render(messages=messages, add_generation_prompt=gen, **self.kwargs)
        if not self.checked:
            self.checked = True
            if fast != self._slow(messages, gen):
                self.compiled = None
                return self._slow(messages, gen)
        return fast


def _render(tokenizer, template: str, messages: list[dict], gen: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=gen)


def assistant_spans(tokenizer, template: str, messages: list[dict], where: str,
                    render=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn (each through its end-of-turn marker)."""
    if render is None:
        render = Renderer(tokenizer, template)
    full = render(messages)
    spans = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True) if i else ""
        through = full if i == last else render(messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(
                f"{where}: the chat template does not render turns as prefixes of the whole conversation "
                "(it rewrites earlier turns), so response-only labels cannot be placed; "
                "set data.train_on: all or choose another data.template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _labels_from_spans(offsets, ids, spans) -> list[int]:
    """Tokens whose first character lies inside a span keep their id; others get IGNORE."""
    starts = [o[0] for o in offsets]
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        i0, i1 = bisect_left(starts, a), bisect_left(starts, b)
        labels[i0:i1] = ids[i0:i1]
    return labels


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def _tokenize(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Batched fast tokenization with offsets; the Rust backend directly when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def encode_rows(rows: list[dict], tokenizer, template: str | None, train_on: str, max_length: int,
                stats: TokenStats | None = None, truncation: str = "keep_start") -> list[dict]:
    """Tokenize canonical rows; drops (and counts) rows that keep no trained token."""
    stats = stats or TokenStats()
    if not rows:
        return []
    texts, spans_list, prefix_lens = [], [], []
    render = Renderer(tokenizer, template) if template is not None else None
    for row in rows:
        if "messages" in row:
            if template is None:
                raise UserError(
                    f"{row['where']}: chat data but the tokenizer has no chat template; set data.template: chatml"
                )
            text, spans = assistant_spans(tokenizer, template, row["messages"], row["where"], render=render)
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
    all_ids, all_offsets = _tokenize(tokenizer, texts)
    eos = _eos_id(tokenizer)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    out = []
    for row, ids, offsets, spans, kind in zip(rows, all_ids, all_offsets, spans_list, prefix_lens):
        stats.rows += 1
        ids = list(ids)
        labels = list(ids) if train_on == "all" else _labels_from_spans(offsets, ids, spans)
        if kind is not None:  # raw text / completion: add BOS (if the model uses one) and EOS
            if bos is not None and (not ids or ids[0] != bos):
                ids, labels = [bos] + ids, [bos if train_on == "all" else IGNORE] + labels
            if eos is not None and (not ids or ids[-1] != eos):
                ids, labels = ids + [eos], labels + [eos]
        had_labels = labels.count(IGNORE) < len(labels)
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
