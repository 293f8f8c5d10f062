"""Generation: token ids in, token ids out (chat formatting lives in picochat.chat).

One decode loop, `ContinuousBatch`: prompts queued between steps are prefilled together, as one
left-padded batch, into a KV cache (the `num_samples` completions of a prompt copy its cache rows);
each step then samples one token for every sequence, lets the finished ones leave and runs one
forward pass over those that go on, newcomers merged into the shared cache. The server's batcher
steps it for as long as it serves; `generate` (whole completions of several prompts) and `stream`
(one completion, token by token) queue their prompts in a batch of their own and step it until it
is empty.

`Sampling` says how tokens are chosen: greedy at temperature 0, otherwise softmax sampling with
optional top-k / top-p, reproducible with a seed, and which ids end a completion.

Tool calls: given `tools` (picochat.tools.Tools: the calculator, and search when it holds an index)
or just a tokenizer (the calculator alone), when a sequence emits
`<|tool_call|>name: argument<|/tool_call|>` the tool runs and `<|tool_result|>` result
`<|/tool_result|>` is forced into the sequence, one token per step, before sampling goes on. A search
result is cut to the room the completion has left, less a reserve for the answer; a call still open
after `Tools.max_call_tokens` tokens is closed by the engine with an error result. Forced tokens are
part of the completion and count toward max_new_tokens. A tool runs inside the step, so the other
sequences wait for it (a search takes milliseconds). A prompt added with `run_tools=False` decodes
without the batch's tools (a server request that turns them off).

A completion also ends when the model's context is full: `context_room` is the one rule for how
many new tokens fit after a prompt, which the terminal chat and the server use too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from picochat.model import KVCache, Transformer
from picochat.tools import Tools

FINISH_STOP = "stop"  # a stop id was sampled (it is not part of the completion)
FINISH_LENGTH = "length"  # max_new_tokens or the model's context ran out
FINISH_CANCELLED = "cancelled"  # the caller cancelled the sequence

# Temperatures below this sample greedily, and top_p is raised to it: smaller ones turn into float32
# zero or denormals in sample_next (logits / temperature overflow; top_p masks every token).
MIN_SAMPLING_PARAMETER = 1e-5


class GenerationError(ValueError):
    """Bad arguments to generate / stream / ContinuousBatch.add."""


class ContextLengthError(GenerationError):
    """A prompt that leaves no room in the model's context for even one new token."""


