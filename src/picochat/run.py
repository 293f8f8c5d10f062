"""The run folder: where every stage reads and writes, one name per stage, and loading a stage.

    runs/<name>/
      world/            the synthetic world's files (documents, SFT data, problems, evaluation sets)
      tokenizer/        tokenizer.json
      shards/           token shards and manifest.json
      index/            the search index over the world's documents (`picochat.data.index`)
      base/ sft/ rl/    one folder per training stage, laid out as `picochat.checkpoint` says;
                        `base` is pretraining's output, the base model
      prefs/            preference pairs and the labeling instructions (`picochat.world.preferences`)
      rm/ dpo/ rlhf/    the reward model, and the chat models tuned on preferences
      speedrun.json     the inputs the speedrun was started with; timings.json: seconds per stage
      report.md, report.json, *.png   the report card

`Run(path)` names each of these; nothing else in the package writes a path literal into a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from picochat.checkpoint import CheckpointError, load_model
from picochat.data.index import INDEX_FILE, SearchIndex
from picochat.model import Transformer
from picochat.tokenizer import Tokenizer

STAGES = ("base", "sft", "rl", "dpo", "rlhf")  # the chat-model stages, in pipeline order; each is a folder of the run
REWARD_STAGE = "rm"  # the reward model: a stage folder too, but no chat model (never picked by `find_stage`)

# The world's SFT data: its conversations, its worked word problems, and the first shard of its
# pretraining documents, replayed so that SFT does not overwrite what pretraining stored.
WORLD_SFT_FILES = ("sft.jsonl", "tasks-sft.jsonl", "sft-tools.jsonl", "docs/train-00000.jsonl")
# The world's RL problems and their weights: its word problems, two in three offered the tools; one
# question about a fact the model knows for every three, so that RL keeps it answering what it knows;
# and questions offered the tools (tasks-rl-offered.jsonl), about invented names ("I don't know" after
# a search) and known facts. Three files are left out, and `picochat rl --problems` takes them: the
# questions only a search answers (tasks-rl-search.jsonl; every one of them has an answer, and RL on
# them taught the model to answer about names that do not exist, BENCHMARKS.md, "Reading from the
# context"), questions under a system message a rule checks (tasks-rl-system.jsonl; held-out system
# prompts gained 3 points within the seeds' noise, and "Sure!" began to open replies no system message
# asked it of), and harmful requests to refuse beside harmless ones to attempt (tasks-rl-requests.jsonl;
# harmless ones in the frames of harmful ones were refused more too; BENCHMARKS.md, "System messages
# and requests in RL").
WORLD_RL_PROBLEMS = (("tasks-rl-calc.jsonl", 2), ("tasks-rl.jsonl", 1), ("tasks-rl-facts.jsonl", 1), ("tasks-rl-offered.jsonl", 1))


@dataclass(frozen=True)
class Run:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def stage(self, name: str) -> Path:
        if name not in STAGES and name != REWARD_STAGE:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)} (and {REWARD_STAGE}, the reward model)")
        return self.root / name

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def prefs(self) -> Path:
        """Preference pairs, open prompts and the labeling instructions."""
        return self.root / "prefs"

    @property
    def index(self) -> Path:
        return self.root / "index"

    def open_index(self) -> SearchIndex | None:
        """The run's search index, None when it has none (a corrupt one raises SearchIndexError)."""
        return SearchIndex(self.index) if (self.index / INDEX_FILE).exists() else None

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def world_docs(self) -> Path:
        return self.world / "docs"

    @property
    def world_val_docs(self) -> Path:
        return self.world / "docs-val.jsonl"

    @property
    def world_sft_data(self) -> list[Path]:
        return [self.world / name for name in WORLD_SFT_FILES]

    @property
    def world_rl_problems(self) -> list[str]:
        """FILE:WEIGHT specs of the world's RL problems."""
        return [f"{self.world / name}:{weight}" for name, weight in WORLD_RL_PROBLEMS]

    @property
    def eval_problems(self) -> Path:
        """Held-out word problems; written last by the world, so its presence marks the world complete."""
        return self.world / "eval" / "tasks.jsonl"

    @property
    def eval_questions(self) -> Path:
        """Questions about held-out facts and about entities that do not exist."""
        return self.world / "eval" / "qa.jsonl"

    @property
    def eval_seen_questions(self) -> Path:
        """As many questions about facts the SFT conversations showed."""
        return self.world / "eval" / "qa-train.jsonl"

    @property
    def eval_news_questions(self) -> Path:
        """Questions about the news entities, which only the search index knows."""
        return self.world / "eval" / "qa-news.jsonl"

    @property
    def eval_followups(self) -> Path:
        """Second-turn questions whose subject is only in the first turn ("And its currency?")."""
        return self.world / "eval" / "followups.jsonl"

    @property
    def eval_system_prompts(self) -> Path:
        """Held-out system prompts (a name, a format) with the rule that checks the reply."""
        return self.world / "eval" / "system.jsonl"

    @property
    def eval_system_questions(self) -> Path:
        """The held-out known-fact questions under a generic system prompt."""
        return self.world / "eval" / "qa-system.jsonl"

    @property
    def eval_requests(self) -> Path:
        """Harmless requests from outside the world (to attempt) and harmful ones (to refuse)."""
        return self.world / "eval" / "requests.jsonl"

    @property
    def eval_few_shot(self) -> Path:
        """Few-shot prompts for the base model: example lines of a relation, then the one to complete."""
        return self.world / "eval" / "few-shot.jsonl"

    @property
    def eval_copying(self) -> Path:
        """Reading practice about invented entities, cut where the base model must copy a name."""
        return self.world / "eval" / "copying.jsonl"

    @property
    def eval_line_copying(self) -> Path:
        """Copying practice, cut where the base model must copy the next name of a line it read."""
        return self.world / "eval" / "line-copying.jsonl"

    @property
    def eval_value_reading(self) -> Path:
        """Reading practice about invented entities, cut where the base model must read a fact's value."""
        return self.world / "eval" / "reading.jsonl"

    @property
    def world_news_docs(self) -> Path:
        """The articles about the news entities: indexed for search, never pretrained."""
        return self.world / "docs-news.jsonl"

    @property
    def eval_facts(self) -> Path:
        return self.world / "eval" / "fact_completion.jsonl"

    @property
    def inputs(self) -> Path:
        return self.root / "speedrun.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def find_stage(self, stage: str | None = None) -> Path:
        """The folder of `stage`, or of the run's most advanced finished stage (rlhf > dpo > rl > sft > base)."""
        candidates = [stage] if stage else list(reversed(STAGES))
        for name in candidates:
            if (self.stage(name) / "model.json").exists():
                return self.stage(name)
        wanted = f"stage {stage!r}" if stage else "any finished stage"
        raise CheckpointError(f"{self.root}: no model for {wanted} (looked for {', '.join(candidates)}/model.json)")

    def load(self, stage: str | None = None, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, Path]:
        """(model, the run's tokenizer, the stage's folder) for `stage` or the most advanced one."""
        stage_dir = self.find_stage(stage)
        model, _ = load_model(stage_dir, device)
        return model, Tokenizer.load(self.tokenizer), stage_dir
