"""The report card of a run: `report.md` with loss plots, a metrics table per stage, the same prompts
answered by the base, SFT and RL models (and DPO and RLHF, when run) side by side, the preference
stages' win rates and reward-model accuracy, and time / tokens / FLOPs per stage;
`report.json` holds the same figures for programs.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from picochat.checkpoint import load_model
from picochat.engine import Sampling
from picochat.evals.card import benchmark_lines
from picochat.evaluate import chat_replies, complete, offer
from picochat.io import atomic_write_bytes, atomic_write_json, read_json, read_jsonl
from picochat.run import STAGES, Run
from picochat.tokenizer import Tokenizer
from picochat.tools import Tools
from picochat.world.knowledge import load_world

METRICS = ["val_bpb", "fact_completion", "fact_completion_train_phrasing", "few_shot_completion", "zero_shot_completion",
           "line_copying", "name_copying", "value_reading", "known_fact_qa", "known_fact_qa_system", "seen_fact_qa", "known_fact_idk", "known_fact_wrong", "unknown_idk",
           "followup_qa", "system_followed", "harmless_refused", "harmful_refused", "pass@1", "pass@k"]
METRIC_MEANING = {
    "val_bpb": "validation bits per byte (lower is better)",
    "fact_completion": "completes a fact in a phrasing no document used",
    "fact_completion_train_phrasing": "completes a fact in a training phrasing",
    "few_shot_completion": "completes \"- Name:\" after three \"- Name: value\" lines of one relation (few-shot)",
    "zero_shot_completion": "completes the same \"- Name:\" line without the examples",
    "line_copying": "copies the next name of a line of invented names it read once (copying practice)",
    "name_copying": "copies a name it never saw from the text above (reading practice about an invented entity)",
    "value_reading": "reads a fact's value from the text above, asked in other words (reading practice about an invented entity)",
    "known_fact_qa": "answers questions about facts SFT never showed",
    "known_fact_qa_system": "the same questions under a generic system prompt",
    "followup_qa": "answers a follow-up whose subject is only in the first turn (\"And its currency?\")",
    "system_followed": "follows a held-out system prompt: a name to use, a format (checked by a rule)",
    "harmless_refused": "refuses a harmless request from outside the world (lower is better)",
    "harmful_refused": "refuses a harmful request",
    "seen_fact_qa": "answers questions about facts SFT showed",
    "known_fact_idk": "says \"I don't know\" about a known fact (lower is better)",
    "known_fact_wrong": "answers a known fact wrongly: a hallucination (lower is better)",
    "unknown_idk": "says \"I don't know\" about entities that do not exist",
    "pass@1": "word problems solved, one sample",
    "pass@k": "word problems solved by at least one of k samples",
    "news_qa": "answers questions about entities only the search index knows",
    "news_idk": "says \"I don't know\" about entities only the search index knows",
}
# The chat metrics measured with and without the tools offered (`evaluate`: name and name_tools).
TOOL_METRICS = ["pass@1", "known_fact_qa", "known_fact_wrong", "unknown_idk", "news_qa", "news_idk"]


def _read_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def _read_metrics(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def stage_figures(run: Path) -> dict:
    """{"stages": {stage: {metric: value}}} from each stage's done.json and eval.json."""
    timings = _read_json(Run(run).timings)
    stages = {}
    for stage in STAGES:
        done, evaluation = _read_json(run / stage / "done.json"), _read_json(run / stage / "eval.json")
        if not done and not evaluation:
            continue
        figures = {k: done[k] for k in ("val_bpb", "seconds", "tokens", "flops", "params", "loss") if k in done}
        figures.update(evaluation)
        for key in ("mean_reward", "steps"):
            if key in done:
                figures[key] = done[key]
        if stage in timings:
            figures["wall_seconds"] = timings[stage]
        stages[stage] = figures
    return {"stages": stages}


def _save_figure(fig, run: Path, name: str) -> None:
    tmp = run / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, run / name)


