"""The tokenizer: byte-level BPE with GPT-2's split pattern and reserved special tokens.

Training and encoding go through Hugging Face `tokenizers` (Rust); the result is a standard
`tokenizer.json`. Special tokens have fixed ids 0..8 whatever the vocabulary size, and are never
produced from text unless the caller asks (`allow_special=True`): a user who types `<|im_end|>`
gets the plain characters, not the end-of-turn token.

`as_tiktoken()` builds a `tiktoken.Encoding` on the same merges, a faster encoder for big corpora
that gives identical ids (tested).

CLI: `picochat tokenizer train|show|stats`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from picochat.io import atomic_write_text

SPECIAL_TOKENS = [
    "<|endoftext|>",  # document boundary; also the first token of every document
    "<|im_start|>",  # start of a chat message
    "<|im_sep|>",  # between a message's role and its content
    "<|im_end|>",  # end of a message (end of turn)
    "<|tool_call|>",  # the assistant calls a tool: <|tool_call|>expression<|/tool_call|>
    "<|/tool_call|>",
    "<|tool_result|>",  # the engine feeds the tool's answer back: <|tool_result|>42<|/tool_result|>
    "<|/tool_result|>",
    "<|pad|>",  # padding, never trained on
]
# Their ids, fixed by design: every picochat tokenizer reserves ids 0..8 in this order.
EOT_ID, IM_START_ID, IM_SEP_ID, IM_END_ID, TOOL_CALL_ID, TOOL_CALL_END_ID, TOOL_RESULT_ID, TOOL_RESULT_END_ID, PAD_ID = \
    range(len(SPECIAL_TOKENS))

# GPT-2's pre-tokenization pattern: words with the space before them, numbers with theirs, runs of
# punctuation, spaces. A number keeps its space (" 12", not " " + "12"): copying a number from a
# question into the working is then the token that followed the same word before, a plain induction
# pattern that doubled a tiny model's word-problem accuracy (BENCHMARKS.md). GPT-4's pattern, which
# splits numbers off their space, was picochat's base until it chose GPT-2's because llama.cpp
# implements this split by name (`tokenizer.ggml.pre = "gpt-2"`), so a GGUF export runs in stock
# llama.cpp, Ollama and LM Studio (BENCHMARKS.md, "The split llama.cpp knows").
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GGUF_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for SPLIT_PATTERN (llama-vocab.cpp)

# Long documents are cut into pieces for training: merges are local, and this bounds memory.
TRAIN_CHUNK_CHARS = 10_000


def read_tokenizer_file(path: Path) -> HFTokenizer:
    """A tokenizer.json as a Hugging Face `tokenizers.Tokenizer`; ValueError naming the file if it is not one."""
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None


class Tokenizer:
    """A trained BPE tokenizer: encode, decode, inspect; loaded from / saved to `tokenizer.json`."""

    def __init__(self, hf: HFTokenizer):
        misplaced = [f"{token} at {hf.token_to_id(token)}" for i, token in enumerate(SPECIAL_TOKENS)
                     if hf.token_to_id(token) != i]
        if misplaced:
            raise ValueError(f"picochat's chat protocol needs its special tokens at ids 0..{len(SPECIAL_TOKENS) - 1} "
                             f"({', '.join(SPECIAL_TOKENS)}); this tokenizer has {'; '.join(misplaced)} (None = absent)")
        self._special = hf
        # A second instance that treats special-token strings as ordinary text.
        self._plain = HFTokenizer.from_str(hf.to_str())
        self._plain.encode_special_tokens = True
        self.vocab_size = hf.get_vocab_size()
        self.eot_id, self.im_start_id, self.im_sep_id, self.im_end_id = EOT_ID, IM_START_ID, IM_SEP_ID, IM_END_ID
        self.pad_id = PAD_ID
        self.fingerprint = hashlib.sha256(hf.to_str().encode()).hexdigest()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> "Tokenizer":
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
        hf = HFTokenizer(BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=0,
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=SPECIAL_TOKENS,
        )
        hf.train_from_iterator(_chunks(texts), trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer here (train one with `picochat tokenizer train`)")
        return cls(read_tokenizer_file(path))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (path may be a folder or a .json file)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self._special.to_str(pretty=True))
        return path

    def as_json(self) -> dict:
        """The tokenizer.json contents: model (vocab, merges), pre-tokenizer, decoder, added tokens."""
        return json.loads(self._special.to_str())

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        hf = self._special if allow_special else self._plain
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        hf = self._special if allow_special else self._plain
        return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._special.decode(list(ids), skip_special_tokens=False)

    def special_id(self, token: str) -> int:
        if token not in SPECIAL_TOKENS:
            raise KeyError(f"{token!r} is not a special token; they are {SPECIAL_TOKENS}")
        return SPECIAL_TOKENS.index(token)

    def id_to_piece(self, token_id: int) -> str:
        """The token's text for display (bytes that are not whole UTF-8 characters show as U+FFFD)."""
        if token_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token_id]
        return self.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of a non-special token."""
        return bytes(_BYTE_OF_CHAR[c] for c in self._special.id_to_token(token_id))

    def as_tiktoken(self):
        """A `tiktoken.Encoding` with the same merges and ids (a faster encoder for big corpora)."""
        import tiktoken

        ranks = {self.token_bytes(i): i for i in range(len(SPECIAL_TOKENS), self.vocab_size)}
        return tiktoken.Encoding(
            name=f"picochat-{self.fingerprint[:12]}",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={t: i for i, t in enumerate(SPECIAL_TOKENS)},
        )

    def bytes_per_token(self, texts: Iterable[str]) -> tuple[float, int, int]:
        """(bytes per token, total bytes, total tokens) over texts."""
        n_bytes = n_tokens = 0
        for batch in _batched(texts, 256):
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            n_tokens += sum(len(ids) for ids in self.encode_batch(batch))
        return (n_bytes / n_tokens if n_tokens else float("nan")), n_bytes, n_tokens


MAX_PENDING_TOKENS = 8  # bytes that never form a character are released after this many tokens


class TextStream:
    """Token ids pushed one at a time in, text made of whole UTF-8 characters out.

    A character can span tokens; text is held back while the decoded tail is an incomplete
    character (U+FFFD) and released as soon as it completes."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        """The text that this token completes ("" while a character is still incomplete)."""
        self._pending.append(token_id)
        text = self._tok.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) <= MAX_PENDING_TOKENS:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back, once no token will follow."""
        text = self._tok.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


