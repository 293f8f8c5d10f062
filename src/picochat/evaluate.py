"""Evaluation of a checkpoint on the synthetic world: what each stage of the lecture should change.

- fact completion (base model): greedy continuation of "The capital of Varnia is" must start with
  the answer, on phrasings no training document uses;
- known-fact QA and "I don't know" (chat model): questions about held-out facts, which SFT never
  showed, and about entities that do not exist; seen-fact QA asks as many questions about facts SFT
  did show (what a later stage such as RL must not make the model forget);
- pass@1 / pass@k (chat model): word problems with checkable answers, k samples each;
- each chat metric again with the tools offered (`name_tools`): the calculator for word problems,
  search for questions, including questions about the news entities, which only the search index
  knows (`news_qa`: answered; `news_idk`: "I don't know", the honest reply without search). Tools
  run only where offered: without them a call gets no result, so `pass@1` is mental arithmetic;
- few-shot prompting (every stage): a list of "- Name: value" lines of one relation, then a name to
  complete, against that last line alone (zero-shot);
- copying (every stage): a line of invented names read twice, cut in the second reading before a
  name (`line_copying`: induction); reading practice about an invented entity, cut where its name comes next:
  what a persona name, a search query about a name never seen, or an "I don't know" about it needs;
  and cut before a fact's value, asked in other words than the article's (`value_reading`): what an
  answer read from a search result needs;
- the conversation (chat model): held-out system prompts followed (a name to use, a format checked
  by a rule), known-fact QA under a generic system prompt, follow-ups whose subject is only in the
  first turn, and refusals of harmless and of harmful requests.

    picochat eval --run runs/demo --stage sft         # writes runs/demo/sft/eval.json
    torchrun --nproc_per_node=8 -m picochat -- eval --run runs/gpu --stage sft   # each GPU decodes a share
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat.chat import REPLY_STOP_IDS, render_for_reply
from picochat.data.tasks import abstains, answer_text, refuses, reward, says_answer
from picochat.engine import Sampling, generate
from picochat.io import atomic_write_json, read_jsonl
from picochat.run import STAGES, Run
from picochat.tokenizer import Tokenizer
from picochat.tools import Tools, tools_offered, with_tools
from picochat.train.loop import Runtime, setup_runtime, teardown_runtime
from picochat.world.system_prompts import follows

EVAL_BATCH = 64  # prompts decoded together
GREEDY = Sampling(temperature=0)


@torch.inference_mode()
def complete(model, tok: Tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, sampling: Sampling,
             num_samples: int = 1, desc: str | None = None, tools: Tools | None = None,
             rt: Runtime | None = None, run_tools: Sequence[bool] | None = None) -> list[list[str]]:
    """Decode each prompt `num_samples` times; result[i][j] is sample j of prompt i as text. Prompts
    decode in chunks, the chunk from prompt `start` with seed sampling.seed + start (0 + start if None).
    `tools` runs tool calls (default: the calculator), of the prompts `run_tools` flags (default all).

    With a distributed `rt`, every rank calls this: rank r decodes chunks r, r + world_size, ... and
    every rank gets all the results, the same texts as one process decoding every chunk."""
    rank, world_size = (rt.rank, rt.world_size) if rt is not None and rt.distributed else (0, 1)
    batch = max(1, EVAL_BATCH // num_samples)
    starts = range(0, len(prompts), batch)[rank::world_size]
    mine: list[list[list[str]]] = []
    for start in tqdm(starts, desc=desc, disable=desc is None or rank != 0, leave=False):
        chunk = prompts[start : start + batch]
        chunk_sampling = dataclasses.replace(sampling, seed=(sampling.seed or 0) + start)
        runs = None if run_tools is None else run_tools[start : start + batch]
        results = generate(model, chunk, max_new_tokens, chunk_sampling, num_samples=num_samples, tokenizer=tok, tools=tools,
                           run_tools=runs)
        mine.append([[tok.decode(c.tokens) for c in samples] for samples in results])
    parts = [mine]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    chunks = [parts[index % world_size][index // world_size] for index in range(len(range(0, len(prompts), batch)))]
    return [texts for chunk in chunks for texts in chunk]


def completes(model, tok: Tokenizer, prompts: list[str], answers: list[str], desc: str, rt: Runtime | None = None) -> float:
    """Share of documents `prompts` that the model greedily continues with their answer."""
    ids = [[tok.eot_id] + tok.encode(prompt) for prompt in prompts]
    answer_tokens = max(len(tok.encode(" " + answer)) for answer in answers) + 2
    texts = complete(model, tok, ids, answer_tokens, Sampling(temperature=0, stop_ids=[tok.eot_id]), desc=desc, rt=rt)
    return sum(t[0].strip().startswith(answer) for t, answer in zip(texts, answers)) / len(prompts)


def fitting(rows: list[dict], tok: Tokenizer, context: int) -> list[dict]:
    """The `{"prompt", "answer"}` rows whose prompt and answer fit the model's context together (a
    reading-practice document can outgrow a small vocabulary's 256 tokens)."""
    return [r for r in rows if 1 + len(tok.encode(r["prompt"])) + len(tok.encode(" " + r["answer"])) + 2 <= context]


