"""Generation: token ids in, token ids out (chat formatting lives in picochat.chat).

Prompts are prefilled once, as one left-padded batch, into a KV cache; all rows then decode
together, one token per step, and a row that finishes leaves the batch. `num_samples` completions
of a prompt share its prefill (the cache rows are copied). Sampling is greedy at temperature 0,
otherwise softmax sampling with optional top-k / top-p, reproducible with a seed.

Tool calls: given a tokenizer, when a row emits `<|tool_call|>` expression `<|/tool_call|>`, the
expression is evaluated by a safe calculator (parsed with `ast`, never `eval`) and
`<|tool_result|>` result `<|/tool_result|>` is forced into the row, one token per step, before
sampling goes on. Forced tokens are part of the completion and count toward max_new_tokens.

`generate(..., compile=True)` decodes with a fixed-shape step compiled once by torch.compile, with
the weights frozen into it (`_CompiledSteps`): faster on a CPU after tens of seconds of compiling,
for a model whose weights no longer change.

Continuous batching (for the server): `ContinuousBatch` is the same decoding driven one step at a
time, with sequences joining between steps (prefilled, then merged into the shared KV cache) and
leaving when they finish or are cancelled.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from picochat.model import KVCache, Transformer

FINISH_STOP = "stop"  # a stop id was sampled (it is not part of the completion)
FINISH_LENGTH = "length"  # max_new_tokens or the model's context ran out

# Temperatures below this sample greedily, and top_p is raised to it: smaller ones turn into float32
# zero or denormals in sample_next (logits / temperature overflow; top_p masks every token).
MIN_SAMPLING_PARAMETER = 1e-5

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**18  # larger intermediate or final values are refused
TOOL_ERROR_TEXT = "error"  # what the model sees when its expression cannot be computed


class GenerationError(ValueError):
    """Bad arguments to generate / stream."""


class ContextLengthError(GenerationError):
    """A prompt that leaves no room in the model's context for even one new token."""


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot compute."""


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    else:
        raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.dump(node)[:60]}")
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"a value exceeds {MAX_MAGNITUDE:.0e}")
    return value


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely; return the result as text ("12", "2.5").

    Integral results print without a decimal point; others with up to 10 significant digits.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes in the source
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from err
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


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


@dataclass
class Completion:
    tokens: list[int]  # the new tokens, stop id excluded
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH


@dataclass
class _Row:
    """Decoding state of one completion."""

    limit: int  # most new tokens this row may have
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    forced: deque = field(default_factory=deque)  # tool-result tokens still to feed
    tool_call: list[int] | None = None  # ids since an open <|tool_call|>


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None
    stop_ids: frozenset


@dataclass(frozen=True)
class _ToolIds:
    call: int
    end_call: int
    result: int
    end_result: int


def _tool_ids(tokenizer) -> _ToolIds | None:
    if tokenizer is None:
        return None
    return _ToolIds(*(tokenizer.special_id(name) for name in
                      ("<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>")))


def _check_arguments(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float, top_k: int | None, top_p: float | None, num_samples: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise GenerationError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not prompts:
        raise GenerationError("no prompts given")
    context, vocab = model.config.max_seq_len, model.config.vocab_size
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {index} is empty; it needs at least one token (e.g. <|endoftext|>)")
        if len(prompt) >= context:
            raise ContextLengthError(
                f"prompt {index} has {len(prompt)} tokens; the model's context is {context}, "
                "so it leaves no room for a reply"
            )
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {index} holds ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _new_rows(prompts: Sequence[Sequence[int]], num_samples: int, max_new_tokens: int, context: int) -> list[_Row]:
    return [_Row(limit=min(max_new_tokens, context - len(prompt)))
            for prompt in prompts for _ in range(num_samples)]


def _accept(row: _Row, token: int, forced: bool, sampling: _Sampling, tools: _ToolIds | None, tokenizer) -> bool:
    """Add a decoded token to the row; return whether the row goes on."""
    if not forced and token in sampling.stop_ids:
        row.finish_reason = FINISH_STOP
        return False
    row.tokens.append(token)
    if tools is not None and not forced:
        if row.tool_call is None and token == tools.call:
            row.tool_call = []
        elif row.tool_call is not None and token == tools.end_call:
            try:
                result = calculate(tokenizer.decode(row.tool_call))
            except CalculatorError:
                result = TOOL_ERROR_TEXT
            row.forced.extend([tools.result, *tokenizer.encode(result), tools.end_result])
            row.tool_call = None
        elif row.tool_call is not None:
            row.tool_call.append(token)
    if len(row.tokens) >= row.limit:
        row.finish_reason = FINISH_LENGTH
        return False
    return True


@torch.no_grad()
def _decode(model: Transformer, prompts: Sequence[Sequence[int]], rows: list[_Row], num_samples: int,
            sampling: _Sampling, seed: int | None, tokenizer, compile: bool = False) -> Iterator[tuple[int, int]]:
    """Run every row to its end, yielding (row index, token) as tokens are accepted."""
    device = model.lm_head.weight.device
    tools = _tool_ids(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    width = max(len(p) for p in prompts)
    pad_lengths = [width - len(p) for p in prompts]
    cache = KVCache(model.config, len(prompts), width + max(row.limit for row in rows),
                    device=device, dtype=model.lm_head.weight.dtype, pad_lengths=pad_lengths)
    padded = torch.tensor([[0] * pad + list(p) for pad, p in zip(pad_lengths, prompts)], device=device)
    logits = model(padded, kv_cache=cache, logits_to_keep=1)[:, -1]
    if num_samples > 1:
        copies = torch.arange(len(prompts), device=device).repeat_interleave(num_samples)
        cache.select_rows(copies)
        logits = logits[copies]
    step = _CompiledSteps(model, cache) if compile else _eager_steps(model, cache)
    active = list(range(len(rows)))  # rows[active[i]] gets logits row i
    while active:
        sampled = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator).tolist()
        keep, next_tokens = [], []
        for slot, index in enumerate(active):
            row = rows[index]
            forced = bool(row.forced)
            token = row.forced.popleft() if forced else sampled[slot]
            goes_on = _accept(row, token, forced, sampling, tools, tokenizer)
            if row.finish_reason != FINISH_STOP:
                yield index, token
            if goes_on:
                keep.append(slot)
                next_tokens.append(token)
        if not keep:
            return
        active = [active[slot] for slot in keep]
        logits = step(keep, next_tokens)


def _eager_steps(model: Transformer, cache: KVCache):
    """A decode step: drop the cache rows not in `keep`, feed `tokens`, return their next-token logits."""

    def step(keep: list[int], tokens: list[int]) -> torch.Tensor:
        if len(keep) < cache.batch_size:
            cache.select_rows(keep)
        return model(torch.tensor(tokens, device=cache.keys.device)[:, None], kv_cache=cache)[:, -1]

    return step


def _static_step(model: Transformer, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 slot: torch.Tensor, pad_lengths: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) of one decode step whose tensor shapes never change.

    tokens (B, 1) go into slot `slot` (a 0-d tensor, so that its value is no guard to recompile on)
    of each layer's keys and values (B, n_kv_head, S, head_dim), separate tensors written in place
    (as views of one cache tensor they were copied whole at every write); attention reads all S
    slots through a mask of the real ones written so far. Positions are clamped so that rows which
    already finished, still fed to keep the shape, stay inside the RoPE tables.
    """
    key_slots = torch.arange(keys[0].shape[2], device=tokens.device)
    mask = ((key_slots <= slot) & (key_slots >= pad_lengths[:, None]))[:, None, None, :]
    positions = (slot - pad_lengths).clamp(0, model.rope_cos.shape[0] - 1)[:, None]
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rope_cos[positions].to(x.dtype), model.rope_sin[positions].to(x.dtype)
    for layer, layer_keys, layer_values in zip(model.model.layers, keys, values):
        def write(k, v, layer_keys=layer_keys, layer_values=layer_values):
            layer_keys.index_copy_(2, slot.view(1), k)
            layer_values.index_copy_(2, slot.view(1), v)
            return layer_keys, layer_values

        x = layer(x, cos, sin, mask, write)
    return model.lm_head(model.model.norm(x))[:, -1].float()


