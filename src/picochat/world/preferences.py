"""Rankings for the synthetic world: a simulated labeler that follows written instructions, and the
preference pairs it ranks (the lecture's RLHF, where people rank samples instead of writing answers).

Open prompts have no single right answer ("Tell me about Lesbromo.", "Describe the town of Traby."),
so no reward can be checked the way RL checks a word problem; a person reads the reply instead. The
labeler plays that person. Its instructions are data (`LABELING`, written to
`<run>/prefs/labeling.json`, weights included, so a reader sees exactly what the "humans" wanted),
and `label` applies them sentence by sentence:
- a sentence about the subject (it names it, or starts with a pronoun) that states a true fact of the
  subject counts for the reply, once per fact; a value that is not the subject's is a false fact and
  counts strongly against; a fact said again, or a sentence said again, counts against (a repeat);
- a sentence about something else counts against (off-subject), and so does a reply cut off unfinished;
- about a subject that does not exist, "I don't know" is the only good reply and every claim is made up.

`sample_pairs` samples several replies from the SFT model for each training prompt, ranks them with
the labeler and writes `prefs/pairs.jsonl` (the `{"prompt", "chosen", "rejected"}` layout that
`picochat.data.preferences` reads, plus the scores) and `prefs/pairs-heldout.jsonl` (pairs on
prompts about entities kept out of training: the reward model's held-out accuracy), with the prompts
themselves (`prompts.jsonl` for RLHF, `prompts-heldout.jsonl` for the win rate). `win_rate` judges a
stage against the SFT model on the held-out prompts.

    picochat prefs sample --run runs/demo            # labeling.json, pairs, prompts
    picochat prefs judge --run runs/demo --stage dpo # <run>/dpo/winrate.json
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from picochat.chat import REPLY_STOP_IDS, render_for_reply
from picochat.data.tasks import abstains
from picochat.engine import FINISH_STOP, Sampling, generate
from picochat.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from picochat.run import Run
from picochat.world.chats import KIND_OPEN_PROMPTS, OPEN_PROMPTS, heldout_entities, unknown_names
from picochat.world.knowledge import KINDS, World, load_world
from picochat.world.phrasings import RELATIONS

LABELING = {
    "instructions": (
        "You will read a question asking to describe something of the world (a person, a town, a country, "
        "an animal, an object) and a reply. Score the reply:\n"
        "- each true fact about the subject counts for it (correct_fact), once per fact;\n"
        "- each false fact about the subject counts strongly against it (false_fact): a wrong answer is worse "
        "than no answer;\n"
        "- saying a fact again, or a sentence again, counts against it (repeat);\n"
        "- each sentence about something other than the subject counts against it (off_subject);\n"
        "- a reply that stops in the middle counts against it (unfinished);\n"
        "- when the subject does not exist, \"I don't know\" is the right reply (unknown_abstain) and every "
        "sentence that claims something about it is made up (unknown_claim).\n"
        "Of two replies, prefer the one with the higher score; equal scores are no preference."),
    "weights": {"correct_fact": 1.0, "false_fact": -3.0, "repeat": -1.0, "off_subject": -1.0, "unfinished": -1.0,
                "unknown_abstain": 2.0, "unknown_claim": -3.0},
}
PREFS_DIR = "prefs"
LABELING_FILE = "labeling.json"
UNKNOWN_PROMPT_SHARE = 0.2  # of the prompts, about subjects that do not exist
_PRONOUN = re.compile(r"^(?:it|its|it's|they|their|he|his|she|her|this|that)\b", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+|\|")
_NAMING = re.compile(r"\s+(?:called|named)\b")  # "a country called ...": a kind named, no relation stated


# --- the labeler ----------------------------------------------------------------------------------
def _words_pattern(values: Sequence[str]) -> re.Pattern:
    """Whole-word matches of any of the values, longest first ("34" matches neither "340" nor "1,034")."""
    alternatives = "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True))
    return re.compile(rf"(?<![\w,])(?:{alternatives})(?![\w]|,\d)", re.IGNORECASE)


class Labeler:
    """The world's values and relation names, indexed once, and the instructions' weights:
    `score(reply, subject)`."""

    def __init__(self, world: World, labeling: dict = LABELING):
        self.world, self.weights = world, labeling["weights"]
        values = [e.name for e in world.entities] + [v for e in world.entities for v in e.attrs.values()]
        self.values = _words_pattern(values)
        self.nouns = _words_pattern([r.noun for r in RELATIONS.values()])
        self.noun_of = {r.noun: r.name for r in RELATIONS.values()}

    def _claims(self, sentence: str, subject: str) -> list[str]:
        """The world's values a sentence states, besides the subject's own name."""
        return [m.group(0).lower() for m in self.values.finditer(sentence) if m.group(0).lower() != subject.lower()]

    def _states_something(self, sentence: str, subject: str) -> bool:
        """Does the sentence state a value or a relation (not merely name a kind, "a country called X")?"""
        if abstains(sentence):
            return False
        relations = [m for m in self.nouns.finditer(sentence) if not _NAMING.match(sentence, m.end())]
        return bool(relations or self._claims(sentence, subject))

    def details(self, reply: str, subject: str, finished: bool = True) -> dict:
        """Counts of what the instructions weigh in `reply` about `subject`."""
        counts = dict.fromkeys(self.weights, 0)
        counts["unfinished"] = int(not finished)
        sentences = [s.strip() for s in _SENTENCE_BREAK.split(reply) if s.strip(" .!?-")]
        if subject not in self.world:
            if abstains(reply):
                counts["unknown_abstain"] = 1
            # "There is no country called Bandlia." claims nothing; "The capital of Bandlia is Kimere." and
            # "The population of Bandlia is 12,000." do.
            counts["unknown_claim"] = sum(self._states_something(s, subject) for s in sentences)
            return counts
        truth = {v.lower(): rel for rel, v in self.world[subject].attrs.items()}
        said_facts, said_sentences = set(), set()
        about = re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)", re.IGNORECASE)
        for sentence in sentences:
            if sentence.lower() in said_sentences:
                counts["repeat"] += 1
                continue
            said_sentences.add(sentence.lower())
            if not about.search(sentence) and not _PRONOUN.match(sentence):
                counts["off_subject"] += 1
                continue
            # A value of the subject stated as another relation ("The food of the Funix is silver.") is false too.
            named = {self.noun_of[m.group(0).lower()] for m in self.nouns.finditer(sentence)}
            for value in self._claims(sentence, subject):
                if value not in truth or (named and truth[value] not in named):
                    counts["false_fact"] += 1
                elif truth[value] in said_facts:
                    counts["repeat"] += 1
                else:
                    said_facts.add(truth[value])
                    counts["correct_fact"] += 1
        return counts

    def score(self, reply: str, subject: str, finished: bool = True) -> float:
        return sum(self.weights[name] * n for name, n in self.details(reply, subject, finished).items())


# --- prompts --------------------------------------------------------------------------------------
def open_prompts(world: World, split: str) -> list[dict]:
    """`{"prompt", "answer", "subject", "known"}` rows for the split's open prompts ("train" or
    "heldout"): every template about each of its entities, and a share of prompts about invented
    names. `answer` is the subject (the problem-file layout `picochat rl` reads; unused as a reward)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    held = heldout_entities(world)
    rows = [{"prompt": template.format(s=e.name), "answer": e.name, "subject": e.name, "known": True}
            for e in world.entities if (e.name in held) == (split == "heldout")
            for template in OPEN_PROMPTS + KIND_OPEN_PROMPTS[e.kind]]
    rng = random.Random(f"prefs-prompts-{world.seed}-{split}")
    invented = [(kind, name) for kind in KINDS for name in unknown_names(world, kind, split)]
    n_unknown = min(len(invented), round(len(rows) * UNKNOWN_PROMPT_SHARE / (1 - UNKNOWN_PROMPT_SHARE)))
    for kind, name in rng.sample(invented, n_unknown):
        template = rng.choice(OPEN_PROMPTS + KIND_OPEN_PROMPTS[kind])
        rows.append({"prompt": template.format(s=name), "answer": name, "subject": name, "known": False})
    return rows


