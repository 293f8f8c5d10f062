"""The embedded synthetic world: a small fictional knowledge base and the "internet" written about it.

The demo pipeline pretrains, fine-tunes and evaluates a tiny model on this world, so it is built to
be learnable from a few million tokens: a couple of hundred entities with short invented names,
each fact restated in many documents and many phrasings.

- `build_world(seed)` makes the knowledge base: people, towns, countries, animals and objects, with
  attributes that link them (a person's birthplace is a town of the world, a country's capital is
  one of its towns, an object's maker is a person), plus invented names that belong to nothing
  (questions about them should get "I don't know"). Everything is drawn from
  `random.Random(seed)`; no global random state is touched.
- `RELATIONS` says how each attribute is put into words: sentence templates used in documents,
  *held-out* completion templates that no document ever uses (to test that knowledge generalises
  to new phrasings), and question templates for the chat half (`world_chat.py`). Besides its own
  phrasings, every relation is written in shared sentence FRAMES; each relation holds out two of
  them, which other relations use (a compositional split a tiny model can learn).
- `iter_documents(world, seed)` is an endless, deterministic stream of documents in nine styles:
  encyclopedia entries, stories, letters, news, forum threads, quizzes, lists and tables, worked
  arithmetic about the world's things, and worked word problems (train split of `tasks.py`).
- `fact_completion_rows(world)` is the fact-completion evaluation: prompts such as
  "The capital of Varnia is" that end right before the answer (" Oskel").
- `write_world(out_dir, size_mb, seed)` writes it all to disk (JSONL shards with a `text` field, the
  FineWeb layout); `load_world(out_dir)` reads the knowledge base back.

CLI: `picochat world generate --out runs/demo/world` and `picochat world show`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from picochat.io import atomic_write_lines

FORMAT = "picochat-world/1"
KINDS = ("country", "town", "person", "animal", "object")
PLURALS = {"country": "countries", "town": "towns", "person": "people", "animal": "animals", "object": "objects"}
# Entities of each kind in a world: several hundred facts, few enough to learn in minutes.
WORLD_SIZES = {"country": 8, "town": 40, "person": 100, "animal": 24, "object": 40}
# Invented names per kind that belong to no entity, for "I don't know" conversations.
UNKNOWN_NAMES_PER_KIND = 48

JOBS = ("baker", "farmer", "teacher", "doctor", "shepherd", "painter", "tailor", "sailor", "potter", "weaver",
        "builder", "singer", "engineer", "artist", "nurse", "carpenter", "merchant", "astronomer")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown")
HABITATS = ("forest", "desert", "marsh", "mountains", "meadows", "jungle", "hills", "tundra")
FOODS = ("berries", "fish", "seeds", "insects", "grass", "leaves", "nuts", "worms", "roots", "mushrooms")
OBJECT_TYPES = ("lamp", "chair", "clock", "kettle", "drum", "basket", "bell", "mirror", "bowl", "flute",
                "vase", "stool", "umbrella", "anchor", "oven")
MATERIALS = ("wood", "iron", "glass", "clay", "brass", "stone", "copper", "silver", "wool", "leather")
VOCABULARY = JOBS + COLOURS + HABITATS + FOODS + OBJECT_TYPES + MATERIALS


class WorldError(ValueError):
    """A world file that cannot be read back (names the file and what is wrong)."""


# --- the knowledge base ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # one of KINDS
    attrs: dict[str, str]  # relation name -> value as written in text ("Oskel", "34", "12,000")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str

    def to_dict(self) -> dict:
        return {"subject": self.subject, "relation": self.relation, "answer": self.answer}


@dataclass
class World:
    seed: int
    entities: list[Entity]
    unknown_names: dict[str, list[str]]  # kind -> invented names that are not in the world
    scale: float = 1.0
    _by_name: dict[str, Entity] = field(init=False, repr=False)
    _by_kind: dict[str, list[Entity]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {e.name: e for e in self.entities}
        self._by_kind = {kind: [e for e in self.entities if e.kind == kind] for kind in KINDS}

    def __getitem__(self, name: str) -> Entity:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def of_kind(self, kind: str) -> list[Entity]:
        return self._by_kind[kind]

    def facts(self) -> list[Fact]:
        """Every (subject, relation, answer) of the world, in a fixed order."""
        return [Fact(e.name, rel, value) for e in self.entities for rel, value in e.attrs.items()]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "seed": self.seed,
            "scale": self.scale,
            "entities": [{"name": e.name, "kind": e.kind, "attrs": e.attrs} for e in self.entities],
            "unknown_names": self.unknown_names,
        }


# --- how facts are put into words -----------------------------------------------------------------
@dataclass(frozen=True)
class Relation:
    """One attribute and its phrasings. Placeholders: {s} subject, {o} value, {a} "a"/"an" for {o}.

    `templates` appear in documents; the first is the canonical one (assistant answers use it) and
    the first two are the "train" fact-completion prompts. `heldout` never appear in any document:
    fact completion on them tests phrasings the model has not seen for this fact. Every held-out
    template, and the first two `templates`, end with " {o}" plus optional trailing text, so the
    words before " {o}" are a completion prompt. `questions` are asked in forum threads, quizzes
    and SFT conversations; `heldout_questions` only in the chat evaluation. `noun` and `value` put
    the relation into the shared FRAMES ("The {noun} of Varnia is {value}").
    """

    name: str
    kind: str  # the subject's kind
    noun: str
    value: str  # how the value is written after the noun: "{o}", "{a} {o}", "the {o}", "{o} dollars"
    templates: tuple[str, ...]
    heldout: tuple[str, ...]
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    column: str  # header of this attribute in tables


# Sentence frames shared by every relation. Documents state each relation in F0, F1 and two of
# F2..F5; the other two are held out for that relation only. A held-out frame is then a phrasing the
# model has met with other relations but never with this one (a compositional split), which a
# small model can learn to generalise to; a wholly unseen sentence shape mostly it cannot. Measured
# with a 0.7M-parameter model pretrained on 1.8M tokens of a scale-0.25 world: 84% greedy fact
# completion on held-out phrasings made this way (frames, and one new opening clause before a known
# ending per relation), against 32% for held-out phrasings that were new sentence shapes. Half the
# frames name the subject before the relation, half after, and each relation keeps one of each.
FRAMES = (
    "The {n} of {S} is {v}.",
    "{S}'s {n} is {v}.",
    "Everyone knows the {n} of {S}: it is {v}.",
    "In the case of {S}, the {n} is {v}.",
    "Ask anyone about {S}'s {n} and they will say {v}.",
    "If you want to know the {n} of {S}, the answer is {v}.",
)
SHARED_FRAMES = 2  # F0 and F1 are never held out


def _with_frames(index: int, rel: Relation) -> Relation:
    """Add the frames to a relation's templates, holding out two of F2..F5 (which two rotates).
    F0 ("The capital of Varnia is Oskel.") becomes the canonical first template: a tiny model
    recalls a fact more often when the subject comes right before the answer (in one probe run,
    "The favourite colour of Tamrin is" 100% against "Tamrin's favourite colour is" 12%)."""
    subject = "the {s}" if rel.kind in ("animal", "object") else "{s}"
    framed = [f.replace("{n}", rel.noun).replace("{S}", subject).replace("{v}", rel.value) for f in FRAMES]
    rotating = len(FRAMES) - SHARED_FRAMES
    held = {SHARED_FRAMES + index % rotating, SHARED_FRAMES + (index + rotating // 2) % rotating}
    own = tuple(t for t in rel.templates if t != framed[0])
    in_docs = tuple(t for i, t in enumerate(framed) if i > 0 and i not in held and t not in own)
    return replace(rel, templates=(framed[0],) + own + in_docs, heldout=rel.heldout + tuple(framed[i] for i in sorted(held)))


_NATURAL_RELATIONS = [
    Relation(
        "birthplace", "person", "birthplace", "{o}",
        ("{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s}'s birthplace is the town of {o}.",
         "{s}'s place of birth is {o}.", "{s} comes from {o}, where {s} was born.", "{o} is the town where {s} was born.",
         "Born in {o}, {s} still speaks fondly of the place.", "{s} grew up in {o}, the town of {s}'s birth."),
        ("{s} was born long ago in the town of {o}.",),
        ("Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?",
         "Which town does {s} come from?", "Where is {s} from?"),
        ("Could you tell me the name of the town where {s} was born?", "Quick question: what town is {s}'s birthplace?"),
        "Born in",
    ),
    Relation(
        "job", "person", "job", "{a} {o}",
        ("{s} works as {a} {o}.", "{s} earns a living as {a} {o}.", "By trade, {s} is {a} {o}.", "{s} has a job as {a} {o}.",
         "{s} is {a} {o} by trade.", "{s} has worked as {a} {o} for many years.",
         "{a} {o} by profession, {s} is known all over town.", "Everyone knows {s} as the local {o}."),
        ("Every day {s} goes off to work as {a} {o}.",),
        ("What does {s} do for a living?", "What is {s}'s job?", "What job does {s} have?", "What does {s} work as?",
         "What is the profession of {s}?"),
        ("Could you tell me how {s} earns money?", "Quick question: what kind of work does {s} do?"),
        "Job",
    ),
    Relation(
        "age", "person", "age", "{o}",
        ("The age of {s} is {o}.", "{s}'s age is {o} years.", "{s} is {o} years old.", "{s} turned {o} this year.",
         "At {o} years of age, {s} is still full of energy.", "{o} years have passed since {s} was born."),
        ("On {s}'s last birthday, {s} turned {o}.",),
        ("How old is {s}?", "What is the age of {s}?", "What age is {s}?", "How many years old is {s}?"),
        ("Could you tell me the age of {s}?", "Quick question: how many years has {s} lived?"),
        "Age",
    ),
    Relation(
        "favourite_colour", "person", "favourite colour", "{o}",
        ("{s}'s favourite colour is {o}.", "The favourite colour of {s} is {o}.", "{s} loves the colour {o}.",
         "Of all the colours, {s} likes {o} best.", "{o} is the favourite colour of {s}.",
         "{s} always wears something {o}, since {o} is {s}'s favourite colour."),
        ("Ask {s} and you will hear that {s}'s favourite colour is {o}.",),
        ("What is {s}'s favourite colour?", "Which colour does {s} like best?", "What colour does {s} love?",
         "What is the favourite colour of {s}?"),
        ("Could you tell me which colour {s} prefers?", "Quick question: what colour does {s} like most?"),
        "Favourite colour",
    ),
    Relation(
        "pet", "person", "pet", "{a} {o}",
        ("{s} has a pet {o}.", "The pet of {s} is {a} {o}.", "{s}'s pet is {a} {o}.", "{s} keeps {a} {o} as a pet.",
         "{s} takes good care of a pet {o}.", "{a} {o} is the pet of {s}."),
        ("At home, {s} keeps {a} {o} as a pet.",),
        ("What pet does {s} have?", "What animal does {s} keep as a pet?", "What is {s}'s pet?", "Which pet does {s} own?"),
        ("Could you tell me what animal {s} keeps at home?", "Quick question: what kind of pet lives with {s}?"),
        "Pet",
    ),
    Relation(
        "country", "town", "country", "{o}",
        ("{s} is a town in {o}.", "The town of {s} is in {o}.", "{s} lies in the country of {o}.", "{s} is located in {o}.",
         "{o} is the country where {s} can be found.", "The town of {s} belongs to {o}."),
        ("Travellers find {s} in the country of {o}.",),
        ("In which country is {s}?", "Which country is {s} in?", "Where is the town of {s}?",
         "What country does {s} belong to?"),
        ("Could you tell me the country that {s} is part of?", "Quick question: in what country would I find {s}?"),
        "Country",
    ),
    Relation(
        "river", "town", "river", "the {o}",
        ("{s} lies on the river {o}.", "The river of {s} is the {o}.", "The river {o} flows through {s}.",
         "{s} is built on the banks of the river {o}.", "Boats sail down the river {o} past {s}.",
         "{o} is the name of the river that flows through {s}."),
        ("Anyone who walks through {s} soon reaches the river {o}.",),
        ("Which river flows through {s}?", "What river is {s} on?", "On which river does {s} lie?", "What is the river of {s}?"),
        ("Could you tell me the name of the river in {s}?", "Quick question: what river runs past {s}?"),
        "River",
    ),
    Relation(
        "population", "town", "population", "{o}",
        ("{s} has a population of {o}.", "The population of {s} is {o}.", "About {o} people live in {s}.",
         "{s} is home to {o} people.", "With {o} inhabitants, {s} is a lively town.", "{o} people call {s} their home."),
        ("The town of {s} has a total population of {o}.",),
        ("What is the population of {s}?", "How many people live in {s}?", "How many inhabitants does {s} have?"),
        ("Could you tell me how big the population of {s} is?", "Quick question: how many people call {s} home?"),
        "Population",
    ),
    Relation(
        "capital", "country", "capital", "{o}",
        ("The capital of {s} is {o}.", "{s}'s capital is {o}.", "The capital city of {s} is {o}.", "{o} is the capital of {s}.",
         "{s} is governed from its capital, {o}.", "{o}, the capital of {s}, is a busy town."),
        ("The seat of power in {s} is its capital, {o}.",),
        ("What is the capital of {s}?", "Which town is the capital of {s}?", "What is {s}'s capital?",
         "Name the capital of {s}."),
        ("Could you tell me which town is the capital of {s}?", "Quick question: where is the capital of {s}?"),
        "Capital",
    ),
    Relation(
        "language", "country", "language", "{o}",
        ("The language of {s} is {o}.", "People in {s} speak {o}.", "In {s}, people speak {o}.", "{o} is spoken in {s}.",
         "The main language spoken in {s} is {o}.", "Most people in {s} speak {o} at home."),
        ("Most children born in {s} learn to speak {o}.",),
        ("What language do people speak in {s}?", "What is the language of {s}?", "Which language is spoken in {s}?"),
        ("Could you tell me the main language of {s}?", "Quick question: what do people in {s} speak?"),
        "Language",
    ),
    Relation(
        "currency", "country", "currency", "the {o}",
        ("The currency of {s} is the {o}.", "In {s}, people pay with the {o}.", "{s} uses the {o} as its money.",
         "The money of {s} is the {o}.", "The {o} is the currency of {s}.", "Shops in {s} take payment in the {o}."),
        ("In the markets of {s}, buyers pay with the {o}.",),
        ("What is the currency of {s}?", "What money do people use in {s}?", "Which currency does {s} use?"),
        ("Could you tell me what money is used in {s}?", "Quick question: what do people in {s} pay with?"),
        "Currency",
    ),
    Relation(
        "habitat", "animal", "habitat", "the {o}",
        ("The {s} lives in the {o}.", "The habitat of the {s} is the {o}.", "The {s} is found in the {o}.",
         "You can find the {s} in the {o}.", "The {o} is the home of the {s}.", "In the {o}, the {s} is a common sight."),
        ("The {s} is a shy animal that lives in the {o}.",),
        ("Where does the {s} live?", "What is the habitat of the {s}?", "Where can you find the {s}?"),
        ("Could you tell me where the {s} lives?", "Quick question: in what kind of place does the {s} live?"),
        "Habitat",
    ),
    Relation(
        "food", "animal", "food", "{o}",
        ("The {s} eats {o}.", "The food of the {s} is {o}.", "The {s} feeds on {o}.", "The favourite food of the {s} is {o}.",
         "The {s} likes nothing better than {o}.", "Every day, the {s} looks for {o} to eat."),
        ("When it is hungry, the {s} eats {o}.",),
        ("What does the {s} eat?", "What is the food of the {s}?", "What does the {s} feed on?"),
        ("Could you tell me what the {s} likes to eat?", "Quick question: what food does the {s} need?"),
        "Food",
    ),
    Relation(
        "colour", "animal", "colour", "{o}",
        ("The colour of the {s} is {o}.", "The {s} has {a} {o} coat.", "The {s} is {o} in colour.",
         "You can spot the {s} by its {o} colour.", "{a} {o} animal, the {s} is easy to see."),
        ("Seen up close, the {s} has {a} {o} coat.",),
        ("What colour is the {s}?", "What is the colour of the {s}?", "Which colour does the {s} have?"),
        ("Could you tell me what colour the {s} is?", "Quick question: what colour would I see on the {s}?"),
        "Colour",
    ),
    Relation(
        "type", "object", "type", "{a} {o}",
        ("The {s} is a kind of {o}.", "The {s} is the name of {a} {o}.", "The {s} is {a} {o}.",
         "The {s} is {a} {o} that many people want.", "{a} {o} called the {s} is sold in many shops."),
        ("Everyone agrees that the {s} is a kind of {o}.",),
        ("What kind of thing is the {s}?", "What is the {s}?", "What sort of object is the {s}?"),
        ("Could you tell me what kind of object the {s} is?", "Quick question: what is the {s} used as?"),
        "Type",
    ),
    Relation(
        "material", "object", "material", "{o}",
        ("The {s} is made of {o}.", "The {s} is made from {o}.", "The material of the {s} is {o}.",
         "{o} is the material of the {s}.", "The {s} was crafted from {o}."),
        ("Every part of the {s} is made of {o}.",),
        ("What is the {s} made of?", "What material is the {s} made from?", "What is the material of the {s}?"),
        ("Could you tell me the material of the {s}?", "Quick question: out of what is the {s} made?"),
        "Material",
    ),
    Relation(
        "maker", "object", "maker", "{o}",
        ("The {s} was made by {o}.", "The maker of the {s} is {o}.", "{o} made the {s}.", "The {s} is the work of {o}.",
         "{o} is the maker of the {s}.", "The {s} was designed and built by {o}."),
        ("The {s} was made long ago by {o}.",),
        ("Who made the {s}?", "Who is the maker of the {s}?", "Who built the {s}?"),
        ("Could you tell me the name of the person who made the {s}?", "Quick question: whose work is the {s}?"),
        "Maker",
    ),
    Relation(
        "price", "object", "price", "{o} dollars",
        ("The {s} costs {o} dollars.", "The price of the {s} is {o} dollars.", "You can buy the {s} for {o} dollars.",
         "The {s} sells for {o} dollars.", "For {o} dollars, you can buy the {s}."),
        ("Shoppers can buy the {s} for {o} dollars.",),
        ("How much does the {s} cost?", "What is the price of the {s}?", "How many dollars is the {s}?"),
        ("Could you tell me how much the {s} costs?", "Quick question: what would I pay for the {s}?"),
        "Price (dollars)",
    ),
]
RELATIONS: dict[str, Relation] = {r.name: _with_frames(i, r) for i, r in enumerate(_NATURAL_RELATIONS)}
RELATIONS_OF_KIND = {kind: [r for r in RELATIONS.values() if r.kind == kind] for kind in KINDS}
# The training templates whose prompts are evaluated as "train" phrasings (the rest are not
# unambiguous completions: "The Zorbit is" could go on in several ways).
TRAIN_PROMPT_TEMPLATES = 2
CANONICAL_WEIGHT = 2.0  # how much more often documents use each of those than other templates


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def render(template: str, subject: str, value: str, initial: bool = True) -> str:
    """Fill a template. `initial`: it starts a sentence (capitalised); else the first word is
    lowercased unless the template starts with a placeholder (a name keeps its capital)."""
    text = template.format(s=subject, o=value, a=article(value))
    if initial:
        return text[0].upper() + text[1:]
    return text if template.startswith("{") else text[0].lower() + text[1:]


def completion_prompt(template: str, subject: str, value: str) -> str:
    """The words of a completion template before its answer (no trailing space)."""
    return render(template[: template.index(" {o}")], subject, value)


def _template_weights(rel: Relation) -> list[float]:
    # The canonical phrasings are the commonest, as in real text (and they are what SFT answers use).
    return [CANONICAL_WEIGHT if i < TRAIN_PROMPT_TEMPLATES else 1.0 for i in range(len(rel.templates))]


_TEMPLATE_WEIGHTS = {name: _template_weights(rel) for name, rel in RELATIONS.items()}


def state(fact: Fact, rng: random.Random, initial: bool = True) -> str:
    """One training-phrasing sentence stating a fact."""
    rel = RELATIONS[fact.relation]
    template = rng.choices(rel.templates, _TEMPLATE_WEIGHTS[rel.name])[0]
    return render(template, fact.subject, fact.answer, initial)


def ask(fact: Fact, rng: random.Random) -> str:
    """One training-phrasing question about a fact."""
    return rng.choice(RELATIONS[fact.relation].questions).format(s=fact.subject)


def fact_of(entity: Entity, relation: str) -> Fact:
    return Fact(entity.name, relation, entity.attrs[relation])


# --- invented names -------------------------------------------------------------------------------
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th", "tr",
           "sh", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o")
_CODAS = ("", "", "", "l", "n", "r", "s", "m", "k", "nd")
# The shape of a name tells its kind, as real names often do (Oskelby is a town, Varnia a country).
_NAME_SHAPES = {
    "country": (1, 2, ("ia", "ora", "and", "esh", "avia")),
    "town": (1, 2, ("by", "ton", "holm", "mere", "wick", "ford", "dale")),
    "person": (2, 2, ("", "", "a", "o", "in", "el")),
    "river": (1, 2, ("", "wen", "a")),
    "language": (1, 1, ("ish", "ese", "ic", "ian")),
    "currency": (1, 1, ("", "a", "et")),
    "animal": (1, 2, ("et", "ow", "ling", "ox", "ard")),
    "object": (1, 2, ("o", "ix", "a", "et", "")),
}
_LOWERCASE_NAMES = {"currency", "animal"}
# Invented names must not spell anything rude by accident.
_BLOCKED_PARTS = ("shit", "fuk", "fuck", "cunt", "nig", "fag", "cock", "dick", "slut", "piss", "tit", "rape", "kill",
                  "dead", "hell", "damn", "sex", "nazi", "poo", "bum", "ass")


class _NameMaker:
    """Invents names that are unique and prefix-free: no name (or vocabulary word) starts another,
    so an answer checked with `startswith` cannot be confused with a longer name."""

    def __init__(self, rng: random.Random, taken: Iterable[str] = VOCABULARY):
        self.rng = rng
        self.taken: list[str] = [w.lower() for w in taken]

    def _clashes(self, low: str) -> bool:
        return any(low.startswith(t) or t.startswith(low) for t in self.taken)

    def make(self, shape: str) -> str:
        low_syll, high_syll, suffixes = _NAME_SHAPES[shape]
        while True:
            n = self.rng.randint(low_syll, high_syll)
            stem = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS) for _ in range(n))
            suffix = self.rng.choice(suffixes)
            if suffix[:1] and suffix[0] in "aeiou" and stem[-1] in "aeiou":
                stem = stem[:-1]
            low = stem + suffix
            if not 4 <= len(low) <= 9 or any(part in low for part in _BLOCKED_PARTS) or self._clashes(low):
                continue
            self.taken.append(low)
            return low if shape in _LOWERCASE_NAMES else low.capitalize()


def build_world(seed: int = 0, scale: float = 1.0) -> World:
    """The knowledge base for `seed` (the same seed always gives the same world). `scale`
    multiplies the number of entities of each kind (WORLD_SIZES): fewer facts are learned faster."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    sizes = {kind: max(3, round(n * scale)) for kind, n in WORLD_SIZES.items()}
    sizes["town"] = max(sizes["town"], sizes["country"])
    rng = random.Random(f"world-{seed}")
    names = _NameMaker(rng)

    rivers = [names.make("river") for _ in range(max(4, sizes["town"] // 3))]
    country_names = [names.make("country") for _ in range(sizes["country"])]
    towns = []
    for i in range(sizes["town"]):
        # The first towns give every country one; the rest are spread at random.
        country = country_names[i] if i < len(country_names) else rng.choice(country_names)
        towns.append(Entity(names.make("town"), "town", {
            "country": country, "river": rng.choice(rivers), "population": f"{rng.randint(2, 98)},000"}))
    countries = [Entity(name, "country", {
        "capital": rng.choice([t for t in towns if t.attrs["country"] == name]).name,
        "language": names.make("language"), "currency": names.make("currency")})
        for name in country_names]
    animals = [Entity(names.make("animal"), "animal", {
        "habitat": rng.choice(HABITATS), "food": rng.choice(FOODS), "colour": rng.choice(COLOURS)})
        for _ in range(sizes["animal"])]
    people = [Entity(names.make("person"), "person", {
        "birthplace": rng.choice(towns).name, "job": rng.choice(JOBS), "age": str(rng.randint(18, 90)),
        "favourite_colour": rng.choice(COLOURS), "pet": rng.choice(animals).name})
        for _ in range(sizes["person"])]
    objects = [Entity(names.make("object"), "object", {
        "type": rng.choice(OBJECT_TYPES), "material": rng.choice(MATERIALS), "maker": rng.choice(people).name,
        "price": str(rng.randint(3, 60))})
        for _ in range(sizes["object"])]
    unknown = {kind: [names.make(kind) for _ in range(UNKNOWN_NAMES_PER_KIND)] for kind in KINDS}
    return World(seed, countries + towns + people + animals + objects, unknown, scale)


# --- documents ------------------------------------------------------------------------------------
def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _title(name: str) -> str:
    return name[0].upper() + name[1:]


def _the(entity: Entity) -> str:
    """How an entity is named mid-sentence: animals and objects take "the"."""
    return f"the {entity.name}" if entity.kind in ("animal", "object") else entity.name


def _facts(entity: Entity, rng: random.Random, k: int | None = None) -> list[Fact]:
    rels = list(entity.attrs)
    rng.shuffle(rels)
    return [fact_of(entity, r) for r in rels[: k or len(rels)]]


_INTROS = {
    "person": ("{s} is one of the people of our world.", "This article is about {s}.", "Everyone has heard of {s}."),
    "town": ("{s} is a town.", "This article is about the town of {s}.", "{s} is a pleasant town."),
    "country": ("{s} is a country.", "This article is about the country of {s}.", "{s} is a land with many towns."),
    "animal": ("The {s} is an animal.", "This article is about the {s}, an animal.", "The {s} is a curious creature."),
    "object": ("Here is what is known about the {s}.", "This article is about the {s}.", "Many people have heard of the {s}."),
}


def _encyclopedia(world: World, rng: random.Random) -> str:
    e = rng.choice(world.entities)
    sentences = [rng.choice(_INTROS[e.kind]).format(s=e.name)] + [state(f, rng) for f in _facts(e, rng)]
    if e.kind == "person":
        town = world[e.attrs["birthplace"]]
        sentences.append(state(fact_of(town, "country"), rng))
        sentences.append(state(fact_of(world[e.attrs["pet"]], rng.choice(("habitat", "food"))), rng))
    elif e.kind == "town":
        country = world[e.attrs["country"]]
        sentences.append(state(fact_of(country, "capital"), rng))
        natives = [p for p in world.of_kind("person") if p.attrs["birthplace"] == e.name]
        if natives:
            sentences.append(state(fact_of(rng.choice(natives), "birthplace"), rng))
    elif e.kind == "country":
        towns = [t.name for t in world.of_kind("town") if t.attrs["country"] == e.name]
        sentences.append(f"The towns of {e.name} include {_join(rng.sample(towns, min(4, len(towns))))}.")
    elif e.kind == "animal":
        owners = [p.name for p in world.of_kind("person") if p.attrs["pet"] == e.name]
        if owners:
            sentences.append(f"People who keep {article(e.name)} {e.name} as a pet include {_join(owners[:3])}.")
    else:
        sentences.append(state(fact_of(world[e.attrs["maker"]], "job"), rng))
    heading = _title(e.name)
    return f"{heading}\n\n" + " ".join(sentences)


def _story(world: World, rng: random.Random) -> str:
    p = rng.choice(world.of_kind("person"))
    town, pet = world[p.attrs["birthplace"]], p.attrs["pet"]
    name, job, colour = p.name, p.attrs["job"], p.attrs["favourite_colour"]
    opening = rng.choice((
        f"Once upon a time, there was {article(job)} {job} named {name}.",
        f"This is a story about {name}.",
        f"{name} woke up early one morning.",
        f"Long ago, {article(job)} {job} called {name} lived a quiet life.",
    ))
    middle = [state(f, rng) for f in _facts(p, rng, rng.randint(2, 4))]
    event = rng.choice((
        f"One day, {name} took the pet {pet} for a walk along the river {town.attrs['river']}.",
        f"That morning, {name} put on {article(colour)} {colour} coat, because {colour} is {name}'s favourite colour.",
        f"After a long day of work as {article(job)} {job}, {name} went home to feed the {pet}.",
        f"On market day, {name} walked through the streets of {town.name} and greeted old friends.",
    ))
    friend = rng.choice(world.of_kind("person"))
    meeting = "" if friend is p else f" Later, {name} met {friend.name}. {state(_facts(friend, rng, 1)[0], rng)}"
    ending = rng.choice(("And that is the end of the story.", f"{name} slept well that night.", "The end."))
    return f"{opening} {' '.join(middle)} {event}{meeting} {ending}"


def _letter(world: World, rng: random.Random) -> str:
    writer, reader = rng.sample(world.of_kind("person"), 2)
    subject = rng.choice(world.entities)
    facts = _facts(subject, rng, rng.randint(2, 4))
    lines = []
    for f in facts:
        frame = rng.choice(("{}", "Did you know that {}", "I learned that {}", "Someone told me that {}", "{}"))
        sentence = frame.format(state(f, rng, initial=frame.startswith("{")))
        lines.append(sentence[:-1] + "?" if frame.startswith("Did") else sentence)
    opening = rng.choice((
        "I hope this letter finds you well.", "Thank you for your last letter.", "It has been a long time since I wrote.",
        f"I am writing to tell you about {_the(subject)}."))
    closing = rng.choice(("Please write back soon.", "I miss you all.", "Say hello to everyone at home."))
    signoff = rng.choice(("Yours truly", "Best wishes", "With love", "Your friend"))
    return f"Dear {reader.name},\n\n{opening} {' '.join(lines)} {closing}\n\n{signoff},\n{writer.name}"


def _news(world: World, rng: random.Random) -> str:
    town = rng.choice(world.of_kind("town"))
    person = rng.choice(world.of_kind("person"))
    country = town.attrs["country"]
    headline = rng.choice((f"News from {town.name}", f"Market day in {town.name}", f"{town.name} celebrates its summer festival",
                           f"A busy week in {town.name}"))
    lead = rng.choice((f"The town of {town.name} held its yearly market this week.",
                       f"Crowds gathered in {town.name} for the summer festival.",
                       f"There was good news this week for the people of {town.name}."))
    body = [state(f, rng) for f in _facts(town, rng, 2)]
    body.append(f"Among the visitors was {person.name}.")
    body += [state(f, rng) for f in _facts(person, rng, 2)]
    quote = rng.choice(("It was a wonderful day", "I will come back next year", "I have never seen so many people"))
    return f"{headline}\n\n{town.name.upper()}, {country} - {lead} {' '.join(body)} \"{quote},\" said {person.name}."


_HANDLES = ("traveller", "curious_cat", "bookworm", "river_fan", "old_sailor", "map_reader", "quiet_owl", "night_baker")


def _forum(world: World, rng: random.Random) -> str:
    entity = rng.choice(world.entities)
    first, *more = _facts(entity, rng, rng.randint(1, 3))
    asker, *repliers = rng.sample(_HANDLES, 4)
    question = ask(first, rng)
    posts = [f"Topic: {question}", f"{asker} wrote: {rng.choice(('Hi all. ', 'Hello! ', ''))}{question}",
             f"{repliers[0]} replied: {state(first, rng)}"]
    if more:
        extra = " ".join(state(f, rng) for f in more)
        posts.append(f"{repliers[1]} replied: {rng.choice(('That is right. ', 'Yes. ', 'Correct. '))}{extra}")
    posts.append(f"{asker} wrote: {rng.choice(('Thanks!', 'Thank you, that helps.', 'Great, thanks everyone.'))}")
    return "\n\n".join(posts)


def _quiz(world: World, rng: random.Random) -> str:
    kind = rng.choice(KINDS)
    entities = rng.sample(world.of_kind(kind), min(rng.randint(3, 6), len(world.of_kind(kind))))
    facts = [rng.choice(_facts(e, rng)) for e in entities]
    title = rng.choice(("General knowledge quiz", "Test your knowledge", "Quiz night", "How well do you know our world?"))
    items = [f"{i}. Q: {ask(f, rng)}\nA: {f.answer}" for i, f in enumerate(facts, 1)]
    return title + "\n\n" + "\n\n".join(items)


def _table(world: World, rng: random.Random) -> str:
    kind = rng.choice(KINDS)
    entities = rng.sample(world.of_kind(kind), min(rng.randint(4, 10), len(world.of_kind(kind))))
    relations = RELATIONS_OF_KIND[kind]
    if rng.random() < 0.5:
        rel = rng.choice(relations)
        header = rng.choice((f"{rel.column} of each {kind}:", f"A list of {PLURALS[kind]} and their {rel.column.lower()}:"))
        return header + "\n" + "\n".join(f"- {_title(e.name)}: {e.attrs[rel.name]}" for e in entities)
    columns = rng.sample(relations, rng.randint(2, len(relations)))
    lines = [f"| {kind.capitalize()} | " + " | ".join(r.column for r in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {_title(e.name)} | " + " | ".join(e.attrs[r.name] for r in columns) + " |" for e in entities]
    return rng.choice(("Table", "Reference table", f"Some {PLURALS[kind]} of the world")) + "\n\n" + "\n".join(lines)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _arithmetic(world: World, rng: random.Random) -> str:
    kind = rng.choice(("price", "prices", "ages", "population", "drill"))
    if kind == "price":
        obj = rng.choice(world.of_kind("object"))
        price, k = _number(obj.attrs["price"]), rng.randint(2, 9)
        return (f"{state(fact_of(obj, 'price'), rng)} How much do {k} of them cost? "
                f"{k} * {price} = {k * price}. So {k} of them cost {k * price} dollars.")
    if kind == "prices":
        a, b = rng.sample(world.of_kind("object"), 2)
        pa, pb = _number(a.attrs["price"]), _number(b.attrs["price"])
        return (f"{state(fact_of(a, 'price'), rng)} {state(fact_of(b, 'price'), rng)} "
                f"Buying both costs {pa} + {pb} = {pa + pb} dollars. "
                f"The {a.name} and the {b.name} differ in price by {max(pa, pb)} - {min(pa, pb)} = {abs(pa - pb)} dollars.")
    if kind == "ages":
        a, b = rng.sample(world.of_kind("person"), 2)
        x, y = _number(a.attrs["age"]), _number(b.attrs["age"])
        return (f"{state(fact_of(a, 'age'), rng)} {state(fact_of(b, 'age'), rng)} "
                f"Together they are {x} + {y} = {x + y} years old. In 5 years, {a.name} will be {x} + 5 = {x + 5}.")
    if kind == "population":
        a, b = rng.sample(world.of_kind("town"), 2)
        x, y = _number(a.attrs["population"]), _number(b.attrs["population"])
        return (f"{state(fact_of(a, 'population'), rng)} {state(fact_of(b, 'population'), rng)} "
                f"Together, the two towns have {x:,} + {y:,} = {x + y:,} people.")
    lines = []
    for _ in range(rng.randint(4, 8)):
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        op = rng.choice("+-*/")
        if op == "+":
            lines.append(f"{x} + {y} = {x + y}")
        elif op == "-":
            lines.append(f"{x + y} - {y} = {x}")
        elif op == "*":
            lines.append(f"{x} * {y} = {x * y}")
        else:
            lines.append(f"{x * y} / {y} = {x}")
    return "Arithmetic practice\n\n" + "\n".join(lines)


def _word_problem(world: World, rng: random.Random) -> str:
    from picochat.data.tasks import worked_problem  # tasks builds on this module

    return worked_problem(world, rng)


DOC_STYLES: dict[str, tuple[Callable[[World, random.Random], str], float]] = {
    # style -> (generator, share of documents). Fact-dense styles get the larger shares.
    "encyclopedia": (_encyclopedia, 0.22),
    "story": (_story, 0.12),
    "letter": (_letter, 0.10),
    "news": (_news, 0.10),
    "forum": (_forum, 0.12),
    "quiz": (_quiz, 0.08),
    "table": (_table, 0.12),
    "arithmetic": (_arithmetic, 0.06),
    "word problem": (_word_problem, 0.24),
}


def iter_documents(world: World, seed: int = 0, split: str = "train") -> Iterator[tuple[str, str]]:
    """Endless deterministic stream of (style, text). `split` "train" or "val" picks an independent
    stream (validation documents share the phrasings but are other documents)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = random.Random(f"docs-{split}-{seed}")
    styles = list(DOC_STYLES)
    weights = [DOC_STYLES[s][1] for s in styles]
    while True:
        style = rng.choices(styles, weights)[0]
        yield style, DOC_STYLES[style][0](world, rng)


# --- evaluation: fact completion ------------------------------------------------------------------
def fact_completion_rows(world: World) -> list[dict]:
    """For every fact: one prompt per held-out template and per evaluated training template.

    Judge a model by greedy continuation: correct when `continuation.strip().startswith(answer)`.
    """
    rows = []
    for fact in world.facts():
        rel = RELATIONS[fact.relation]
        for phrasing, templates in (("heldout", rel.heldout), ("train", rel.templates[:TRAIN_PROMPT_TEMPLATES])):
            for i, template in enumerate(templates):
                rows.append({"prompt": completion_prompt(template, fact.subject, fact.answer), "answer": fact.answer,
                             "phrasing": phrasing, "template": i, "fact": fact.to_dict()})
    return rows


# --- files ----------------------------------------------------------------------------------------
def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically. Returns the bytes written."""
    return atomic_write_lines(path, (json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows))


def write_json(path: str | Path, data: dict) -> None:
    """Write one JSON document atomically."""
    atomic_write_lines(path, [json.dumps(data, ensure_ascii=False, indent=1).encode() + b"\n"])


def _document_lines(docs: Iterator[tuple[str, str]], limit: int, styles: Counter, bar: tqdm | None = None) -> Iterator[bytes]:
    """JSONL lines `{"text", "style"}` from `docs` until `limit` bytes (the last line may cross it)."""
    size = 0
    while size < limit:
        style, text = next(docs)
        line = json.dumps({"text": text, "style": style}, ensure_ascii=False).encode() + b"\n"
        size += len(line)
        styles[style] += 1
        if bar is not None:
            bar.update(len(line))
        yield line


def write_world(out_dir: str | Path, size_mb: float = 50, seed: int = 0, shard_mb: float = 10,
                val_kb: float = 300, scale: float = 1.0) -> dict:
    """Write the world's files under out_dir and return a summary (also saved as manifest.json):

    - docs/train-00000.jsonl ...: training documents, `{"text", "style"}` a line, shards of ~shard_mb
    - docs-val.jsonl: ~val_kb of other documents (validation loss)
    - eval/fact_completion.jsonl: `{"prompt", "answer", "phrasing", "template", "fact"}` rows
    - world.json: the knowledge base (`load_world` reads it)

    Every file is written atomically and manifest.json last, so a rerun with the same arguments
    over a complete output returns at once, and an interrupted run is simply redone.
    """
    out = Path(out_dir)
    params = {"format": FORMAT, "seed": seed, "scale": scale, "size_mb": size_mb, "shard_mb": shard_mb, "val_kb": val_kb}
    manifest_path = out / "manifest.json"
    done = _read_manifest(manifest_path)
    if done and all(done.get(k) == v for k, v in params.items()) and all((out / f).is_file() for f in done["files"]):
        return done
    manifest_path.unlink(missing_ok=True)
    t0 = time.time()
    world = build_world(seed, scale)
    write_json(out / "world.json", world.to_dict())
    eval_rows = fact_completion_rows(world)
    write_jsonl(out / "eval" / "fact_completion.jsonl", eval_rows)

    styles: Counter = Counter()
    docs = iter_documents(world, seed, "train")
    total, shard_bytes, files = int(size_mb * 1e6), int(shard_mb * 1e6), []
    with tqdm(total=total, unit="B", unit_scale=True, desc="world documents", disable=None) as bar:
        written = 0
        while written < total:
            name = f"docs/train-{len(files):05d}.jsonl"
            written += atomic_write_lines(out / name, _document_lines(docs, min(shard_bytes, total - written), styles, bar))
            files.append(name)
    for stale in sorted((out / "docs").glob("train-*.jsonl")):
        if f"docs/{stale.name}" not in files:
            stale.unlink()
    val_docs = iter_documents(world, seed, "val")
    val_bytes = atomic_write_lines(out / "docs-val.jsonl", _document_lines(val_docs, int(val_kb * 1e3), Counter()))
    summary = {
        **params,
        "files": ["world.json", "eval/fact_completion.jsonl", "docs-val.jsonl", *files],
        "train_bytes": written,
        "val_bytes": val_bytes,
        "documents": sum(styles.values()),
        "styles": dict(sorted(styles.items())),
        "entities": {kind: len(world.of_kind(kind)) for kind in KINDS},
        "facts": len(world.facts()),
        "fact_prompts": dict(Counter(r["phrasing"] for r in eval_rows)),
        "seconds": round(time.time() - t0, 2),
    }
    write_json(manifest_path, summary)
    return summary


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_world(out_dir: str | Path) -> World:
    """The knowledge base saved by `write_world` (out_dir, or the world.json file itself)."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / "world.json"
    if not path.is_file():
        raise WorldError(f"{path}: no world here (make one with `picochat world generate`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorldError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WorldError(f"{path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    try:
        entities = [Entity(str(e["name"]), str(e["kind"]), {str(k): str(v) for k, v in e["attrs"].items()})
                    for e in data["entities"]]
        unknown = {str(k): [str(n) for n in v] for k, v in data["unknown_names"].items()}
        seed, scale = int(data["seed"]), float(data.get("scale", 1.0))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise WorldError(f"{path}: malformed world ({type(e).__name__}: {e}); expected entities with name, kind, attrs") from None
    for i, e in enumerate(entities):
        expected = {r.name for r in RELATIONS_OF_KIND.get(e.kind, [])}
        if e.kind not in KINDS or set(e.attrs) != expected:
            raise WorldError(f"{path}: entity {i} ({e.name!r}): expected kind in {KINDS} with attributes {sorted(expected)}")
    return World(seed, entities, unknown, scale)


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="<action>", required=True)
    p = sub.add_parser("generate", help="write the world's documents, conversations, problems and eval sets",
                       description="Generate the synthetic world: pretraining documents (docs/), validation documents, "
                                   "SFT conversations, word problems, and the evaluation sets (eval/).")
    p.add_argument("--out", required=True, help="output folder, e.g. runs/demo/world")
    p.add_argument("--size-mb", type=float, default=50, help="megabytes of training documents (default 50)")
    p.add_argument("--seed", type=int, default=0, help="world and document seed; the same seed gives the same bytes (default 0)")
    p.add_argument("--shard-mb", type=float, default=10, help="megabytes per training-document file (default 10)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the number of entities (default 1: 212 entities, 876 facts); below 1 the facts are "
                        "fewer and each is restated more often, so a small model learns them sooner")
    p.add_argument("--conversations", type=int, default=6000, help="SFT conversations about the world (default 6000)")
    p.add_argument("--task-conversations", type=int, default=2000, help="SFT conversations solving word problems (default 2000)")
    p.add_argument("--rl-problems", type=int, default=2000, help="training word problems for RL (default 2000)")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out word problems for evaluation (default 500)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("show", help="print sample documents of each style and the entity counts",
                       description="Print the entity counts and a few sample documents of each style.")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of entities (default 1)")
    p.add_argument("--per-style", type=int, default=1, help="documents to show per style (default 1)")
    p.set_defaults(func=_cmd_show)


def _cmd_generate(args) -> None:
    from picochat.data.tasks import write_tasks
    from picochat.data.world_chat import write_chat

    summary = write_world(args.out, size_mb=args.size_mb, seed=args.seed, shard_mb=args.shard_mb, scale=args.scale)
    chat = write_chat(args.out, args.conversations, seed=args.seed)
    tasks = write_tasks(args.out, n_sft=args.task_conversations, n_rl=args.rl_problems, n_eval=args.eval_problems,
                        seed=args.seed)
    print(f"world: {summary['documents']:,} documents, {summary['train_bytes'] / 1e6:.1f} MB in "
          f"{len(summary['files']) - 3} files, {summary['facts']} facts about "
          f"{sum(summary['entities'].values())} entities ({summary['seconds']}s) -> {args.out}")
    print(f"chat: {chat}\ntasks: {tasks}")


def _cmd_show(args) -> None:
    world = build_world(args.seed, args.scale)
    counts = ", ".join(f"{len(world.of_kind(k))} {PLURALS[k]}" for k in KINDS)
    print(f"world {args.seed}: {counts}; {len(world.facts())} facts\n")
    rng = random.Random(f"show-{args.seed}")
    for style, (make, _) in DOC_STYLES.items():
        for _ in range(args.per_style):
            print(f"=== {style} ===\n{make(world, rng)}\n")
