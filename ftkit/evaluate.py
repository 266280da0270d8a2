"""Generation-based checks: prompts with reference answers, scored by exact match, regex, accuracy,
macro-F1 over a label set, or ROUGE-L."""

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


METRICS = {
    "exact_match": lambda p, r, labels: exact_match(p, r),
    "regex": lambda p, r, labels: regex_match(p, r),
    "accuracy": lambda p, r, labels: accuracy(p, r, labels),
    "macro_f1": lambda p, r, labels: macro_f1(p, r, labels),
    "rouge_l": lambda p, r, labels: rouge_l(p, r),
}


def score(predictions: list[str], references: list[str], metrics: list[str] = ("exact_match",),
          labels: list[str] | None = None) -> dict[str, float]:
    """{metric: value} for each named metric; for "regex" the references are the patterns."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return {m: METRICS[m](predictions, references, labels) for m in metrics}


def generate_and_score(model, tok, prompts: list, references: list[str], metrics: list[str] = ("exact_match",),
                       labels: list[str] | None = None, max_new_tokens: int = 64,
                       batch_size: int = 8) -> tuple[dict[str, float], list[str]]:
    """Greedy, batched generation (ftkit.inference.generate, as `ftkit generate` does), then score()."""
    from ftkit.inference import generate

    predictions = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score(predictions, references, metrics, labels), predictions


def _same_length(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
