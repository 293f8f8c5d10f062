"""The embedded synthetic world: the demo data every stage of the lecture trains and is evaluated on.

A small fictional knowledge base and everything written from it. The pipeline itself knows nothing
of it; only the speedrun, the evaluation and the report card import this package.

    knowledge.py      entities and facts: build_world, World, save_world / load_world, fact-completion rows
    phrasings.py      how each relation is put into words: templates, held-out phrasings, questions
    documents.py      pretraining documents in nine styles; write_world (docs/, docs-val.jsonl, world.json)
    word_problems.py  word problems with worked solutions; write_tasks (tasks-sft/-rl.jsonl, eval/tasks.jsonl)
    chats.py          SFT conversations, the QA, follow-up and system-prompt eval sets, the RL fact questions; write_chat
    system_prompts.py system messages: generic ones, a name to use, a format to follow (and the rules that check it)
    requests.py       requests from outside the world: harmless ones to attempt, harmful ones to refuse; small talk
    few_shot.py       few-shot prompts for the base model
    tool_chats.py     conversations using the calculator and search; write_tool_chats
    preferences.py    the simulated labeler and its instructions, open prompts, ranked pairs (`picochat prefs`)

`generate` writes all of it (`picochat world generate`); `picochat world show` prints samples.
"""

from __future__ import annotations

import argparse
import inspect
import random
from pathlib import Path

from picochat.world.chats import write_chat
from picochat.world.documents import DOC_STYLES, NEWS_FILE, PRACTICE_FILE, write_world
from picochat.world.knowledge import KINDS, PLURALS, build_world
from picochat.world.tool_chats import write_tool_chats
from picochat.world.word_problems import write_tasks


def generate(out: str | Path, size_mb: float = 50, scale: float = 1.0, seed: int = 0, n_chats: int = 4500,
             n_sft_tasks: int = 1200, n_rl_tasks: int = 2000, n_eval_tasks: int = 500, shard_mb: float = 10,
             val_kb: float = 300, n_calc_chats: int = 1000, n_search_chats: int = 2000, n_rl_calc_tasks: int = 2000) -> dict:
    """Write every file of the world under `out` and return what each writer reports:
    `{"world": manifest, "chat": counts, "tools": counts, "tasks": counts per level}`.

    The documents come first (a rerun over complete documents skips them), then the conversations
    (the tool-using ones search an index of the documents and the news articles), then the word
    problems; eval/tasks.jsonl is written last, so its presence marks a complete world.
    """
    world = write_world(out, size_mb=size_mb, seed=seed, shard_mb=shard_mb, val_kb=val_kb, scale=scale)
    chat = write_chat(out, n_chats, seed=seed)
    tools = write_tool_chats(out, search_documents(out), n_calc_chats, n_search_chats, n_rl_calc_tasks, seed=seed)
    tasks = write_tasks(out, n_sft=n_sft_tasks, n_rl=n_rl_tasks, n_eval=n_eval_tasks, seed=seed)
    return {"world": world, "chat": chat, "tools": tools, "tasks": tasks}


def search_documents(out: str | Path) -> list[Path]:
    """What the search tool indexes for the world under `out`: its training documents, the news and the
    practice entities' articles."""
    return [Path(out) / "docs", Path(out) / NEWS_FILE, Path(out) / PRACTICE_FILE]


def _default(name: str):
    return inspect.signature(generate).parameters[name].default


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="<action>", required=True)
    p = sub.add_parser("generate", help="write the world's documents, conversations, problems and eval sets",
                       description="Generate the synthetic world: pretraining documents (docs/), validation documents, "
                                   "SFT conversations, word problems, and the evaluation sets (eval/).")
    p.add_argument("--out", required=True, help="output folder, e.g. runs/demo/world")
    p.add_argument("--size-mb", type=float, default=_default("size_mb"),
                   help="megabytes of training documents (default %(default)s)")
    p.add_argument("--seed", type=int, default=_default("seed"),
                   help="world and document seed; the same seed gives the same bytes (default %(default)s)")
    p.add_argument("--shard-mb", type=float, default=_default("shard_mb"),
                   help="megabytes per training-document file (default %(default)s)")
    p.add_argument("--scale", type=float, default=_default("scale"),
                   help="multiply the number of entities (default %(default)s: 212 entities, 876 facts); below 1 the "
                        "facts are fewer and each is restated more often, so a small model learns them sooner")
    p.add_argument("--conversations", type=int, default=_default("n_chats"),
                   help="SFT conversations about the world (default %(default)s)")
    p.add_argument("--task-conversations", type=int, default=_default("n_sft_tasks"),
                   help="SFT conversations solving word problems (default %(default)s)")
    p.add_argument("--calc-conversations", type=int, default=_default("n_calc_chats"),
                   help="SFT conversations solving word problems with the calculator (default %(default)s)")
    p.add_argument("--search-conversations", type=int, default=_default("n_search_chats"),
                   help="SFT conversations answering from a search (default %(default)s)")
    p.add_argument("--rl-calc-problems", type=int, default=_default("n_rl_calc_tasks"),
                   help="training word problems offered the tools, for RL (default %(default)s)")
    p.add_argument("--rl-problems", type=int, default=_default("n_rl_tasks"),
                   help="training word problems for RL (default %(default)s)")
    p.add_argument("--eval-problems", type=int, default=_default("n_eval_tasks"),
                   help="held-out word problems for evaluation (default %(default)s)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("show", help="print sample documents of each style and the entity counts",
                       description="Print the entity counts and a few sample documents of each style.")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of entities (default 1)")
    p.add_argument("--per-style", type=int, default=1, help="documents to show per style (default 1)")
    p.set_defaults(func=_cmd_show)


def _cmd_generate(args) -> None:
    done = generate(args.out, size_mb=args.size_mb, scale=args.scale, seed=args.seed, n_chats=args.conversations,
                    n_sft_tasks=args.task_conversations, n_rl_tasks=args.rl_problems, n_eval_tasks=args.eval_problems,
                    shard_mb=args.shard_mb, n_calc_chats=args.calc_conversations, n_search_chats=args.search_conversations,
                    n_rl_calc_tasks=args.rl_calc_problems)
    summary = done["world"]
    print(f"world: {summary['documents']:,} documents, {summary['train_bytes'] / 1e6:.1f} MB in "
          f"{len(summary['files']) - 3} files, {summary['facts']} facts about "
          f"{sum(summary['entities'].values())} entities ({summary['seconds']}s) -> {args.out}")
    print(f"chat: {done['chat']}\ntools: {done['tools']}\ntasks: {done['tasks']}")


def _cmd_show(args) -> None:
    world = build_world(args.seed, args.scale)
    counts = ", ".join(f"{len(world.of_kind(k))} {PLURALS[k]}" for k in KINDS)
    print(f"world {args.seed}: {counts}; {len(world.facts())} facts\n")
    rng = random.Random(f"show-{args.seed}")
    for style, (make, _) in DOC_STYLES.items():
        for _ in range(args.per_style):
            print(f"=== {style} ===\n{make(world, rng)}\n")
