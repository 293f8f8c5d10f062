"""The bridge between the asyncio server and the model: one worker thread decodes every request.

The worker owns a `ContinuousBatch` and loops: take new requests and cancellations from a
thread-safe inbox, admit waiting requests while the batch has room (`max_batch` sequences), run
one step (one forward pass advances every active sequence), and hand each request its new tokens
through its own asyncio queue (`loop.call_soon_threadsafe`). Requests that arrive while a step runs
join at the next one. The asyncio side admits at most `max_batch + max_queue` sequences at a time
and refuses more with `Overloaded` (HTTP 503). A consumer that stops listening (a client that
disconnects) cancels its sequences, which frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from picochat.engine import ContinuousBatch, StepEvent

# What a request's queue receives: the events of one step, or the error that ended it.
Update = list[StepEvent] | BaseException


class Overloaded(RuntimeError):
    """Every batch row and queue place is taken; the client should retry later."""


@dataclass(eq=False)  # jobs compare by identity
class _Job:
    prompt: list[int]
    n: int
    options: dict  # keyword arguments of ContinuousBatch.add besides prompt and num_samples
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    sequences: list[int] = field(default_factory=list)  # batch sequence ids, once admitted

    def send(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


class Batcher:
    """Decodes the requests of one model in a background thread, many at a time."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self._batch = ContinuousBatch(model, tokenizer)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}  # batch sequence id -> its job
        self._admitted = 0  # sequences accepted and not yet released (asyncio side only)
        self._thread: threading.Thread | None = None
        self.steps = 0  # forward steps run (for /health and the tests)
        self.tokens = 0  # tokens decoded

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="picochat-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker; requests still running end with an error."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def stats(self) -> dict:
        return {
            "admitted_sequences": self._admitted,
            "active_sequences": len(self._batch),
            "waiting_requests": len(self._waiting),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "tokens": self.tokens,
        }

    # --- the asyncio side ---------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], n: int = 1, **options) -> Submission:
        """Queue `n` completions of `prompt`; raises Overloaded at once when the server is full.
        `options` are those of `ContinuousBatch.add` (max_new_tokens, sampling). Call from the
        event loop; close the submission when done with it."""
        if n > self.max_batch:
            raise ValueError(f"n={n} completions cannot decode together in a batch of {self.max_batch} rows")
        if self._admitted + n > self.max_batch + self.max_queue:
            raise Overloaded(f"the server is busy ({self._admitted} sequences running or queued); retry later")
        self._admitted += n
        job = _Job(list(prompt), n, options, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", job))
        return Submission(self, job)

    def _cancel_later(self, job: _Job, choices: list[int]) -> None:
        """Ask the worker to cancel these choices of a job (at its next step)."""
        self._inbox.put(("cancel", job, choices))

    def _release(self, job: _Job) -> None:
        self._admitted -= job.n

    # --- the worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self._take_messages(block=not len(self._batch) and not self._waiting):
                self._admit()
                if not len(self._batch):
                    continue
                try:
                    events = self._batch.step()
                except Exception as error:  # a bug or an out-of-memory: fail these requests, keep serving
                    self._fail_all(error)
                    continue
                self.steps += 1
                self._dispatch(events)
            self._fail_all(RuntimeError("the server is shutting down"))

    def _take_messages(self, block: bool) -> bool:
        """Apply the inbox's messages (waiting for one if `block`); False once asked to stop."""
        try:
            message = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if message is None:
                    return False
                if message[0] == "add":
                    self._waiting.append(message[1])
                else:
                    self._cancel(*message[1:])
                message = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _cancel(self, job: _Job, choices: list[int]) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
            return
        for choice in choices:
            if choice < len(job.sequences):
                self._batch.cancel(job.sequences[choice])

    def _admit(self) -> None:
        """Move waiting requests into the batch, first come first served, while rows are free."""
        while self._waiting and len(self._batch) + self._waiting[0].n <= self.max_batch:
            job = self._waiting.popleft()
            try:
                job.sequences = self._batch.add(job.prompt, num_samples=job.n, **job.options)
            except ValueError as error:
                job.send(error)
                continue
            for sequence in job.sequences:
                self._jobs[sequence] = job

    def _dispatch(self, events: list[StepEvent]) -> None:
        by_job: dict[int, tuple[_Job, list[StepEvent]]] = {}
        for event in events:
            job = self._jobs[event.sequence]
            by_job.setdefault(id(job), (job, []))[1].append(event)
            if event.token is not None:
                self.tokens += 1
            if event.finish_reason is not None:
                del self._jobs[event.sequence]
        for job, job_events in by_job.values():
            job.send(job_events)

    def _fail_all(self, error: BaseException) -> None:
        jobs = {id(job): job for job in [*self._jobs.values(), *self._waiting]}
        for job in jobs.values():
            job.send(error)
        self._jobs.clear()
        self._waiting.clear()
        self._batch = ContinuousBatch(self.model, self._batch.tokenizer)


class Submission:
    """One request's completions as they are decoded: iterate it for the updates, each a list of
    (choice index, token or None, finish reason or None) for the choices that moved in one step.

    Iteration ends when every choice has finished or been cancelled; an error the engine raised
    for the request (a GenerationError for arguments it refuses) is raised by the iteration.
    `close()` (also on leaving `async with`) cancels what is still running and frees the place.
    """

    def __init__(self, batcher: Batcher, job: _Job):
        self.batcher, self.job = batcher, job
        self.unfinished = set(range(job.n))
        self._closed = False

    async def __aenter__(self) -> Submission:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __aiter__(self) -> Submission:
        return self

    async def __anext__(self) -> list[tuple[int, int | None, str | None]]:
        while self.unfinished:
            update = await self.job.updates.get()
            if isinstance(update, BaseException):
                self.unfinished.clear()
                raise update
            moved = []
            for event in update:
                choice = self.job.sequences.index(event.sequence)
                if choice in self.unfinished:
                    moved.append((choice, event.token, event.finish_reason))
                    if event.finish_reason is not None:
                        self.unfinished.discard(choice)
            if moved:
                return moved
        raise StopAsyncIteration

    def cancel(self, choice: int) -> None:
        """Stop decoding one choice (its later tokens are dropped)."""
        if choice in self.unfinished:
            self.unfinished.discard(choice)
            self.batcher._cancel_later(self.job, [choice])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.unfinished:
            self.batcher._cancel_later(self.job, sorted(self.unfinished))
            self.unfinished.clear()
        self.batcher._release(self.job)