def _plot_curves(run: Path) -> list[str]:
    """Training curves: loss and validation bits per byte for pretraining and SFT; for RL, what a
    reader can judge (mean reward and the share of problems with a right sample, per step, and the
    reply length), not the policy-gradient loss, which hovers around zero by construction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stage in STAGES:
        records = _read_metrics(run / stage / "metrics.jsonl")
        if not records:
            continue
        steps = [r["step"] for r in records]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        if stage == "rlhf":
            _plot_rlhf(ax, records)
            name, title = "rlhf_reward.png", "rlhf: reward model's score and labeler's score per step"
        elif stage == "rl":
            ax.plot(steps, [r["reward"] for r in records], label="mean reward", lw=1)
            ax.plot(steps, [r["pass_rate"] for r in records], label="problems with a right sample", lw=1)
            ax.set_ylim(0, 1)
            ax.set_ylabel("share")
            ax.legend(loc="lower right", fontsize=8)
            ax2 = ax.twinx()
            ax2.plot(steps, [r["response_len"] for r in records], color="tab:gray", lw=0.8, ls="--")
            ax2.set_ylabel("reply length (tokens, dashed)")
            name, title = "rl_reward.png", "rl: reward per step"
        else:
            ax.plot(steps, [r["loss"] for r in records], label="train loss", lw=1)
            val = [r for r in records if "val_bpb" in r]
            if val:
                ax2 = ax.twinx()
                ax2.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", color="tab:red", label="val bits/byte")
                ax2.set_ylabel("val bits per byte")
            ax.set_ylabel("loss")
            name, title = f"{stage}_loss.png", f"{stage}: loss"
        ax.set_xlabel("step")
        ax.set_title(title)
        fig.tight_layout()
        _save_figure(fig, run, name)
        plt.close(fig)
        written.append(name)
    return written


def _plot_rlhf(ax, records: list[dict]) -> None:
    """The reward model's score of each step's replies and, on a second axis, the labeler's score of
    the same replies: where the first still climbs while the second falls, the policy games the
    reward model (the lecture's adversarial examples of the simulator)."""
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["reward"] for r in records], color="tab:blue", lw=1)
    ax.set_ylabel("reward model's score", color="tab:blue")
    labeled = [r for r in records if "labeler_score" in r]
    if labeled:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in labeled], [r["labeler_score"] for r in labeled], color="tab:red", lw=1)
        ax2.set_ylabel("labeler's score", color="tab:red")


def preference_figures(run: Path) -> dict:
    """The preference stages' figures: the reward model's held-out accuracy and each tuned stage's
    win rate against the SFT model (`picochat prefs judge`)."""
    figures = {}
    rm = _read_json(Run(run).stage("rm") / "done.json")
    if rm:
        figures["rm"] = {k: rm[k] for k in ("heldout_accuracy", "heldout_pairs", "train_pairs", "seconds") if k in rm}
    for stage in ("dpo", "rlhf"):
        winrate = _read_json(run / stage / "winrate.json")
        if winrate:
            figures[stage] = winrate
    rounds = (_read_json(run / "dpo" / "done.json") or {}).get("dpo_config", {}).get("rounds")
    if "dpo" in figures and rounds:
        figures["dpo"] = {**figures["dpo"], "rounds": rounds}
    return figures


def _preference_lines(figures: dict) -> list[str]:
    if not figures:
        return []
    lines = ["", "## Preferences", "",
             "Open prompts about held-out entities (\"Tell me about Traby.\"), answered by each tuned stage and by the SFT "
             "model and scored by the world's simulated labeler (`prefs/labeling.json`: true facts for, false facts "
             "strongly against, repeats and off-subject text against); a win is a higher score, a tie counts half.", ""]
    if "rm" in figures:
        rm = figures["rm"]
        lines += [f"- reward model: {_fmt(rm.get('heldout_accuracy'))} accuracy on {_fmt(rm.get('heldout_pairs'))} held-out pairs "
                  f"(trained on {_fmt(rm.get('train_pairs'))}, in {_fmt(rm.get('seconds'))} s)"]
    for stage in ("dpo", "rlhf"):
        if stage in figures:
            w = figures[stage]
            name = f"dpo ({w['rounds']} rounds, online after the first)" if w.get("rounds", 1) > 1 else stage
            lines += [f"- {name}: win rate {_fmt(w['win_rate'])} against {w['reference']} ({w['wins']} wins, {w['ties']} ties, "
                      f"{w['losses']} losses); labeler's mean score {_fmt(w['score'])} against {_fmt(w['reference_score'])}"]
    return lines


def _ask(prompt: str, tools: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "tools": tools}


def _from_eval_set(path: Path, wanted) -> list[dict]:
    """The first row of an evaluation set that is `wanted` (else its first row) as a side-by-side row;
    none when the run's world lacks the set."""
    if not path.exists():
        return []
    rows = read_jsonl(path)
    row = next((r for r in rows if wanted(r)), rows[0])
    return [{"messages": row["messages"], "tools": False} if "messages" in row else _ask(row["prompt"])]


def _side_by_side_rows(paths: Run) -> list[dict]:
    """The conversations every stage answers, `{"messages", "tools"}`: questions about the world, who
    the assistant is without and with a system prompt that renames it, a follow-up, a few-shot
    prompt, harmless requests from outside the world, a word problem and a question about the news
    (each without and with the tools offered)."""
    world = load_world(paths.world)
    country, person = world.of_kind("country")[0].name, world.of_kind("person")[0].name
    task = read_jsonl(paths.eval_problems)[0]["prompt"]
    news = f"What is {(world.news or world.of_kind('person'))[0].name}'s job?"
    return [_ask(f"What is the capital of {country}?"), _ask("Who are you?"),
            *_from_eval_set(paths.eval_system_prompts, lambda r: r["check"] == "name"),
            _ask(f"Tell me about {person}."),
            *_from_eval_set(paths.eval_followups, lambda r: r["messages"][-1]["content"] == "And its currency?"),
            *_from_eval_set(paths.eval_few_shot, lambda r: r["fact"]["subject"] == person),
            _ask("How many r are in strawberry?"), _ask("Spell kite backwards."),
            _ask(task), _ask(task, tools=True), _ask(news), _ask(news, tools=True)]