def iter_text(tok: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """A stream of token ids as a stream of text holding whole UTF-8 characters only (`TextStream`)."""
    stream = TextStream(tok)
    for token_id in ids:
        if text := stream.push(token_id):
            yield text
    if text := stream.flush():
        yield text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel pre-tokenization."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for i in range(0, len(text), TRAIN_CHUNK_CHARS):
            yield text[i : i + TRAIN_CHUNK_CHARS]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def limit_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts, the last one cut, up to max_chars characters in all (a cap on tokenizer training text)."""
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        text = text[: max_chars - seen]
        seen += len(text)
        yield text


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="<action>", required=True)

    p = sub.add_parser("train", help="train a BPE tokenizer on documents", description="Train a byte-level BPE tokenizer (GPT-2's split pattern, reserved special tokens) on documents and save tokenizer.json.")
    p.add_argument("--input", nargs="+", required=True, help="files or folders of documents (.txt, .jsonl, .parquet, optionally .gz)")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json is written there)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including the special tokens (default 8192)")
    p.add_argument("--max-chars", type=float, default=2e9, help="train on at most this many characters (default 2e9)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("show", help="show how a text is split into tokens", description="Print the text as coloured token pieces, then the ids and the count (the lecture's tokenizer view).")
    p.add_argument("text", help="the text to tokenize")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding it (e.g. runs/demo/tokenizer)")
    p.add_argument("--allow-special", action="store_true", help="turn special-token strings such as <|im_end|> into their ids")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("stats", help="bytes per token on held-out text", description="Report bytes per token (compression) of a tokenizer on held-out documents.")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding it")
    p.add_argument("--input", nargs="+", required=True, help="held-out documents (not used in training)")
    p.add_argument("--max-chars", type=float, default=5e7, help="read at most this many characters (default 5e7)")
    p.set_defaults(func=_cmd_stats)


def _cmd_train(args) -> None:
    from picochat.data.sources import iter_documents

    t0 = time.time()
    texts = limit_chars(iter_documents(args.input), int(args.max_chars))
    tok = Tokenizer.train(texts, args.vocab_size, show_progress=True)
    path = tok.save(args.out)
    seconds = time.time() - t0
    info = {"vocab_size": tok.vocab_size, "inputs": [str(p) for p in args.input], "seconds": round(seconds, 2), "fingerprint": tok.fingerprint}
    atomic_write_text(Path(args.out) / "train_info.json", json.dumps(info, indent=2))
    print(f"tokenizer: vocab {tok.vocab_size} trained in {seconds:.1f}s -> {path}")


# Background colours cycled over the pieces, as the lecture's tokenizer view does.
_COLOURS = ["\x1b[48;5;153m", "\x1b[48;5;186m", "\x1b[48;5;151m", "\x1b[48;5;217m", "\x1b[48;5;223m", "\x1b[48;5;189m"]


def render_pieces(tok: Tokenizer, ids: list[int], colour: bool = True) -> str:
    """The pieces of `ids` side by side, alternately coloured (or bracketed without colour)."""
    out = []
    for n, i in enumerate(ids):
        piece = tok.id_to_piece(i)
        out.append(f"{_COLOURS[n % len(_COLOURS)]}\x1b[30m{piece}\x1b[0m" if colour else f"[{piece}]")
    return "".join(out)


def _cmd_show(args) -> None:
    import sys

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text, allow_special=args.allow_special)
    print(render_pieces(tok, ids, colour=sys.stdout.isatty()))
    print(ids)
    print(f"{len(ids)} tokens, {len(args.text.encode('utf-8'))} bytes")


def _cmd_stats(args) -> None:
    from picochat.data.sources import iter_documents

    tok = Tokenizer.load(args.tokenizer)
    bpt, n_bytes, n_tokens = tok.bytes_per_token(limit_chars(iter_documents(args.input), int(args.max_chars)))
    print(f"{n_bytes:,} bytes -> {n_tokens:,} tokens: {bpt:.3f} bytes per token (vocab {tok.vocab_size})")


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 length of every token (0 for special tokens), for bits-per-byte."""
    return [0] * len(SPECIAL_TOKENS) + [len(tok.token_bytes(i)) for i in range(len(SPECIAL_TOKENS), tok.vocab_size)]
