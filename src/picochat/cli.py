"""The `picochat` command: one subcommand per stage of the pipeline.

Each stage lives in its own module and exposes `register_cli(parser)`, which adds the stage's
arguments and sets `parser.set_defaults(func=...)`. Modules are imported lazily, only for the
subcommand being run, so `picochat --help` and light commands start fast (no torch import).
Errors from bad input or state print one line and exit 2; PICOCHAT_TRACEBACK=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, or module:function registering the command instead of register_cli; one-line help).
# The order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("picochat.world", "generate the embedded synthetic world (documents, eval sets)"),
    "download": ("picochat.data.download", "download FineWeb-edu parquet shards from the Hugging Face Hub"),
    "tokenizer": ("picochat.tokenizer", "train / inspect the byte-level BPE tokenizer"),
    "data": ("picochat.data.shards", "tokenize documents into binary token shards"),
    "index": ("picochat.data.index", "build / query a search index over documents (the search tool)"),
    "plan": ("picochat.plan", "print a preset's tokens, steps, FLOPs, memory and hours before training"),
    "pretrain": ("picochat.train.pretrain", "pretrain the Transformer on token shards (base model)"),
    "sample": ("picochat.sample", "continue a document with the base model"),
    "sft": ("picochat.train.sft", "supervised fine-tuning on conversations (chat model)"),
    "rl": ("picochat.train.rl", "reinforcement learning on verifiable problems"),
    "prefs": ("picochat.world.preferences", "rank sampled replies with the world's simulated labeler; judge win rates"),
    "rm": ("picochat.train.rm", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("picochat.train.dpo", "Direct Preference Optimisation on preference pairs"),
    "rlhf": ("picochat.train.rlhf", "RL against the reward model, with a KL penalty to the SFT model"),
    "chat": ("picochat.chat_cli", "talk to a chat model in the terminal"),
    "eval": ("picochat.evaluate", "evaluate a checkpoint: the world's sets; real benchmarks (--suite core/chat, --bpb)"),
    "speedrun": ("picochat.speedrun", "run every stage end to end and write a report card"),
    "serve": ("picochat.serve.app", "OpenAI-compatible API and web chat"),
    "export": ("picochat.hf:register_export_cli", "export a checkpoint to the Hugging Face format"),
    "import": ("picochat.hf:register_import_cli", "import a Hugging Face Qwen3/Llama checkpoint as a run"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picochat",
        description="Build your own ChatGPT end to end: tokenizer -> pretraining -> SFT -> RL -> chat.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (target, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module, _, register = target.partition(":")
            getattr(importlib.import_module(module), register or "register_cli")(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(0 if args.command is None else 2)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input or state: a message, not a traceback
        if os.environ.get("PICOCHAT_TRACEBACK"):
            raise
        print(f"picochat {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