@functools.cache
def _compiled_static_step():
    return torch.compile(_static_step, dynamic=False)


# Freezing folds the weights into the compiled code as constants, prepacked for the matmul kernels
# max_autotune picks; cpp_wrapper calls the kernels from C++ rather than Python. Patched around each
# call rather than passed as torch.compile options: dynamo must see `freezing` while tracing to
# guard on the parameters' identity, so that another model gets its own compiled step.
_COMPILE_CONFIG = {"freezing": True, "max_autotune": True, "cpp_wrapper": True}
_FROZEN_VERSIONS = weakref.WeakKeyDictionary()  # model -> its parameters' versions at its first compiled step


class _CompiledSteps:
    """Decode steps of generate(compile=True): `_static_step`, compiled once per batch size and cache size.

    A small model's eager decode step on a CPU is mostly Python and dispatch overhead, which
    torch.compile removes only when shapes never change (with a growing cache it recompiled at every
    step). So the batch keeps all its rows (a finished row is fed its last token again and its
    logits are dropped) and the cache all its slots. The compiled code holds a frozen copy of the
    weights, so a model modified in place since its first compiled step is refused (a copy of it,
    copy.deepcopy, compiles afresh).
    """

    def __init__(self, model: Transformer, cache: KVCache):
        versions = tuple(p._version for p in model.parameters())
        if _FROZEN_VERSIONS.setdefault(model, versions) != versions:
            raise GenerationError("compile=True froze this model's weights at its first call and they have "
                                  "changed since; pass compile=False, or a copy of the model (copy.deepcopy)")
        self.model = model
        self.keys = [layer.clone() for layer in cache.keys]
        self.values = [layer.clone() for layer in cache.values]
        self.pad_lengths = cache.pad_lengths
        device = cache.keys.device
        self.slot = torch.tensor(cache.length, device=device)
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.rows = list(range(cache.batch_size))  # the cache row of each sequence still decoding

    def __call__(self, keep: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` to the sequences in `keep` (their places among the previous step's); their logits."""
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(self.rows, device=self.tokens.device)
        self.tokens[index, 0] = torch.tensor(tokens, device=self.tokens.device)
        with torch._inductor.config.patch(_COMPILE_CONFIG):
            logits = _compiled_static_step()(self.model, self.tokens, self.keys, self.values, self.slot,
                                             self.pad_lengths)
        self.slot += 1
        return logits if len(self.rows) == len(self.tokens) else logits[index]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_ids: Sequence[int] = (), num_samples: int = 1,
             tokenizer=None, compile: bool = False) -> list[list[Completion]]:
    """Complete each prompt num_samples times; result[i][j] is sample j of prompt i.

    A completion ends at a stop id (excluded; finish_reason "stop") or after max_new_tokens, or
    when the model's context is full ("length"). Pass the tokenizer to enable calculator tool calls.
    compile=True decodes with a step compiled for this model, batch size and length (see
    `_CompiledSteps`): tens of seconds the first time, faster after; for a model no longer trained.
    """
    _check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples)
    sampling = _Sampling(temperature, top_k, top_p, frozenset(stop_ids))
    rows = _new_rows(prompts, num_samples, max_new_tokens, model.config.max_seq_len)
    for _ in _decode(model, prompts, rows, num_samples, sampling, seed, tokenizer, compile):
        pass
    completions = [Completion(row.tokens, row.finish_reason) for row in rows]
    return [completions[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


class TokenStream:
    """Iterator over one completion's token ids as they are decoded; `finish_reason` is set
    ("stop" or "length") once it is exhausted, None before."""

    def __init__(self, tokens: Iterator[int], row: _Row):
        self._tokens = tokens
        self._row = row

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        return next(self._tokens)

    @property
    def finish_reason(self) -> str | None:
        return self._row.finish_reason


def stream(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop_ids: Sequence[int] = (), tokenizer=None) -> TokenStream:
    """Yield the completion of one prompt token by token (the same tokens generate() returns).

    Arguments are checked at call time: a prompt that fills the context raises ContextLengthError.
    """
    prompts = [list(prompt_ids)]
    _check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples=1)
    sampling = _Sampling(temperature, top_k, top_p, frozenset(stop_ids))
    rows = _new_rows(prompts, 1, max_new_tokens, model.config.max_seq_len)
    events = _decode(model, prompts, rows, 1, sampling, seed, tokenizer)
    return TokenStream((token for _, token in events), rows[0])


# --- continuous batching: a step-level decode API -------------------------------------------------
@dataclass(frozen=True)
class StepEvent:
    """What one step did to one sequence: the token it accepted (None when the sequence stopped
    on a stop id or was cancelled) and, when it ended, why (FINISH_STOP, FINISH_LENGTH or
    FINISH_CANCELLED)."""

    sequence: int
    token: int | None
    finish_reason: str | None


FINISH_CANCELLED = "cancelled"  # the caller cancelled the sequence


@dataclass
class _Live:
    """A sequence in a ContinuousBatch: its decoding row and the way it samples."""

    row: _Row
    sampling: _Sampling
    generator: torch.Generator | None
    cancelled: bool = False


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
    own temperature / top-k / top-p / seed), lets finished and cancelled sequences leave, merges
    the newcomers into the shared KV cache and runs one forward pass over every sequence that goes
    on. Not thread-safe: one thread owns it. Stop ids, context limits and calculator tool calls
    behave as in `generate`; a request alone in the batch gets exactly what `generate` returns.
    """

    def __init__(self, model: Transformer, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        self._tools = _tool_ids(tokenizer)
        self._device = model.lm_head.weight.device
        self._next_id = 0
        self._pending: list[tuple[list[int], list[int]]] = []  # (prompt, its sequence ids)
        self._live: dict[int, _Live] = {}
        self._order: list[int] = []  # sequence id of each cache row
        self._cache: KVCache | None = None
        self._logits: torch.Tensor | None = None  # next-token logits, one row per cache row

    def __len__(self) -> int:
        """Sequences not finished yet (queued or decoding)."""
        return len(self._live)

    def add(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, seed: int | None = None, stop_ids: Sequence[int] = (),
            num_samples: int = 1) -> list[int]:
        """Queue a prompt; returns the ids of its num_samples sequences. Bad arguments raise
        GenerationError (ContextLengthError for a prompt that fills the context) at once."""
        prompt = list(prompt)
        _check_arguments(self.model, [prompt], max_new_tokens, temperature, top_k, top_p, num_samples)
        sampling = _Sampling(temperature, top_k, top_p, frozenset(stop_ids))
        generator = torch.Generator(device=self._device).manual_seed(seed) if seed is not None else None
        ids = list(range(self._next_id, self._next_id + num_samples))
        self._next_id += num_samples
        for sequence, row in zip(ids, _new_rows([prompt], num_samples, max_new_tokens, self.model.config.max_seq_len)):
            self._live[sequence] = _Live(row, sampling, generator)
        self._pending.append((prompt, ids))
        return ids

    def cancel(self, sequence: int) -> None:
        """End a sequence at the next step (its event has finish_reason FINISH_CANCELLED); unknown
        or finished ids are ignored."""
        if sequence in self._live:
            self._live[sequence].cancelled = True

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        """Advance every sequence by one token; an event per sequence (none when the batch is empty)."""
        events = [StepEvent(s, None, FINISH_CANCELLED) for s, live in self._live.items() if live.cancelled]
        for event in events:
            del self._live[event.sequence]
        new_cache, new_order, new_logits = self._prefill_pending()
        order = self._order + new_order
        if not order:
            return events
        logits = new_logits if self._logits is None else (
            self._logits if new_logits is None else torch.cat([self._logits, new_logits]))
        tokens = self._sample(order, logits)
        keep: list[int] = []  # positions in `order` of the sequences that go on
        next_tokens: list[int] = []
        for position, sequence in enumerate(order):
            live = self._live.get(sequence)
            if live is None:  # cancelled above
                continue
            row = live.row
            forced = bool(row.forced)
            token = row.forced.popleft() if forced else tokens[position]
            goes_on = _accept(row, token, forced, live.sampling, self._tools, self.tokenizer)
            accepted = None if row.finish_reason == FINISH_STOP else token
            events.append(StepEvent(sequence, accepted, None if goes_on else row.finish_reason))
            if goes_on:
                keep.append(position)
                next_tokens.append(token)
            else:
                del self._live[sequence]
        self._advance(order, keep, next_tokens, new_cache)
        return events

    def _prefill_pending(self) -> tuple[KVCache | None, list[int], torch.Tensor | None]:
        """Prefill the queued prompts still wanted, as one left-padded batch, one cache row per sequence."""
        pending = [(prompt, [s for s in ids if s in self._live]) for prompt, ids in self._pending]
        pending = [(prompt, ids) for prompt, ids in pending if ids]
        self._pending = []
        if not pending:
            return None, [], None
        prompts = [prompt for prompt, _ in pending]
        width = max(len(p) for p in prompts)
        pad_lengths = [width - len(p) for p in prompts]
        cache = KVCache(self.model.config, len(prompts), width, device=self._device,
                        dtype=self.model.lm_head.weight.dtype, pad_lengths=pad_lengths)
        padded = torch.tensor([[0] * pad + p for pad, p in zip(pad_lengths, prompts)], device=self._device)
        logits = self.model(padded, kv_cache=cache, logits_to_keep=1)[:, -1]
        copies = [index for index, (_, ids) in enumerate(pending) for _ in ids]
        if len(copies) > len(prompts):
            cache.select_rows(copies)
            logits = logits[copies]
        return cache, [s for _, ids in pending for s in ids], logits

    def _sample(self, order: list[int], logits: torch.Tensor) -> list[int]:
        """One sampled token per row of logits; rows that sample alike share one call."""
        groups: dict[tuple, list[int]] = {}
        for position, sequence in enumerate(order):
            live = self._live.get(sequence)
            if live is not None and not live.row.forced:
                s = live.sampling
                groups.setdefault((s.temperature, s.top_k, s.top_p, live.generator), []).append(position)
        tokens = [0] * len(order)
        for (temperature, top_k, top_p, generator), positions in groups.items():
            rows = logits if len(positions) == len(order) else logits[positions]
            for position, token in zip(positions, sample_next(rows, temperature, top_k, top_p, generator).tolist()):
                tokens[position] = token
        return tokens

    def _advance(self, order: list[int], keep: list[int], next_tokens: list[int], new_cache: KVCache | None) -> None:
        """Keep the cache rows of the sequences that go on, merge in the newcomers, run one step."""
        if not keep:
            self._cache, self._order, self._logits = None, [], None
            return
        old_rows = len(self._order)
        if new_cache is not None or len(keep) < old_rows:
            remaining = max(self._live[order[p]].row.limit - len(self._live[order[p]].row.tokens) for p in keep)
            parts = [(self._cache, [p for p in keep if p < old_rows])] if self._cache is not None else []
            if new_cache is not None:
                parts.append((new_cache, [p - old_rows for p in keep if p >= old_rows]))
            self._cache = _repack(parts, remaining, self.model.config, self._device, self.model.lm_head.weight.dtype)
        self._order = [order[p] for p in keep]
        step_input = torch.tensor(next_tokens, device=self._device)[:, None]
        self._logits = self.model(step_input, kv_cache=self._cache)[:, -1]