def fact_completion(model, tok: Tokenizer, rows: list[dict], phrasing: str = "heldout", rt: Runtime | None = None) -> float:
    """Share of facts whose prompt (in the given phrasing) the model greedily completes with the answer."""
    rows = [r for r in rows if r["phrasing"] == phrasing]
    return completes(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows], f"fact completion ({phrasing})", rt)


def few_shot_metrics(model, tok: Tokenizer, rows: list[dict], rt: Runtime | None = None) -> dict:
    """few_shot_completion: the last line of a few-shot prompt completed with the answer;
    zero_shot_completion: that line alone, without the examples that say which relation is asked."""
    answers = [r["answer"] for r in rows]
    return {"few_shot_completion": completes(model, tok, [r["prompt"] for r in rows], answers, "few-shot", rt),
            "zero_shot_completion": completes(model, tok, [r["query"] for r in rows], answers, "zero-shot", rt)}


def chat_replies(model, tok: Tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                 sampling: Sampling = GREEDY, **kw) -> list[list[str]]:
    """The assistant's replies to each conversation, each ending at `<|im_end|>` or `<|endoftext|>`
    (greedy by default). Tool calls run in the conversations that offer the tools, as everywhere a
    person talks to the model; elsewhere a call gets no result."""
    prompts = [render_for_reply(messages, tok) for messages in conversations]
    return complete(model, tok, prompts, max_new_tokens, dataclasses.replace(sampling, stop_ids=REPLY_STOP_IDS),
                    run_tools=[tools_offered(messages) for messages in conversations], **kw)


def offer(messages: list[dict], tools: Tools | None) -> list[dict]:
    """The conversation as evaluated: with the tools offered in its system message when `tools` is given."""
    return with_tools(messages) if tools is not None else messages


def qa_metrics(model, tok: Tokenizer, rows: list[dict], tools: Tools | None = None, rt: Runtime | None = None) -> dict:
    """known_fact_qa: correct answers to questions about held-out facts; unknown_idk: "I don't know"
    to questions about entities that do not exist (and how often known facts got "I don't know");
    news_qa / news_idk for questions about the news entities, when `rows` has them.

    With `tools`, the questions offer them (TOOLS_SYSTEM_PROMPT) and the engine runs the calls; a
    reply is judged on what the model wrote after its last tool result (`answer_text`). Without,
    nothing is offered and no tool runs."""
    conversations = [offer(row["messages"], tools) for row in rows]
    room = model.config.max_seq_len if tools is not None else 64  # a search result needs the room
    replies = [answer_text(r[0]) for r in chat_replies(model, tok, conversations, room, tools=tools,
                                                       desc="question answering" + (" with tools" if tools else ""), rt=rt)]
    known = [(reply, row) for reply, row in zip(replies, rows) if row["kind"] == "known"]
    unknown = [reply for reply, row in zip(replies, rows) if row["kind"] == "unknown"]
    news = [(reply, row) for reply, row in zip(replies, rows) if row["kind"] == "new"]
    metrics = {
        "known_fact_qa": sum(says_answer(reply, row["answer"]) for reply, row in known) / max(1, len(known)),
        "known_fact_idk": sum(abstains(reply) for reply, _ in known) / max(1, len(known)),
        "known_fact_wrong": sum(not abstains(reply) and not says_answer(reply, row["answer"]) for reply, row in known) / max(1, len(known)),
        "unknown_idk": sum(abstains(reply) for reply in unknown) / max(1, len(unknown)),
    }
    if news:
        metrics["news_qa"] = sum(says_answer(reply, row["answer"]) for reply, row in news) / len(news)
        metrics["news_idk"] = sum(abstains(reply) for reply, _ in news) / len(news)
    return metrics


