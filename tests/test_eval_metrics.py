"""Task metrics against values worked out by hand (in the comments), and the batched scorer."""

from __future__ import annotations

import pytest

from ftkit.errors import UserError
from ftkit.evaluate import (OTHER, accuracy, exact_match, generate_and_score, macro_f1, regex_match, rouge_l, score,
                            to_label)

LABELS = ["positive", "negative", "neutral"]
REFS = ["positive", "positive", "negative", "negative", "neutral", "neutral"]
# -> positive, negative, negative, negative, OTHER ("i" is no label), neutral
PREDS = ["Positive.", "negative", "NEGATIVE", "negative, clearly", "I think neutral", "neutral"]


def test_exact_match_normalizes_whitespace_only():
    assert exact_match(["4", " 5 ", "six", "Four"], ["4", "5", "6", "four"]) == pytest.approx(2 / 4)


def test_regex_match_per_row_and_shared_pattern():
    preds = ["The answer is 42", "answer: 7", "none of them"]
    assert regex_match(preds, [r"\b42\b", r"\b8\b", r"^none"]) == pytest.approx(2 / 3)
    assert regex_match(preds, r"answer") == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="does not compile"):
        regex_match(["x"], ["("])


def test_prediction_to_label():
    assert [to_label(p, LABELS) for p in PREDS] == ["positive", "negative", "negative", "negative", OTHER, "neutral"]


def test_accuracy_by_hand():
    # right on rows 0, 2, 3, 5 -> 4/6
    assert accuracy(PREDS, REFS, LABELS) == pytest.approx(4 / 6)


def test_macro_f1_by_hand():
    # positive: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3
    # negative: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 4/5
    # neutral:  TP 1, FP 0, FN 1 -> F1 2/3   (the OTHER prediction is a miss, not a fourth class)
    assert macro_f1(PREDS, REFS, LABELS) == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 3)


def test_macro_f1_weighs_labels_equally():
    refs = ["a"] * 8 + ["b"] * 2
    preds = ["a"] * 10  # always the majority label
    # a: P 8/10, R 1 -> F1 8/9; b: never predicted -> F1 0; macro = 4/9 while accuracy is 0.8
    assert macro_f1(preds, refs, ["a", "b"]) == pytest.approx(4 / 9)
    assert accuracy(preds, refs) == pytest.approx(0.8)


def test_reference_outside_label_set_is_a_user_error():
    with pytest.raises(UserError, match="not in the label set"):
        accuracy(["positive"], ["sarcastic"], LABELS)


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words each side -> F 5/6; no overlap -> 0; mean 5/12
    assert rouge_l(["the cat sat on the mat", "hello world"], ["The cat is on the mat.", "goodbye"]) == \
        pytest.approx(5 / 12)
    # LCS 2: P 2/4, R 2/2 -> F 2/3
    assert rouge_l(["a b c d"], ["a c"]) == pytest.approx(2 / 3)


def test_score_names_unknown_metrics():
    assert score(["x", "y"], ["x", "z"], ["exact_match", "rouge_l"]) == {"exact_match": 0.5, "rouge_l": 0.5}
    with pytest.raises(UserError, match="unknown metric"):
        score(["x"], ["x"], ["bleu"])


def test_generate_and_score_batches(tiny_model):
    from ftkit.inference import generate, load_for_inference

    model, tok = load_for_inference(str(tiny_model), log=lambda s: None)
    calls = []
    original = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw)
    prompts = [f"What is {i} plus 1?" for i in range(5)]
    refs = ["1", "2", "3", "4", "5"]
    metrics, preds = generate_and_score(model, tok, prompts, refs, ["exact_match", "rouge_l"], max_new_tokens=4,
                                        batch_size=2)
    assert calls == [2, 2, 1]
    assert len(preds) == 5
    assert metrics == score(preds, refs, ["exact_match", "rouge_l"])
    model.generate = original
    assert generate(model, tok, prompts[:1], max_new_tokens=4) == preds[:1]


def test_regex_metric_with_a_pattern_compares_the_extracted_parts():
    # with a pattern, the first number of reply and reference must agree: rows 0 and 2 do
    got = score(["It is 4.", "five", "7 apples"], ["4", "5", "7"], ["regex", "exact_match"], pattern=r"(\d+)")
    assert got == {"regex": pytest.approx(2 / 3), "exact_match": 0.0}
