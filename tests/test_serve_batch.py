"""Dynamic batching in ftkit serve: a batched greedy reply equals the same request served alone,
token for token (tiny model, fp32), with per-row budgets, stops and cancels."""

from __future__ import annotations

import threading

import pytest

from ftkit.serve_batch import DONE, Batcher, Job

PROMPTS = ["Hi", "What is 2 plus 3? Answer in one word please.", "The capital of France is", "a b c d e f g h"]


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def run(batcher: Batcher, jobs: list[Job]) -> list[list[int]]:
    """Submit all jobs while the model is held, so the worker finds them waiting together."""
    with batcher.lock:
        for job in jobs:
            batcher.submit(job)
    for job in jobs:
        while (item := job.pieces.get(timeout=60)) is not DONE:
            assert not isinstance(item, BaseException), item
    return [job.tokens for job in jobs]


def make(model, tok, max_batch: int) -> Batcher:
    return Batcher(model, tok, threading.Lock(), {tok.eos_token_id}, max_batch=max_batch, wait_s=0.0)


def test_batched_greedy_equals_alone(model_tok):
    model, tok = model_tok
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    budgets = [12, 5, 12, 9]  # per-row budgets in one batch
    alone = make(model, tok, 1)
    singles = [run(alone, [Job(i, b)])[0] for i, b in zip(ids, budgets)]
    batched = make(model, tok, 8)
    together = run(batched, [Job(i, b) for i, b in zip(ids, budgets)])
    assert batched.sizes == [4] and alone.sizes == [1, 1, 1, 1]
    assert together == singles
    assert [len(t) for t in together] == [b if tok.eos_token_id not in t else len(t) for t, b in zip(singles, budgets)]


def test_a_cancelled_row_stops_and_the_others_go_on(model_tok):
    model, tok = model_tok
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    alone = [run(make(model, tok, 1), [Job(i, 10)])[0] for i in ids]
    jobs = [Job(i, 10) for i in ids]
    jobs[3].cancel.set()  # its client left while it waited: it never takes a row
    steps = []

    def leave_at_step_3(*_):  # the client of row 1 leaves during the fourth forward pass
        steps.append(1)
        if len(steps) == 4:
            jobs[1].cancel.set()

    hook = model.register_forward_hook(leave_at_step_3)
    try:
        batcher = make(model, tok, 8)
        tokens = run(batcher, jobs)
    finally:
        hook.remove()
    assert batcher.sizes == [3] and tokens[3] == []
    assert len(tokens[1]) == 4 and tokens[1] == alone[1][:4]
    assert tokens[0] == alone[0] and tokens[2] == alone[2]


def test_sampling_settings_and_seeds_decide_who_shares_a_batch(model_tok):
    model, tok = model_tok
    ids = tok("Hi")["input_ids"]
    batcher = make(model, tok, 8)
    jobs = [Job(ids, 4), Job(ids, 4, temperature=0.7, top_p=0.9), Job(ids, 4, temperature=0.7, top_p=0.9),
            Job(ids, 4, temperature=0.7, seed=1), Job(ids, 4, temperature=0.7, seed=1), Job(ids, 4)]
    tokens = run(batcher, jobs)
    assert sorted(batcher.sizes) == [1, 1, 2, 2]  # greedy ×2, sampled ×2, each seeded request alone
    assert tokens[0] == tokens[5] and tokens[3] == tokens[4]  # greedy agrees; one seed, one text
    assert all(len(t) == 4 or tok.eos_token_id in t for t in tokens)


def test_a_failing_generate_ends_every_row_with_the_error(model_tok):
    model, tok = model_tok
    batcher = make(model, tok, 8)
    jobs = [Job([10**9], 4), Job(tok("Hi")["input_ids"], 4)]  # a token id past the vocabulary
    with batcher.lock:
        for job in jobs:
            batcher.submit(job)
    ends = []
    for job in jobs:
        while not ((item := job.pieces.get(timeout=60)) is DONE or isinstance(item, BaseException)):
            pass
        ends.append(item)
    assert all(isinstance(e, BaseException) for e in ends)
    assert run(batcher, [Job(tok("Hi")["input_ids"], 2)])[0]  # the worker lives on


def test_a_batch_waits_for_requests_the_server_admitted_that_are_still_on_their_way(model_tok):
    import time

    model, tok = model_tok
    ids = tok("Hi")["input_ids"]
    for admitted, sizes in ((1, [1, 1]), (2, [2])):  # one admitted: no one else is coming
        batcher = Batcher(model, tok, threading.Lock(), {tok.eos_token_id}, max_batch=8, wait_s=0.2,
                          admitted=lambda n=admitted: n)
        jobs = [Job(ids, 2), Job(ids, 2)]
        batcher.submit(jobs[0])
        time.sleep(0.8)  # past one window, within ten: the second arrives while the first waits for it
        batcher.submit(jobs[1])
        for job in jobs:
            while job.pieces.get(timeout=60) is not DONE:
                pass
        assert batcher.sizes == sizes
