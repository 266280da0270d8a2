"""Generation-based checks: prompts with reference answers, scored by exact match, regex, accuracy,
macro-F1 over a label set, or ROUGE-L (METRICS: the names `ftkit eval --metric` and gates use)."""

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


def regex_extract_match(predictions: list[str], references: list[str], pattern: str) -> float:
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
                  max_new_tokens: int = 64, metrics: list[str] = ("exact_match",), regex: str | None = None,
                  labels: list[str] | None = None) -> dict:
    """Every metric the rows allow: loss/perplexity always; the reply metrics where rows have references.

    rows are canonical rows (ftkit.data.formats); references are the final assistant turns of chat rows.
    """
    from ftkit.data.tokenize import encode_rows

    encoded = encode_rows(rows, tok, template, train_on, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out: dict = {"rows": len(rows), **loss_and_perplexity(model, encoded, pad, batch_size)}
    chats = [r for r in rows if "messages" in r and r["messages"][-1]["role"] == "assistant"]
    if generate and chats:
        prompts, refs = prompts_and_references(chats)
        scores, preds = generate_and_score(model, tok, prompts, refs, metrics, labels, max_new_tokens, batch_size,
                                           pattern=regex)
        out.update(scores)
        out["samples"] = [{"prompt": p[-1]["content"], "reference": r, "generated": g}
                          for p, r, g in zip(prompts, refs, preds)]
    return out


# ---- task metrics. Counting is left to scikit-learn and rouge-score; this module only decides
# what a prediction means (normalization, which label it names) before handing it over.

def regex_match(predictions: list[str], patterns: list[str] | str) -> float:
    """Share of predictions in which the reference regex matches (re.search; a single pattern applies to all)."""
    import re

    if isinstance(patterns, str):
        patterns = [patterns] * len(predictions)
    if not patterns:
        return 0.0
    _same_length(predictions, patterns)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise UserError(f"regex {p!r} does not compile: {exc}") from None
    return sum(bool(c.search(pred)) for c, pred in zip(compiled, predictions)) / len(patterns)


OTHER = "<other>"  # a prediction that names none of the labels


def to_label(prediction: str, labels: list[str]) -> str:
    """The label a free-text prediction names: the whole reply (case-insensitive), else the label
    its first word is, else OTHER -- so "Positive." and "positive, clearly" count, a ramble does not."""
    folded = {normalize(label).casefold(): label for label in labels}
    text = normalize(prediction).casefold().strip(" .!\"'")
    if text in folded:
        return folded[text]
    first = text.split(" ", 1)[0].strip(".,;:!\"'") if text else ""
    return folded.get(first, OTHER)


def _labelled(predictions, references, labels):
    _same_length(predictions, references)
    labels = list(labels) if labels else sorted({normalize(r) for r in references})
    refs = [to_label(r, labels) for r in references]
    unknown = sorted({r for r, label in zip(references, refs) if label == OTHER})
    if unknown:
        raise UserError(f"references {unknown[:3]} are not in the label set {labels}")
    return [to_label(p, labels) for p in predictions], refs, labels


def accuracy(predictions: list[str], references: list[str], labels: list[str] | None = None) -> float:
    """Share of predictions naming the reference label (labels default to the references' distinct values)."""
    from sklearn.metrics import accuracy_score

    if not references:
        return 0.0
    preds, refs, _ = _labelled(predictions, references, labels)
    return float(accuracy_score(refs, preds))


def macro_f1(predictions: list[str], references: list[str], labels: list[str] | None = None) -> float:
    """F1 averaged over the label set with equal weight per label; a prediction outside the set is a miss."""
    from sklearn.metrics import f1_score

    if not references:
        return 0.0
    preds, refs, labels = _labelled(predictions, references, labels)
    return float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words), as rouge-score computes it."""
    from rouge_score import rouge_scorer

    if not references:
        return 0.0
    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def _regex(predictions: list[str], references: list[str], labels, pattern: str | None) -> float:
    # With a pattern, its first match in the reply is compared with its first match in the reference;
    # without one, each reference is itself the pattern the reply must match.
    return regex_extract_match(predictions, references, pattern) if pattern else regex_match(predictions, references)


METRICS = {
    "exact_match": lambda p, r, labels, pattern: exact_match(p, r),
    "regex": _regex,
    "accuracy": lambda p, r, labels, pattern: accuracy(p, r, labels),
    "macro_f1": lambda p, r, labels, pattern: macro_f1(p, r, labels),
    "rouge_l": lambda p, r, labels, pattern: rouge_l(p, r),
}


def score(predictions: list[str], references: list[str], metrics: list[str] = ("exact_match",),
          labels: list[str] | None = None, pattern: str | None = None) -> dict[str, float]:
    """{metric: value} for each named metric (see _regex for how "regex" reads its references)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return {m: METRICS[m](predictions, references, labels, pattern) for m in dict.fromkeys(metrics)}


def generate_and_score(model, tok, prompts: list, references: list[str], metrics: list[str] = ("exact_match",),
                       labels: list[str] | None = None, max_new_tokens: int = 64,
                       batch_size: int = 8, pattern: str | None = None) -> tuple[dict[str, float], list[str]]:
    """Greedy, batched generation (ftkit.inference.generate, as `ftkit generate` does), then score()."""
    from ftkit.inference import generate

    predictions = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score(predictions, references, metrics, labels, pattern), predictions


def _same_length(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