def context_room(context: int, prompt_length: int) -> int:
    """How many new tokens fit after a prompt of `prompt_length` tokens in a context of `context`
    (0 when none do: such a prompt is refused)."""
    return max(0, context - prompt_length)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, and which ids end a completion (they are not part of it).

    Greedy at temperature 0; otherwise sampled from softmax(logits / temperature) restricted to the
    top_k most likely tokens and to the top_p nucleus, from a random stream seeded with `seed`
    (torch's global one when None). Bad values raise GenerationError.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and not _is_count(self.top_k):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        object.__setattr__(self, "stop_ids", frozenset(self.stop_ids))

    def generator(self, device) -> torch.Generator | None:
        return torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V): argmax at temperature 0 (or below 1e-5), else a sample from the
    softmax of logits / temperature restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (the most likely token is always kept)."""
    if temperature < MIN_SAMPLING_PARAMETER:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        top_p = max(top_p, MIN_SAMPLING_PARAMETER)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_request(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_samples: int) -> None:
    if not _is_count(max_new_tokens):
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_count(num_samples):
        raise GenerationError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not prompts:
        raise GenerationError("no prompts given")
    context, vocab = model.config.max_seq_len, model.config.vocab_size
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {index} is empty; it needs at least one token (e.g. <|endoftext|>)")
        if context_room(context, len(prompt)) < 1:
            raise ContextLengthError(
                f"prompt {index} has {len(prompt)} tokens; the model's context is {context}, "
                "so it leaves no room for a reply"
            )
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {index} holds ids outside the vocabulary [0, {vocab}): {bad[:5]}")


@dataclass
class Completion:
    tokens: list[int]  # the new tokens, stop id excluded
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH
    stop_id: int | None = None  # with FINISH_STOP: the stop id that ended it


@dataclass(frozen=True)
class StepEvent:
    """What one step did to one sequence: the token it accepted (None when the sequence stopped
    on a stop id or was cancelled) and, when it ended, why (FINISH_STOP, FINISH_LENGTH or
    FINISH_CANCELLED)."""

    sequence: int
    token: int | None
    finish_reason: str | None
    stop_id: int | None = None  # with FINISH_STOP: the stop id sampled


@dataclass
class _Sequence:
    """Decoding state of one completion in a ContinuousBatch."""

    limit: int  # most new tokens it may have
    sampling: Sampling
    generator: torch.Generator | None  # shared by the sequences queued together
    produced: int = 0  # tokens accepted so far
    finish_reason: str | None = None
    forced: deque = field(default_factory=deque)  # tool-result tokens still to feed
    tool_call: list[int] | None = None  # ids since an open <|tool_call|>
    cancelled: bool = False
    run_tools: bool = True  # False: the batch's tools are not run for this sequence


def _repack(parts: list[tuple[KVCache, list[int]]], remaining: int, config, device, dtype) -> KVCache:
    """One KV cache holding the chosen rows of several caches, in order, left-padded to a common
    length with `remaining` free slots after it.

    Stored keys are already rotated by each row's own positions, so moving a row's slots only
    changes its padding. Slots that no chosen row of a cache uses are dropped, which keeps the
    shared length at the longest live sequence rather than growing for as long as the batch runs.
    """
    spans = []  # (cache, rows, first used slot)
    for cache, rows in parts:
        if rows:
            spans.append((cache, rows, int(cache.pad_lengths[rows].min())))
    length = max(cache.length - first for cache, _, first in spans)
    pad_lengths = []
    for cache, rows, first in spans:
        shift = length - (cache.length - first)
        pad_lengths += (cache.pad_lengths[rows] - first + shift).tolist()
    packed = KVCache(config, len(pad_lengths), length + remaining, device=device, dtype=dtype, pad_lengths=pad_lengths)
    start = 0
    for cache, rows, first in spans:
        index = torch.as_tensor(rows, dtype=torch.long, device=cache.keys.device)
        used = cache.length - first
        for packed_tensor, tensor in ((packed.keys, cache.keys), (packed.values, cache.values)):
            packed_tensor[:, start:start + len(rows), :, length - used:length] = tensor.index_select(1, index)[:, :, :, first:cache.length]
        start += len(rows)
    packed.length = length
    return packed


class ContinuousBatch:
    """Sequences that decode together, one model step advancing all of them (continuous batching).

    `add` queues a prompt (num_samples sequences sharing its prefill) at any time; each `step`
    prefills the queued prompts as one batch, samples one token for every sequence (each with its
    own Sampling), lets finished and cancelled sequences leave, merges the newcomers into the
    shared KV cache and runs one forward pass over every sequence that goes on. Not thread-safe:
    one thread owns it. Sequences queued together before a step decode exactly as `generate`
    decodes them.
    """

    def __init__(self, model: Transformer, tokenizer=None, tools: Tools | None = None):
        """`tools` runs the model's tool calls; a tokenizer alone gives the calculator; neither, no tools."""
        self.model = model
        self._tools = tools if tools is not None else Tools(tokenizer) if tokenizer is not None else None
        self._device = model.lm_head.weight.device
        self._next_id = 0
        self._pending: list[tuple[list[int], list[int]]] = []  # (prompt, its sequence ids)
        self._live: dict[int, _Sequence] = {}
        self._order: list[int] = []  # sequence id of each cache row
        self._cache: KVCache | None = None
        self._logits: torch.Tensor | None = None  # next-token logits, one row per cache row

    def __len__(self) -> int:
        """Sequences not finished yet (queued or decoding)."""
        return len(self._live)

    def add(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
            num_samples: int = 1, run_tools: bool = True) -> list[int]:
        """Queue a prompt; returns the ids of its num_samples sequences. Bad arguments raise
        GenerationError (ContextLengthError for a prompt that fills the context) at once.
        `run_tools=False`: the batch's tools do not run for these sequences (a call is just tokens)."""
        return self.add_all([prompt], max_new_tokens, sampling, num_samples, run_tools)[0]

    def add_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                num_samples: int = 1, run_tools: bool | Sequence[bool] = True) -> list[list[int]]:
        """Queue several prompts that draw from one random stream seeded with sampling.seed (as
        `generate` does); returns each prompt's sequence ids. Nothing is queued if any is refused.
        `run_tools`: for all prompts, or one flag per prompt."""
        prompts = [list(prompt) for prompt in prompts]
        runs = [run_tools] * len(prompts) if isinstance(run_tools, bool) else list(run_tools)
        _check_request(self.model, prompts, max_new_tokens, num_samples)
        generator = sampling.generator(self._device)
        context = self.model.config.max_seq_len
        all_ids = []
        for prompt, runs_tools in zip(prompts, runs, strict=True):
            ids = list(range(self._next_id, self._next_id + num_samples))
            self._next_id += num_samples
            limit = min(max_new_tokens, context_room(context, len(prompt)))
            self._live.update((sequence, _Sequence(limit, sampling, generator, run_tools=runs_tools)) for sequence in ids)
            self._pending.append((prompt, ids))
            all_ids.append(ids)
        return all_ids

    def cancel(self, sequence: int) -> None:
        """End a sequence at the next step (its event has finish_reason FINISH_CANCELLED); unknown
        or finished ids are ignored."""
        if sequence in self._live:
            self._live[sequence].cancelled = True

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        """Advance every sequence by one token; an event per sequence (none when the batch is empty)."""
        events = [StepEvent(s, None, FINISH_CANCELLED) for s, seq in self._live.items() if seq.cancelled]
        for event in events:
            del self._live[event.sequence]
        new_cache, new_order, new_logits = self._prefill_pending()
        order = self._order + new_order
        if not order:
            return events
        logits = new_logits if self._logits is None else (
            self._logits if new_logits is None else torch.cat([self._logits, new_logits]))
        sampled = self._sample(order, logits)
        keep: list[int] = []  # positions in `order` of the sequences that go on
        next_tokens: list[int] = []
        for position, sequence in enumerate(order):
            seq = self._live.get(sequence)
            if seq is None:  # cancelled above
                continue
            forced = bool(seq.forced)
            token = seq.forced.popleft() if forced else sampled[position]
            goes_on = self._accept(seq, token, forced)
            stopped = seq.finish_reason == FINISH_STOP
            events.append(StepEvent(sequence, None if stopped else token, seq.finish_reason, token if stopped else None))
            if goes_on:
                keep.append(position)
                next_tokens.append(token)
            else:
                del self._live[sequence]
        self._advance(order, keep, next_tokens, new_cache)
        return events

    def _prefill_pending(self) -> tuple[KVCache | None, list[int], torch.Tensor | None]:
        """Prefill the queued prompts still wanted, as one left-padded batch, one cache row per
        sequence. Into an empty batch the cache is made big enough to decode in; otherwise it is
        merged into the batch's cache by `_advance`."""
        pending = [(prompt, [s for s in ids if s in self._live]) for prompt, ids in self._pending]
        pending = [(prompt, ids) for prompt, ids in pending if ids]
        self._pending = []
        if not pending:
            return None, [], None
        prompts = [prompt for prompt, _ in pending]
        sequences = [s for _, ids in pending for s in ids]
        width = max(len(p) for p in prompts)
        room = max(self._live[s].limit for s in sequences) if self._cache is None else 0
        pad_lengths = [width - len(p) for p in prompts]
        cache = KVCache(self.model.config, len(prompts), width + room, device=self._device,
                        dtype=self.model.lm_head.weight.dtype, pad_lengths=pad_lengths)
        padded = torch.tensor([[0] * pad + p for pad, p in zip(pad_lengths, prompts)], device=self._device)
        logits = self.model(padded, kv_cache=cache, logits_to_keep=1)[:, -1]
        copies = [index for index, (_, ids) in enumerate(pending) for _ in ids]
        if len(copies) > len(prompts):
            cache.select_rows(copies)
            logits = logits[copies]
        return cache, sequences, logits

    def _sample(self, order: list[int], logits: torch.Tensor) -> list[int]:
        """One sampled token per row of logits; rows that sample alike share one call.

        Rows being fed a tool result sample too and drop the token: each step draws once per row
        from a random stream, whatever the rows do, so a seed gives the same completions whether
        or not other rows call tools."""
        groups: dict[tuple, list[int]] = {}
        for position, sequence in enumerate(order):
            seq = self._live.get(sequence)
            if seq is not None:
                s = seq.sampling
                groups.setdefault((s.temperature, s.top_k, s.top_p, seq.generator), []).append(position)
        tokens = [0] * len(order)
        for (temperature, top_k, top_p, generator), positions in groups.items():
            rows = logits if len(positions) == len(order) else logits[positions]
            for position, token in zip(positions, sample_next(rows, temperature, top_k, top_p, generator).tolist()):
                tokens[position] = token
        return tokens

    def _accept(self, seq: _Sequence, token: int, forced: bool) -> bool:
        """Add a decoded token to the sequence; return whether it goes on."""
        if not forced and token in seq.sampling.stop_ids:
            seq.finish_reason = FINISH_STOP
            return False
        seq.produced += 1
        if self._tools is not None and seq.run_tools and not forced:
            self._follow_tool_call(seq, token)
        if seq.produced >= seq.limit:
            seq.finish_reason = FINISH_LENGTH
            return False
        return True

    def _follow_tool_call(self, seq: _Sequence, token: int) -> None:
        """Collect the ids of an open tool call; at its end, queue the tool's answer to be fed."""
        if seq.tool_call is None:
            if token == self._tools.call:
                seq.tool_call = []
        elif token == self._tools.end_call:
            seq.forced.extend(self._tools.result_ids(seq.tool_call, seq.limit - seq.produced))
            seq.tool_call = None
        elif len(seq.tool_call) == self._tools.max_call_tokens:
            seq.forced.extend(self._tools.cut_off_ids())
            seq.tool_call = None
        else:
            seq.tool_call.append(token)

    def _advance(self, order: list[int], keep: list[int], next_tokens: list[int], new_cache: KVCache | None) -> None:
        """Keep the cache rows of the sequences that go on, merge in the newcomers, run one step."""
        if not keep:
            self._cache, self._order, self._logits = None, [], None
            return
        if self._cache is not None and new_cache is not None:
            old_rows = len(self._order)
            remaining = max(self._live[order[p]].limit - self._live[order[p]].produced for p in keep)
            parts = [(self._cache, [p for p in keep if p < old_rows]), (new_cache, [p - old_rows for p in keep if p >= old_rows])]
            self._cache = _repack(parts, remaining, self.model.config, self._device, self.model.lm_head.weight.dtype)
        else:
            self._cache = new_cache if self._cache is None else self._cache
            if len(keep) < self._cache.batch_size:
                self._cache.select_rows(keep)
        self._order = [order[p] for p in keep]
        step_input = torch.tensor(next_tokens, device=self._device)[:, None]
        self._logits = self.model(step_input, kv_cache=self._cache)[:, -1]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             num_samples: int = 1, tokenizer=None, tools: Tools | None = None,
             seeds: Sequence[int] | None = None, run_tools: Sequence[bool] | None = None) -> list[list[Completion]]:
    """Complete each prompt num_samples times; result[i][j] is sample j of prompt i.

    A completion ends at a stop id (excluded; finish_reason "stop") or after max_new_tokens, or
    when the model's context is full ("length"). Pass the tokenizer to enable calculator tool calls,
    or `tools` for the tools it holds (search too, given an index). `seeds` (one per prompt, in place
    of sampling.seed) gives each prompt its own random stream, so its samples do not depend on which
    prompts are decoded beside it (RL's problems split over ranks). `run_tools` (one flag per prompt,
    default all) says whose tool calls run.
    """
    batch = ContinuousBatch(model, tokenizer, tools)
    runs = [True] * len(prompts) if run_tools is None else list(run_tools)
    if seeds is None:
        ids = batch.add_all(prompts, max_new_tokens, sampling, num_samples, runs)
    else:
        _check_request(model, [list(p) for p in prompts], max_new_tokens, num_samples)  # refuse before queueing any
        ids = [batch.add(prompt, max_new_tokens, replace(sampling, seed=seed), num_samples, runs_tools)
               for prompt, seed, runs_tools in zip(prompts, seeds, runs, strict=True)]
    tokens: dict[int, list[int]] = {sequence: [] for group in ids for sequence in group}
    ends: dict[int, StepEvent] = {}
    while len(batch):
        for event in batch.step():
            if event.token is not None:
                tokens[event.sequence].append(event.token)
            if event.finish_reason is not None:
                ends[event.sequence] = event
    return [[Completion(tokens[s], ends[s].finish_reason, ends[s].stop_id) for s in group] for group in ids]


class TokenStream:
    """Iterator over one completion's token ids as they are decoded; `finish_reason` is set
    ("stop" or "length") once the completion has ended, None before."""

    def __init__(self, batch: ContinuousBatch):
        self._batch = batch
        self.finish_reason: str | None = None

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        while len(self._batch):
            [event] = self._batch.step()
            self.finish_reason = event.finish_reason
            if event.token is not None:
                return event.token
        raise StopIteration


def stream(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
           tokenizer=None, tools: Tools | None = None) -> TokenStream:
    """Yield the completion of one prompt token by token (the same tokens generate() returns).

    Arguments are checked at call time: a prompt that fills the context raises ContextLengthError.
    """
    batch = ContinuousBatch(model, tokenizer, tools)
    batch.add(prompt_ids, max_new_tokens, sampling)
    return TokenStream(batch)
