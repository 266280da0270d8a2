"""Dynamic batching for `ftkit serve`: requests waiting for the model generate together.

One worker thread owns the model. It takes the oldest waiting request, gathers the waiting
requests that can share its `generate()` call (same sampling settings; a seeded request always
runs alone so its seed means what it says), up to `max_batch`, left-pads them into one batch and
generates. Each row keeps its own budget, stop, cancel and deadline through a per-row stopping
criterion (generate pads a finished row from then on), and its own text stream through a
per-row streamer, so a streamed and a whole reply are served by the same code. A request that
arrives while a batch runs waits for the next one (no joining mid-generation).

Left padding with the attention mask gives each row the positions it would have alone, so a
batched greedy reply equals the same request served alone (checked token for token in fp32 by
tests/test_serve_batch.py).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

ARRIVING_WAITS = 10  # how many gather windows a batch waits for admitted requests still on their way
DONE = object()  # the end of a job's pieces (an exception object ends them with an error)


@dataclass(eq=False)
class Job:
    """One completion: its prompt, budget and sampling, and the channel its text pieces arrive on."""

    ids: list[int]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    deadline: float = float("inf")
    arrived: float = field(default_factory=time.monotonic)
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    started: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)  # this row: a stop string matched, ...
    gone: threading.Event | None = None  # the whole request: its client left
    tokens: list = field(default_factory=list)
    done: bool = False
    timed_out: bool = False

    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.gone is not None and self.gone.is_set())

    def key(self):
        """Jobs with equal keys can share one generate() call."""
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p) if self.temperature else ("greedy",)


class _Rows:
    """The batch's per-row bookkeeping. The stopping criterion reads each step's tokens (generate calls
    it every step, before or after the streamer depending on the transformers version); the
    streamer protocol only tells when to send out new text."""

    def __init__(self, jobs: list[Job], tok, eos: set):
        self.jobs, self.tok, self.eos = jobs, tok, eos
        self.sent = [0] * len(jobs)  # characters of each row's text already sent

    def put(self, value) -> None:
        self.flush(final=False)

    def end(self) -> None:
        pass

    def flush(self, final: bool) -> None:
        for i, job in enumerate(self.jobs):
            text = self.tok.decode(job.tokens, skip_special_tokens=True)
            if text.endswith("\ufffd") and not final:  # half a UTF-8 character: wait for the rest
                continue
            if len(text) > self.sent[i]:
                job.pieces.put(text[self.sent[i]:])
                self.sent[i] = len(text)

    def stop(self, input_ids, scores, **kwargs):
        """Takes the step's token of every live row (a finished row gets padding from generate), then
        stops rows whose budget is spent, which ended, were cancelled (client left, stop string) or ran
        out of time."""
        import torch

        now, last = time.monotonic(), input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, last):
            if job.done:
                continue
            job.tokens.append(token)
            job.timed_out = now > job.deadline
            job.done = (len(job.tokens) >= job.max_tokens or job.timed_out or job.cancelled()
                        or token in self.eos)
        return torch.tensor([job.done for job in self.jobs], dtype=torch.bool, device=input_ids.device)


class Batcher:
    """The model's one worker thread and the requests waiting for it."""

    def __init__(self, model, tok, lock: threading.Lock, eos: set, max_batch: int = 8, wait_s: float = 0.01,
                 admitted=lambda: 0):
        self.model, self.tok, self.lock, self.eos = model, tok, lock, eos
        self.max_batch, self.wait_s = max(1, max_batch), wait_s
        self.admitted = admitted  # requests admitted by the server and not finished, waiting here or not
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.batches = 0  # generate() calls so far (tests read it)
        self.sizes: list[int] = []  # rows of the recent batches (tests and the benchmark read it)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="ftkit-generate")
                self._thread.start()
            self._cond.notify_all()

    def withdraw(self, job: Job) -> bool:
        """Take a job back before it starts (its time ran out waiting); False when it already started."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                return True
            return False

    def _gather(self) -> list[Job]:
        """The oldest waiting job and those that can join it, waiting up to wait_s after it arrived
        for more to come, or up to ARRIVING_WAITS times as long while requests the server has admitted
        are still on their way here (being tokenized: clients served by the last batch come back
        together, and a batch cut before they arrive splits them for good). Called with the model lock
        held, so the batch starts when it is taken."""
        with self._cond:
            while True:
                if not self._waiting:  # withdrawn while the model was busy: wait again without it
                    return []
                head = self._waiting[0]
                mates = [j for j in self._waiting if j.key() == head.key()][: self.max_batch]
                arriving = self.admitted() > len(self._waiting)
                left = head.arrived + self.wait_s * (ARRIVING_WAITS if arriving else 1) - time.monotonic()
                if len(mates) >= self.max_batch or left <= 0 or head.seed is not None:
                    break
                self._cond.wait(left)
            for job in mates:
                self._waiting.remove(job)
                job.started.set()
            gone = [j for j in mates if j.cancelled()]  # the client left while waiting
            for job in gone:
                job.done = True
                job.pieces.put(DONE)
            return [j for j in mates if j not in gone]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
            with self.lock:
                jobs = self._gather()
                if jobs:
                    self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.sizes = (self.sizes + [len(jobs)])[-64:]
        rows = _Rows(jobs, self.tok, self.eos)
        try:
            self._generate(jobs, rows)
            rows.flush(final=True)
            outcome = DONE
        except BaseException as exc:  # every waiting request hears of it; the worker lives on
            outcome = exc
        for job in jobs:
            job.done = True
            job.pieces.put(outcome)

    def _generate(self, jobs: list[Job], rows: _Rows) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(j.ids) for j in jobs)
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs], device=self.model.device)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return rows.stop(input_ids, scores)

        # The same arguments as ftkit.inference.generate, so greedy text matches `ftkit generate`.
        kw = dict(max_new_tokens=max(j.max_tokens for j in jobs), pad_token_id=pad,
                  eos_token_id=self.tok.eos_token_id, streamer=rows, stopping_criteria=StoppingCriteriaList([_Stop()]))
        head = jobs[0]
        if head.temperature:
            kw.update(do_sample=True, temperature=head.temperature, top_p=head.top_p)
            if head.seed is not None:
                torch.manual_seed(head.seed)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=mask, **kw)