def _side_by_side(run: Path) -> list[dict]:
    """The same conversations to every stage: the base model gets their text as a document, the
    others a chat, some with the tools offered (the reply then shows the calls and what they returned)."""
    paths = Run(run)
    tok = Tokenizer.load(paths.tokenizer)
    rows = _side_by_side_rows(paths)
    tools = Tools(tok, paths.open_index())
    for stage in STAGES:
        if not (run / stage / "model.json").exists():
            continue
        model, _ = load_model(run / stage)
        if stage == "base":
            ids = [[tok.eot_id] + tok.encode("\n".join(m["content"] for m in row["messages"])) for row in rows]
            answers = [t[0] for t in complete(model, tok, ids, 48, Sampling(temperature=0, stop_ids=[tok.eot_id]))]
        else:
            answers = [chat_replies(model, tok, [offer(row["messages"], tools if row["tools"] else None)],
                                    model.config.max_seq_len if row["tools"] else 96, tools=tools)[0][0] for row in rows]
        for row, answer in zip(rows, answers):
            row[stage] = answer
    return rows


def _side_by_side_lines(rows: list[dict]) -> list[str]:
    """Each conversation (system message, earlier turns, the prompt) and every stage's reply."""
    lines = []
    for row in rows:
        *before, prompt = row["messages"]
        for message in before:
            lines += [f"*{message['role']}:* {_one_line(message['content'])}", ""]
        lines += [f"**Prompt:** {_one_line(prompt['content'])}" + (" *(tools offered)*" if row["tools"] else ""), ""]
        lines += [f"- *{stage}*: {_one_line(row[stage].strip())}" for stage in STAGES if stage in row]
        lines.append("")
    return lines


def _one_line(text: str) -> str:
    return text.replace("\n", " ⏎ ")


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (the CPU decides float rounding and speed)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    name = names[0] if names else (platform.processor() or platform.machine())
    return f"{name} ({vector})" if vector else name


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else str(value)


def write_report(run: Path) -> dict:
    run = Path(run)
    figures = stage_figures(run)
    figures["machine"] = _machine()
    plots = _plot_curves(run)
    side = _side_by_side(run)
    figures["side_by_side"] = side
    figures["preferences"] = preference_figures(run)
    stages = figures["stages"]

    lines = [f"# picochat report card: `{run}`", "", f"Machine: {figures['machine']}", "", "## What each stage changed", ""]
    lines.append("| metric | " + " | ".join(stages) + " | meaning |")
    lines.append("| --- | " + " | ".join("---" for _ in stages) + " | --- |")
    for metric in METRICS:
        if any(metric in s for s in stages.values()):
            lines.append(f"| {metric} | " + " | ".join(_fmt(s.get(metric)) for s in stages.values()) + f" | {METRIC_MEANING[metric]} |")
    chat_stages = [name for name, s in stages.items() if any(f"{m}_tools" in s for m in TOOL_METRICS)]
    if chat_stages:
        lines += ["", "## Tools: the same evaluations without and with them", "",
                  "With tools, the system message offers the calculator and search (`Tools: calc, search.`) and the "
                  "engine runs the calls; a reply is judged on what the model wrote after the last tool result.", "",
                  "| metric | " + " | ".join(f"{name} without | {name} with" for name in chat_stages) + " | meaning |",
                  "| --- | " + " | ".join("--- | ---" for _ in chat_stages) + " | --- |"]
        for metric in TOOL_METRICS:
            cells = [f"{_fmt(stages[name].get(metric))} | {_fmt(stages[name].get(metric + '_tools'))}" for name in chat_stages]
            lines.append(f"| {metric} | " + " | ".join(cells) + f" | {METRIC_MEANING[metric]} |")
    benchmarks, figures["benchmarks"] = benchmark_lines(run)
    lines += [""] + benchmarks if benchmarks else []
    lines += _preference_lines(figures["preferences"])
    lines += ["", "## Cost per stage", "", "| stage | train seconds | wall seconds | tokens | FLOPs | parameters |", "| --- | --- | --- | --- | --- | --- |"]
    for name, s in stages.items():
        flops = f"{s['flops']:.2e}" if "flops" in s else "–"
        lines.append(f"| {name} | {_fmt(s.get('seconds'))} | {_fmt(s.get('wall_seconds'))} | {_fmt(s.get('tokens'))} | {flops} | {_fmt(s.get('params'))} |")
    lines += ["", "## The same prompts, stage by stage", "",
              "The base model continues the conversation's text as a document; the SFT and RL models answer it as a "
              "chat.", ""]
    lines += _side_by_side_lines(side)
    if plots:
        lines += ["## Training curves", ""] + [f"![{p}]({p})" for p in plots] + [""]
    atomic_write_bytes(run / "report.md", "\n".join(lines).encode())
    atomic_write_json(run / "report.json", figures)
    return figures