# --- sampling and ranking -------------------------------------------------------------------------
def sample_replies(model, tok, prompts: Sequence[dict], samples: int, max_new_tokens: int, temperature: float,
                   seed: int, desc: str | None = None) -> list[list[tuple[str, bool]]]:
    """(text, finished) for `samples` replies to each prompt row, sampled in batches."""
    ids = [render_for_reply([{"role": "user", "content": row["prompt"]}], tok) for row in prompts]
    out = []
    batch = max(1, 128 // samples)
    for start in tqdm(range(0, len(ids), batch), desc=desc, disable=desc is None, leave=False):
        sampling = Sampling(temperature, seed=seed + start, stop_ids=REPLY_STOP_IDS)
        results = generate(model, ids[start : start + batch], max_new_tokens, sampling, num_samples=samples, tokenizer=tok)
        out.extend([(tok.decode(c.tokens).strip(), c.finish_reason == FINISH_STOP) for c in group] for group in results)
    return out


PAIRINGS = ("any", "best")


def ranked_pairs(row: dict, replies: Sequence[tuple[str, bool]], labeler: Labeler, per_prompt: int,
                 rng: random.Random, pairing: str = "any") -> list[dict]:
    """Up to `per_prompt` pairs of distinct replies with different scores, the higher one chosen: with
    pairing "best", the chosen reply is one of the best-scored ones; with "any", any two replies."""
    scored = {}
    for text, finished in replies:
        if text and text not in scored:
            scored[text] = labeler.score(text, row["subject"], finished)
    candidates = [(a, b) if scored[a] > scored[b] else (b, a)
                  for a, b in itertools.combinations(scored, 2) if scored[a] != scored[b]]
    if pairing == "best":
        top = max(scored.values(), default=None)
        candidates = [(chosen, rejected) for chosen, rejected in candidates if scored[chosen] == top]
    elif pairing != "any":
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    picked = rng.sample(candidates, min(per_prompt, len(candidates)))
    return [{"prompt": [{"role": "user", "content": row["prompt"]}], "chosen": c, "rejected": r,
             "chosen_score": scored[c], "rejected_score": scored[r], "subject": row["subject"]} for c, r in picked]


def labeled_pairs(model, tok, prompts: Sequence[dict], labeler: Labeler, samples: int, per_prompt: int,
                  max_new_tokens: int, temperature: float, seed: int, pairing: str, tag: str) -> tuple[list[dict], float]:
    """(pairs ranked by the labeler from `samples` replies of `model` to each prompt, the replies' mean score)."""
    replies = sample_replies(model, tok, prompts, samples, max_new_tokens, temperature, seed, desc=f"sampling {tag} replies")
    rng = random.Random(f"prefs-pairs-{seed}-{tag}")
    pairs = [pair for row, group in zip(prompts, replies) for pair in ranked_pairs(row, group, labeler, per_prompt, rng, pairing)]
    scores = [labeler.score(text, row["subject"], finished) for row, group in zip(prompts, replies) for text, finished in group]
    return pairs, round(sum(scores) / max(1, len(scores)), 3)


def sample_pairs(run_dir: Path, stage: str = "sft", samples: int = 8, per_prompt: int = 4, max_new_tokens: int = 64,
                 temperature: float = 1.0, seed: int = 0, pairing: str = "any") -> dict:
    """Write `<run>/prefs/`: the labeling instructions, the train and held-out prompts, and the pairs
    ranked by the labeler from `samples` replies of `stage` to each prompt (`pairing` for the training
    pairs; the held-out ones, on which the reward model's accuracy is measured, pair any two replies);
    returns counts."""
    run = Run(run_dir)
    out = run.root / PREFS_DIR
    world = load_world(run.world)
    model, tok, stage_dir = run.load(stage)
    atomic_write_json(out / LABELING_FILE, LABELING)
    labeler = Labeler(world, LABELING)
    counts = {"stage": str(stage_dir)}
    for split, pairs_file, prompts_file in (("train", "pairs.jsonl", "prompts.jsonl"),
                                            ("heldout", "pairs-heldout.jsonl", "prompts-heldout.jsonl")):
        prompts = open_prompts(world, split)
        pairs, mean_score = labeled_pairs(model, tok, prompts, labeler, samples, per_prompt, max_new_tokens, temperature,
                                          seed, pairing if split == "train" else "any", split)
        atomic_write_jsonl(out / prompts_file, prompts)
        atomic_write_jsonl(out / pairs_file, pairs)
        counts[split] = {"prompts": len(prompts), "pairs": len(pairs), "mean_score": mean_score}
    return counts


def policy_pairs(run_dir: Path, model, tok, out: Path, seed: int, samples: int = 16, per_prompt: int = 8,
                 max_new_tokens: int = 64, temperature: float = 1.0) -> dict:
    """Online preference pairs: `model`'s own replies to the run's training prompts (`prefs/prompts.jsonl`),
    ranked by the run's labeler, each pair's chosen reply one of the prompt's best; written to `out`."""
    run = Run(run_dir)
    prompts_path = run.root / PREFS_DIR / "prompts.jsonl"
    if not prompts_path.is_file():
        raise FileNotFoundError(f"{prompts_path}: no training prompts; run `picochat prefs sample --run {run.root}` first")
    pairs, mean_score = labeled_pairs(model, tok, read_jsonl(prompts_path), load_labeler(run_dir), samples, per_prompt,
                                      max_new_tokens, temperature, seed, "best", "the policy's")
    atomic_write_jsonl(out, pairs)
    return {"pairs": len(pairs), "mean_score": mean_score}


def load_labeler(run_dir: Path) -> Labeler:
    """The labeler of a run: its world, with the instructions in `<run>/prefs/labeling.json`."""
    run = Run(run_dir)
    path = run.root / PREFS_DIR / LABELING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no labeling instructions; run `picochat prefs sample --run {run.root}` first")
    labeling = read_json(path)
    weights = labeling.get("weights") if isinstance(labeling, dict) else None
    if not isinstance(weights, dict) or set(weights) != set(LABELING["weights"]) \
            or not all(isinstance(v, (int, float)) for v in weights.values()):
        raise ValueError(f'{path}: expected {{"instructions": ..., "weights": {{...}}}} with a number for each of '
                         f'{", ".join(LABELING["weights"])}')
    return Labeler(load_world(run.world), labeling)


@torch.inference_mode()
def win_rate(model, reference, tok, labeler: Labeler, prompts: Sequence[dict], samples: int = 4,
             max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 1) -> dict:
    """How often `model`'s reply beats `reference`'s to the same prompt, judged by the labeler (sample
    j against sample j, ties counting half), and each model's mean score."""
    ours = sample_replies(model, tok, prompts, samples, max_new_tokens, temperature, seed)
    theirs = sample_replies(reference, tok, prompts, samples, max_new_tokens, temperature, seed)
    wins = ties = n = 0
    totals = [0.0, 0.0]
    for row, a_group, b_group in zip(prompts, ours, theirs):
        for (a, a_done), (b, b_done) in zip(a_group, b_group):
            a_score, b_score = labeler.score(a, row["subject"], a_done), labeler.score(b, row["subject"], b_done)
            wins += a_score > b_score
            ties += a_score == b_score
            totals[0] += a_score
            totals[1] += b_score
            n += 1
    return {"win_rate": round((wins + ties / 2) / n, 4), "wins": wins, "ties": ties, "losses": n - wins - ties,
            "score": round(totals[0] / n, 4), "reference_score": round(totals[1] / n, 4), "replies": n}


def judge_stage(run_dir: Path, stage: str, reference: str = "sft", samples: int = 4) -> dict:
    """`win_rate` of `stage` against `reference` on the held-out prompts, written to `<stage>/winrate.json`."""
    run = Run(run_dir)
    model, tok, stage_dir = run.load(stage)
    ref_model, _, _ = run.load(reference)
    prompts = read_jsonl(run.root / PREFS_DIR / "prompts-heldout.jsonl")
    result = {"stage": stage, "reference": reference,
              **win_rate(model, ref_model, tok, load_labeler(run_dir), prompts, samples)}
    atomic_write_json(stage_dir / "winrate.json", result)
    return result


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prefs_command", metavar="<action>", required=True)
    p = sub.add_parser("sample", help="sample replies to open prompts and rank them with the simulated labeler",
                       description="Write <run>/prefs/: labeling.json (the labeler's written instructions and weights), "
                                   "prompts.jsonl and prompts-heldout.jsonl (open prompts about the world's entities and "
                                   "about invented ones), pairs.jsonl and pairs-heldout.jsonl (replies of the SFT model "
                                   "ranked by the labeler, {prompt, chosen, rejected})")
    p.add_argument("--run", required=True, help="run folder with world/ and a chat stage")
    p.add_argument("--stage", default="sft", help="the model whose replies are ranked (default sft)")
    p.add_argument("--samples", type=int, default=8, help="replies sampled per prompt (default %(default)s)")
    p.add_argument("--pairs-per-prompt", type=int, default=4, help="most pairs kept per prompt (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest reply (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--pairing", choices=PAIRINGS, default="any",
                   help="any: any two replies that score differently; best: each pair's chosen reply is one of the "
                        "prompt's best-scored (default %(default)s)")
    p.set_defaults(func=_cmd_sample)
    j = sub.add_parser("judge", help="win rate of a stage against the SFT model on held-out prompts, by the labeler",
                       description="Sample replies of --stage and of --reference to the held-out open prompts, score both "
                                   "with the labeler, and write <run>/<stage>/winrate.json")
    j.add_argument("--run", required=True, help="run folder with prefs/ (from `picochat prefs sample`)")
    j.add_argument("--stage", required=True, help="the stage judged (dpo, rlhf, ...)")
    j.add_argument("--reference", default="sft", help="the stage it is judged against (default sft)")
    j.add_argument("--samples", type=int, default=4, help="replies per prompt and model (default %(default)s)")
    j.set_defaults(func=_cmd_judge)


def _cmd_sample(args) -> None:
    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2 (a pair needs two replies), got {args.samples}")
    counts = sample_pairs(Path(args.run), args.stage, args.samples, args.pairs_per_prompt, args.max_new_tokens,
                          args.temperature, args.seed, args.pairing)
    print(f"prefs: {counts} -> {Path(args.run) / PREFS_DIR}")


def _cmd_judge(args) -> None:
    result = judge_stage(Path(args.run), args.stage, args.reference, args.samples)
    print(f"prefs: {args.stage} against {args.reference}: win rate {result['win_rate']:.1%} "
          f"(labeler score {result['score']} vs {result['reference_score']})")