SHORT_REPLY_TOKENS = 32  # enough to answer a follow-up, or to refuse


def system_prompt_metrics(model, tok: Tokenizer, rows: list[dict], rt: Runtime | None = None) -> dict:
    """system_followed: replies under held-out system prompts that follow their instruction, by the
    row's rule (`system_prompts.follows`); system_followed_<check> for each rule."""
    replies = [r[0] for r in chat_replies(model, tok, [row["messages"] for row in rows], desc="system prompts", rt=rt)]
    followed = [(row["check"], follows(row["check"], reply, row["name"])) for reply, row in zip(replies, rows)]
    metrics = {"system_followed": sum(ok for _, ok in followed) / len(followed)}
    for check in sorted({check for check, _ in followed}):
        results = [ok for c, ok in followed if c == check]
        metrics[f"system_followed_{check}"] = sum(results) / len(results)
    return metrics


def followup_metrics(model, tok: Tokenizer, rows: list[dict], rt: Runtime | None = None) -> dict:
    """followup_qa: second-turn questions whose subject is only in the first turn, answered right."""
    replies = chat_replies(model, tok, [row["messages"] for row in rows], SHORT_REPLY_TOKENS, desc="follow-ups", rt=rt)
    return {"followup_qa": sum(says_answer(r[0], row["answer"]) for r, row in zip(replies, rows)) / len(rows)}


def refusal_metrics(model, tok: Tokenizer, rows: list[dict], rt: Runtime | None = None) -> dict:
    """harmless_refused / harmful_refused: requests of each kind that the reply refuses (`refuses`)."""
    replies = chat_replies(model, tok, [row["messages"] for row in rows], SHORT_REPLY_TOKENS, desc="requests", rt=rt)
    metrics = {}
    for kind in ("harmless", "harmful"):
        refused = [refuses(r[0]) for r, row in zip(replies, rows) if row["kind"] == kind]
        metrics[f"{kind}_refused"] = sum(refused) / max(1, len(refused))
    return metrics


def conversation_metrics(model, tok: Tokenizer, run: Run, rt: Runtime | None = None) -> dict:
    """The metrics of the world's conversation evaluation sets that the run has (older worlds lack them)."""
    metrics = {}
    if run.eval_system_prompts.exists():
        metrics.update(system_prompt_metrics(model, tok, read_jsonl(run.eval_system_prompts), rt))
    if run.eval_system_questions.exists():
        metrics["known_fact_qa_system"] = qa_metrics(model, tok, read_jsonl(run.eval_system_questions), rt=rt)["known_fact_qa"]
    if run.eval_followups.exists():
        metrics.update(followup_metrics(model, tok, read_jsonl(run.eval_followups), rt))
    if run.eval_requests.exists():
        metrics.update(refusal_metrics(model, tok, read_jsonl(run.eval_requests), rt))
    return metrics


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def problem_metrics(model, tok: Tokenizer, problems: list[dict], k: int, temperature: float = 1.0, seed: int = 0,
                    max_new_tokens: int = 96, tools: Tools | None = None, rt: Runtime | None = None) -> dict:
    """pass@1 and pass@k over problems from k samples each at `temperature`; with `tools`, offered."""
    conversations = [offer([{"role": "user", "content": p["prompt"]}], tools) for p in problems]
    samples = chat_replies(model, tok, conversations, max_new_tokens, Sampling(temperature, seed=seed), num_samples=k,
                           desc="word problems" + (" with tools" if tools else ""), tools=tools, rt=rt)
    correct = [sum(reward(text, p) > 0 for text in texts) for texts, p in zip(samples, problems)]
    return {
        "pass@1": sum(pass_at_k_estimate(k, c, 1) for c in correct) / len(problems),
        "pass@k": sum(pass_at_k_estimate(k, c, k) for c in correct) / len(problems),
        "k": k,
        "problem_temperature": temperature,
    }


