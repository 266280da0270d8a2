"""Generation-based checks: prompts with reference answers, scored by exact match."""

from __future__ import annotations

from ftkit.errors import UserError


def prompts_and_references(rows: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """Split canonical chat rows into (conversation up to the last assistant turn, that turn's text)."""
    prompts, refs = [], []
    for row in rows:
        msgs = row.get("messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"{row.get('where', 'row')}: an eval row must be a conversation ending in an assistant turn")
        prompts.append(msgs[:-1])
        refs.append(msgs[-1]["content"])
    return prompts, refs


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / len(references)


def regex_match(predictions: list[str], references: list[str], pattern: str) -> float:
    """Fraction where the pattern's first match (group 1 if it has one) agrees in prediction and reference.

    E.g. pattern r"(-?\\d+)" scores the first number of a reply, ignoring the words around it.
    """
    import re

    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--regex {pattern!r}: not a valid regular expression: {exc}") from None

    def pick(text: str) -> str | None:
        m = rx.search(text)
        if m is None:
            return None
        return m.group(1) if rx.groups else m.group(0)

    if not references:
        return 0.0
    hits = sum(pick(r) is not None and pick(p) == pick(r) for p, r in zip(predictions, references))
    return hits / len(references)


def loss_and_perplexity(model, encoded: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Mean cross-entropy per trained token (labels != -100) and its exp, over tokenized rows."""
    import math

    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                     shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((shift_labels != -100).sum())
    if count == 0:
        raise UserError("eval: no tokens to score (every row lost its reply to truncation?)")
    mean = total / count
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_tokens": count}


def evaluate_rows(model, tok, rows: list[dict], template: str | None, max_length: int = 1024,
                  train_on: str = "responses", batch_size: int = 8, generate: bool = True,
                  max_new_tokens: int = 64, regex: str | None = None) -> dict:
    """Every metric the rows allow: loss/perplexity always; exact (and regex) match where rows have references.

    rows are canonical rows (ftkit.data.formats); references are the final assistant turns of chat rows.
    """
    from ftkit.data.tokenize import encode_rows

    encoded = encode_rows(rows, tok, template, train_on, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out: dict = {"rows": len(rows), **loss_and_perplexity(model, encoded, pad, batch_size)}
    chats = [r for r in rows if "messages" in r and r["messages"][-1]["role"] == "assistant"]
    if generate and chats:
        from ftkit.inference import generate as gen

        prompts, refs = prompts_and_references(chats)
        preds = gen(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out["exact_match"] = exact_match(preds, refs)
        if regex:
            out["regex_match"] = regex_match(preds, refs, regex)
        out["samples"] = [{"prompt": p[-1]["content"], "reference": r, "generated": g}
                          for p, r, g in zip(prompts, refs, preds)]
    return out
