"""The knowledge base of the synthetic world: its entities and their facts, built from a seed.

The demo pipeline pretrains, fine-tunes and evaluates a tiny model on this world, so it is built to
be learnable from a few million tokens: a couple of hundred entities with short invented names,
each fact restated in many documents and many phrasings.

- `build_world(seed, scale)` makes the knowledge base: people, towns, countries, animals and
  objects, with attributes that link them (a person's birthplace is a town of the world, a
  country's capital is one of its towns, an object's maker is a person), plus invented names that
  belong to nothing (questions about them should get "I don't know"). Everything is drawn from
  `random.Random(seed)`; no global random state is touched.
- `fact_completion_rows(world)` is the fact-completion evaluation: prompts such as
  "The capital of Varnia is" that end right before the answer (" Oskel").
- `save_world` writes `world.json` and `load_world` reads it back.

How the facts are worded is in `phrasings.py`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from picochat.io import atomic_write_json, read_json
from picochat.world.phrasings import RELATIONS, TRAIN_PROMPT_TEMPLATES, completion_prompt

FORMAT = "picochat-world/1"
WORLD_FILE = "world.json"
KINDS = ("country", "town", "person", "animal", "object")
PLURALS = {"country": "countries", "town": "towns", "person": "people", "animal": "animals", "object": "objects"}
# Entities of each kind in a world: several hundred facts, few enough to learn in minutes.
WORLD_SIZES = {"country": 8, "town": 40, "person": 100, "animal": 24, "object": 40}
# Invented names per kind that belong to no entity, for "I don't know" conversations.
UNKNOWN_NAMES_PER_KIND = 48
# "News": entities whose documents are kept out of pretraining and SFT and only put in the search
# index, so the model can know about them only by searching (the lecture's working memory).
NEWS_SIZES = {"person": 24, "object": 12}

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
    news: list[Entity] = field(default_factory=list)  # known only through search: not in entities
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
            "news": [{"name": e.name, "kind": e.kind, "attrs": e.attrs} for e in self.news],
        }

    def with_news(self) -> World:
        """The same world with the news entities among its entities (to write their documents)."""
        return World(self.seed, self.entities + self.news, self.unknown_names, self.scale)

    def news_facts(self) -> list[Fact]:
        return [Fact(e.name, rel, value) for e in self.news for rel, value in e.attrs.items()]


RELATIONS_OF_KIND = {kind: [r for r in RELATIONS.values() if r.kind == kind] for kind in KINDS}


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


class NameMaker:
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
    names = NameMaker(rng)

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
    def person() -> Entity:
        return Entity(names.make("person"), "person", {
            "birthplace": rng.choice(towns).name, "job": rng.choice(JOBS), "age": str(rng.randint(18, 90)),
            "favourite_colour": rng.choice(COLOURS), "pet": rng.choice(animals).name})

    def thing(makers: list[Entity]) -> Entity:
        return Entity(names.make("object"), "object", {
            "type": rng.choice(OBJECT_TYPES), "material": rng.choice(MATERIALS), "maker": rng.choice(makers).name,
            "price": str(rng.randint(3, 60))})

    people = [person() for _ in range(sizes["person"])]
    objects = [thing(people) for _ in range(sizes["object"])]
    unknown = {kind: [names.make(kind) for _ in range(UNKNOWN_NAMES_PER_KIND)] for kind in KINDS}
    # Drawn last, so the rest of a seed's world is the same with or without them.
    news_people = [person() for _ in range(max(3, round(NEWS_SIZES["person"] * scale)))]
    news = news_people + [thing(news_people) for _ in range(max(2, round(NEWS_SIZES["object"] * scale)))]
    return World(seed, countries + towns + people + animals + objects, unknown, scale, news)


# --- entities invented for one text ---------------------------------------------------------------
def world_names(world: World) -> list[str]:
    """Every name the world uses (entities, the names among their facts, unknown and news names) and
    the vocabulary: what an invented name must not clash with."""
    entities = world.entities + world.news
    values = [v for e in entities for r, v in e.attrs.items() if r in ("language", "currency", "river")]
    unknown = [name for names in world.unknown_names.values() for name in names]
    return [e.name for e in entities] + values + unknown + list(VOCABULARY)


def invent_entity(world: World, kind: str, rng: random.Random, names: NameMaker) -> Entity:
    """An entity of `kind` with a new name (from `names`) and facts drawn as build_world draws them,
    linked to the world's own towns, animals and people like the news entities are."""
    towns, people = world.of_kind("town"), world.of_kind("person")
    if kind == "person":
        attrs = {"birthplace": rng.choice(towns).name, "job": rng.choice(JOBS), "age": str(rng.randint(18, 90)),
                 "favourite_colour": rng.choice(COLOURS), "pet": rng.choice(world.of_kind("animal")).name}
    elif kind == "object":
        attrs = {"type": rng.choice(OBJECT_TYPES), "material": rng.choice(MATERIALS), "maker": rng.choice(people).name,
                 "price": str(rng.randint(3, 60))}
    elif kind == "town":
        attrs = {"country": rng.choice(world.of_kind("country")).name, "river": rng.choice(towns).attrs["river"],
                 "population": f"{rng.randint(2, 98)},000"}
    elif kind == "country":
        attrs = {"capital": names.make("town"), "language": names.make("language"), "currency": names.make("currency")}
    elif kind == "animal":
        attrs = {"habitat": rng.choice(HABITATS), "food": rng.choice(FOODS), "colour": rng.choice(COLOURS)}
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return Entity(names.make(kind), kind, attrs)


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
def save_world(world: World, out_dir: str | Path) -> None:
    """Write the knowledge base to out_dir/world.json (atomically)."""
    atomic_write_json(Path(out_dir) / WORLD_FILE, world.to_dict(), indent=1)


def load_world(out_dir: str | Path) -> World:
    """The knowledge base saved by `save_world` (out_dir, or the world.json file itself)."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / WORLD_FILE
    if not path.is_file():
        raise WorldError(f"{path}: no world here (make one with `picochat world generate`)")
    data = read_json(path, WorldError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WorldError(f"{path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    try:
        entities = [Entity(str(e["name"]), str(e["kind"]), {str(k): str(v) for k, v in e["attrs"].items()})
                    for e in data["entities"]]
        unknown = {str(k): [str(n) for n in v] for k, v in data["unknown_names"].items()}
        seed, scale = int(data["seed"]), float(data.get("scale", 1.0))
        news = [Entity(str(e["name"]), str(e["kind"]), {str(k): str(v) for k, v in e["attrs"].items()})
                for e in data.get("news", [])]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise WorldError(f"{path}: malformed world ({type(e).__name__}: {e}); expected entities with name, kind, attrs") from None
    for i, e in enumerate(entities + news):
        expected = {r.name for r in RELATIONS_OF_KIND.get(e.kind, [])}
        if e.kind not in KINDS or set(e.attrs) != expected:
            raise WorldError(f"{path}: entity {i} ({e.name!r}): expected kind in {KINDS} with attributes {sorted(expected)}")
    return World(seed, entities, unknown, scale, news)