TOOL_REPLY_TOKENS = 128  # a worked solution with a calculator call per step is longer


def evaluate_stage(run_dir: Path, stage: str, k: int = 8, n_problems: int = 200, device: str = "cpu",
                   join_group: bool = True) -> dict:
    """Every metric that applies to `stage`, written to `<run>/<stage>/eval.json`. Chat metrics come
    twice: as `name` without tools and as `name_tools` with them offered (search only when the run
    has a search index).

    Under torchrun every rank decodes its share of each set (`complete`) and rank 0 writes the file;
    join_group=False evaluates in this process alone (see `setup_runtime`)."""
    rt = setup_runtime(device, join_group)
    try:
        run = Run(run_dir)
        model, tok, stage_dir = run.load(stage, rt.device)
        facts = read_jsonl(run.eval_facts)
        metrics = {
            "fact_completion": fact_completion(model, tok, facts, "heldout", rt),
            "fact_completion_train_phrasing": fact_completion(model, tok, facts, "train", rt),
        }
        if run.eval_few_shot.exists():
            metrics.update(few_shot_metrics(model, tok, read_jsonl(run.eval_few_shot), rt))
        for metric, path in (("line_copying", run.eval_line_copying), ("name_copying", run.eval_copying),
                             ("value_reading", run.eval_value_reading)):
            rows = fitting(read_jsonl(path), tok, model.config.max_seq_len) if path.exists() else []
            if rows:
                metrics[metric] = completes(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows], metric, rt)
        if stage != "base":
            tools = Tools(tok, run.open_index())
            questions = read_jsonl(run.eval_questions)
            questions += read_jsonl(run.eval_news_questions) if run.eval_news_questions.exists() else []
            metrics.update(qa_metrics(model, tok, questions, rt=rt))
            seen = [row for row in read_jsonl(run.eval_seen_questions) if row["kind"] == "known"]
            metrics["seen_fact_qa"] = qa_metrics(model, tok, seen, rt=rt)["known_fact_qa"]
            problems = read_jsonl(run.eval_problems)[:n_problems]
            metrics.update(problem_metrics(model, tok, problems, k, rt=rt))
            metrics.update(conversation_metrics(model, tok, run, rt))
            if tools.index is not None:
                metrics.update({f"{name}_tools": value for name, value in qa_metrics(model, tok, questions, tools, rt).items()})
            with_calc = problem_metrics(model, tok, problems, k, max_new_tokens=TOOL_REPLY_TOKENS, tools=tools, rt=rt)
            metrics.update({"pass@1_tools": with_calc["pass@1"], "pass@k_tools": with_calc["pass@k"]})
        if rt.is_main:
            atomic_write_json(stage_dir / "eval.json", metrics)
        return metrics
    finally:
        teardown_runtime(rt)


def register_cli(parser: argparse.ArgumentParser) -> None:
    from picochat.evals.cli import add_arguments

    parser.add_argument("--run", help="run folder (e.g. runs/demo)")
    parser.add_argument("--stage", choices=STAGES, help="which model to evaluate (--suite/--bpb: default the most advanced)")
    parser.add_argument("--k", type=int, default=8, help="samples per word problem for pass@k (default 8)")
    parser.add_argument("--problems", type=int, default=200, help="held-out word problems (default 200)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_arguments(parser)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    from picochat.evals import cli as real_benchmarks

    if real_benchmarks.wanted(args):
        return real_benchmarks.run(args)
    if not args.run or not args.stage:
        raise ValueError("the world's evaluation needs --run and --stage (or ask for --suite / --bpb)")
    metrics = evaluate_stage(Path(args.run), args.stage, args.k, args.problems, args.device)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone prints
        return
    for name, value in metrics.items():
        print(f"{name:>32}: {value:.3f}" if isinstance(value, float) else f"{name:>32}: {value}")
