"""The bridge between the asyncio server and the model: one worker thread decodes every request.

The worker owns a `ContinuousBatch` and loops: take new requests and cancellations from a
thread-safe inbox, admit waiting requests while the batch has room (`max_batch` sequences), run
one step (one forward pass advances every active sequence), and hand each request its new tokens
through its own asyncio queue (`loop.call_soon_threadsafe`). Requests that arrive while a step runs
join at the next one. The asyncio side admits at most `max_batch + max_queue` sequences at a time
and refuses more with `Overloaded` (HTTP 503). A consumer that stops listening (a client that
disconnects) cancels its sequences, which frees their rows at the next step.

A step that fails (a sampling error, out of memory) loses the batch's state. The worker then
decodes each request of that batch alone for one step: those that fail again end with
`RequestFailed`, the others resume in a new batch from the tokens they have (re-prefilled; a
seeded request's random stream restarts there, and one cut in the middle of a calculator result
samples the rest of it). When none fails alone, they all end with it.
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
from picochat.tools import Tools

# What a request's queue receives: (choice, token or None, finish reason or None) for the choices
# that moved in one step, or the error that ended the request.
Update = list[tuple[int, int | None, str | None]] | BaseException


class Overloaded(RuntimeError):
    """Every batch row and queue place is taken; the client should retry later."""


class RequestFailed(RuntimeError):
    """Decoding this request failed (the server's fault, not the request's); other requests go on."""


@dataclass(eq=False)  # jobs compare by identity
class _Job:
    prompt: list[int]
    n: int
    options: dict  # keyword arguments of ContinuousBatch.add besides prompt and num_samples
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    sequences: list[int] = field(default_factory=list)  # each choice's batch sequence id, once admitted
    tokens: list[list[int]] = field(default_factory=list)  # each choice's tokens so far
    cancelled: set[int] = field(default_factory=set)  # choices cancelled

    def send(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


class Batcher:
    """Decodes the requests of one model in a background thread, many at a time."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 64, tools: Tools | None = None):
        """`tools`: what runs the model's tool calls, for the requests that let them run (None: no tools)."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.tools = tools
        self._batch = ContinuousBatch(model, tools=tools)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Job] = deque()
        self._jobs: dict[int, tuple[_Job, int]] = {}  # batch sequence id -> its job and choice
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
        `options` are those of `ContinuousBatch.add` (max_new_tokens, sampling, run_tools). Call
        from the event loop; close the submission when done with it."""
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
                except Exception as error:
                    self._recover(error)
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
        job.cancelled.update(choices)
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
            job.tokens = [[] for _ in job.sequences]
            for choice, sequence in enumerate(job.sequences):
                self._jobs[sequence] = (job, choice)

    def _dispatch(self, events: list[StepEvent]) -> None:
        moved: dict[_Job, list[tuple[int, int | None, str | None]]] = {}
        for event in events:
            job, choice = self._jobs[event.sequence]
            moved.setdefault(job, []).append((choice, event.token, event.finish_reason))
            if event.token is not None:
                job.tokens[choice].append(event.token)
                self.tokens += 1
            if event.finish_reason is not None:
                del self._jobs[event.sequence]
        for job, update in moved.items():
            job.send(update)

    def _recover(self, error: Exception) -> None:
        """After a failed step: fail the requests that fail alone, resume the others (module docstring)."""
        running: dict[_Job, list[int]] = {}
        for job, choice in self._jobs.values():
            if choice not in job.cancelled:
                running.setdefault(job, []).append(choice)
        self._jobs.clear()
        self._batch = ContinuousBatch(self.model, tools=self.tools)
        failures = {job: self._failure_alone(job, choices) for job, choices in running.items()}
        if not any(failures.values()):
            failures = dict.fromkeys(running, error)
        for job, choices in running.items():
            if failures[job] is not None:
                job.send(RequestFailed(f"decoding this request failed: {type(failures[job]).__name__}: {failures[job]}"))
                continue
            for choice in choices:
                options = dict(job.options, max_new_tokens=job.options["max_new_tokens"] - len(job.tokens[choice]))
                [sequence] = self._batch.add(job.prompt + job.tokens[choice], **options)
                job.sequences[choice] = sequence
                self._jobs[sequence] = (job, choice)

    def _failure_alone(self, job: _Job, choices: list[int]) -> Exception | None:
        """The error that one step of these choices raises when they decode alone, if any."""
        for choice in choices:
            probe = ContinuousBatch(self.model, tools=self.tools)
            try:
                probe.add(job.prompt + job.tokens[choice], **dict(job.options, max_new_tokens=1))
                probe.step()
            except Exception as error:
                return error
        return None

    def _fail_all(self, error: BaseException) -> None:
        for job in {job for job, _ in self._jobs.values()} | set(self._waiting):
            job.send(error)
        self._jobs.clear()
        self._waiting.clear()
        self._batch = ContinuousBatch(self.model, tools=self.tools)


class Submission:
    """One request's completions as they are decoded: iterate it for the updates, each a list of
    (choice index, token or None, finish reason or None) for the choices that moved in one step.

    Iteration ends when every choice has finished or been cancelled; an error that ended the
    request (a GenerationError for arguments the engine refuses, RequestFailed) is raised by it.
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
            for choice, token, finish_reason in update:
                if choice in self.unfinished:
                    moved.append((choice, token, finish_reason))
                    if finish_reason is not None:
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
