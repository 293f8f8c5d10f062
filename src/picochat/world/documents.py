"""The world's "internet": pretraining documents in eleven styles, and the files they are written to.

`generate_documents(world, seed, split)` is an endless, deterministic stream of `(style, text)`:
encyclopedia entries, stories, letters, news, forum threads, quizzes, lists and tables, worked
arithmetic about the world's things, worked word problems (the train split of `word_problems.py`),
reading practice (questions about an entity invented for that document alone, answered by
copying from it), and copying practice (a line of names and numbers, then the same line again).
Facts are stated in their training phrasings (`state`), never in the held-out ones. The news
entities (`World.news`) appear in none of them: `news_documents` writes articles about them for the
search index alone, and `practice_documents` about the practice entities, which SFT searches for.
`copying_rows` cuts reading practice about entities invented for the evaluation where a name must be
copied (the copying evaluation), `value_reading_rows` where a fact's value must be read from the
article, `line_copying_rows` copying practice where the line's next name must be copied.
`write_world(out_dir, size_mb, seed)` writes the documents as JSONL shards with a `text` field (the
FineWeb layout), with the knowledge base and the fact-completion eval beside them.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from picochat.io import atomic_write_json, atomic_write_jsonl, atomic_write_lines
from picochat.world.knowledge import (FORMAT, KINDS, PLURALS, RELATIONS_OF_KIND, WORLD_FILE, Entity, Fact, NameMaker, World,
                                      build_world, fact_completion_rows, fact_of, invent_entity, save_world, world_names)
from picochat.world.phrasings import RELATIONS, TRAIN_PROMPT_TEMPLATES, Relation, article, fill
from picochat.world.word_problems import worked_problem

# How much more often documents use each of a relation's first TRAIN_PROMPT_TEMPLATES templates
# (the canonical ones) than its other templates.
CANONICAL_WEIGHT = 2.0
NEWS_FILE = "docs-news.jsonl"
PRACTICE_FILE = "docs-practice.jsonl"


# --- facts in words -------------------------------------------------------------------------------
def _template_weights(rel: Relation) -> list[float]:
    # The canonical phrasings are the commonest, as in real text (and they are what SFT answers use).
    return [CANONICAL_WEIGHT if i < TRAIN_PROMPT_TEMPLATES else 1.0 for i in range(len(rel.templates))]


_TEMPLATE_WEIGHTS = {name: _template_weights(rel) for name, rel in RELATIONS.items()}


def state(fact: Fact, rng: random.Random, initial: bool = True) -> str:
    """One training-phrasing sentence stating a fact."""
    rel = RELATIONS[fact.relation]
    template = rng.choices(rel.templates, _TEMPLATE_WEIGHTS[rel.name])[0]
    return fill(template, fact.subject, fact.answer, initial)


def ask(fact: Fact, rng: random.Random) -> str:
    """One training-phrasing question about a fact."""
    return rng.choice(RELATIONS[fact.relation].questions).format(s=fact.subject)


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
    return encyclopedia_entry(world, rng.choice(world.entities), rng)


def encyclopedia_entry(world: World, e: Entity, rng: random.Random) -> str:
    """An article about `e`: a heading, then all its facts and a few about the entities it links to."""
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


def short_article(e: Entity, rng: random.Random) -> str:
    """A heading, an opening line and every fact about `e`, linking to nothing else."""
    return _article_and_statements(e, rng)[0]


def _article_and_statements(e: Entity, rng: random.Random) -> tuple[str, dict[str, str]]:
    """short_article, and the sentence of it that states each fact (by relation)."""
    intro = rng.choice(_INTROS[e.kind]).format(s=e.name)
    statements = {f.relation: state(f, rng) for f in _facts(e, rng)}
    return f"{_title(e.name)}\n\n" + " ".join([intro, *statements.values()]), statements


def _reading(world: World, rng: random.Random) -> str:
    """Reading practice about an entity invented for this document alone. Nothing in it can be
    remembered from elsewhere: the name and the facts have to be copied from the text above, the
    skill a model needs to answer from a search result about a name it never saw."""
    return reading_document(invent_entity(world, rng.choice(KINDS), rng, NameMaker(rng, world_names(world))), rng)


def reading_document(e: Entity, rng: random.Random) -> str:
    """A short article about `e`, then two or three questions about it, each answered from the article."""
    title = rng.choice(("Reading practice", "Read the text and answer the questions", "Comprehension"))
    answers = [f"Q: {ask(f, rng)}\nA: {rng.choice((state(f, rng), f.answer))}" for f in _facts(e, rng, rng.randint(2, 3))]
    return f"{title}\n\n{short_article(e, rng)}\n\n" + "\n".join(answers)


def _copying(world: World, rng: random.Random) -> str:
    """Copying practice: a line of invented names, numbers and the world's own values, then the same
    line again. Only copying predicts its second half: without such documents the base model learnt
    no induction (it predicted 5% of a repeated line's tokens) and garbled a name it had to copy from
    its context ("Greta" -> "Ganda") (BENCHMARKS.md, "Copying practice")."""
    line, _ = _copying_line(world, rng)
    title = rng.choice(("Copying practice", "Dictation", "Read the line, then write it again"))
    return f"{title}\n\n{line}\n\n{rng.choice(('Again:', 'Once more:', 'Copy:'))} {line}"


def _copying_line(world: World, rng: random.Random) -> tuple[str, list[str]]:
    """6 to 14 items (half of them invented names, a quarter numbers, a quarter the world's values)
    joined by spaces, and the invented names among them."""
    names = NameMaker(rng, world_names(world))
    items, invented = [], []
    for _ in range(rng.randint(6, 14)):
        draw = rng.random()
        if draw < 0.5:
            invented.append(names.make(rng.choice(KINDS)))
            items.append(invented[-1])
        elif draw < 0.75:
            items.append(str(rng.randint(2, 99)))
        else:
            items.append(rng.choice(list(rng.choice(world.entities).attrs.values())))
    return " ".join(items), invented


COPYING_ROWS = 100


def line_copying_rows(world: World, n: int = COPYING_ROWS) -> list[dict]:
    """n copying-practice documents, each `{"prompt", "answer"}`: cut in the line's second copy just
    before an invented name that is not its first item, whose answer is that name. Only a model that
    copies the line (induction) completes them."""
    rng = random.Random(f"line-copying-{world.seed}")
    rows = []
    while len(rows) < n:
        line, invented = _copying_line(world, rng)
        items = line.split(" ")
        later = [i for i, item in enumerate(items) if i > 0 and item in invented and items.count(item) == 1]
        if later:
            i = rng.choice(later)
            rows.append({"prompt": f"Copying practice\n\n{line}\n\nAgain: {' '.join(items[:i])}", "answer": items[i]})
    return rows


def copying_rows(world: World, n: int = COPYING_ROWS) -> list[dict]:
    """n reading-practice documents about entities invented for this evaluation, each `{"prompt",
    "answer"}`: the document cut just before the name's first use after the first answer line (in an
    answer or the next question), whose answer is that name. A base model completes them only by
    copying the name from the article above it."""
    rng = random.Random(f"copying-{world.seed}")
    names = NameMaker(rng, world_names(world))
    rows = []
    while len(rows) < n:
        e = invent_entity(world, rng.choice(KINDS), rng, names)
        article, questions = reading_document(e, rng).split("\n\nQ: ", 1)
        questions = "Q: " + questions
        first_answer = questions.find("\nA:")
        cut = questions.find(e.name, first_answer)
        if cut >= 0:  # the last question may be the first and only one to answer without the name
            rows.append({"prompt": f"{article}\n\n{questions[:cut].rstrip(' ')}", "answer": e.name})
    return rows


def value_reading_rows(world: World, n: int = COPYING_ROWS) -> list[dict]:
    """n reading-practice prompts about entities invented for this evaluation, each `{"prompt",
    "answer"}`: a short article, a question about one of its facts, and the answer begun in words
    other than the article's, cut just before the value. A base model completes them only by finding
    the fact in the article and copying its value: the reading a search result asks for."""
    rng = random.Random(f"value-reading-{world.seed}")
    names = NameMaker(rng, world_names(world))
    rows = []
    while len(rows) < n:
        e = invent_entity(world, rng.choice(KINDS), rng, names)
        article, statements = _article_and_statements(e, rng)
        f = _facts(e, rng, 1)[0]
        answer = state(f, rng)
        cut = answer.rfind(f.answer)
        if answer != statements[f.relation] and cut >= 0 and answer.count(f.answer) == 1:
            rows.append({"prompt": f"Reading practice\n\n{article}\n\nQ: {ask(f, rng)}\nA: {answer[:cut].rstrip(' ')}".rstrip(),
                         "answer": f.answer})
    return rows


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
    "word problem": (worked_problem, 0.24),
    # Reading practice is a style whose names must be copied, not remembered: a seventh of the
    # documents teach the base model to copy a name from its context (BENCHMARKS.md, "Copying").
    "reading": (_reading, 0.23),
    # Copying practice, one document in eight: the induction a name in a system prompt,
    # a search query and a value read from a result all build on (BENCHMARKS.md, "Copying practice").
    "copying": (_copying, 0.20),
}


NEWS_ENTRIES_PER_ENTITY = 2


def news_documents(world: World) -> list[tuple[str, str]]:
    """(style, text) articles about the world's news entities, each several times in other words:
    the documents only the search index holds."""
    rng = random.Random(f"news-{world.seed}")
    extended = world.with_news()
    return [("news entity", encyclopedia_entry(extended, e, rng)) for e in world.news for _ in range(NEWS_ENTRIES_PER_ENTITY)]


PRACTICE_ENTITIES = 400


def practice_entities(world: World, n: int = PRACTICE_ENTITIES) -> list[Entity]:
    """n invented entities (fixed by the world's seed) that only the search index knows, like the news
    entities but for training: SFT asks about them and answers from what the search returns."""
    rng = random.Random(f"practice-{world.seed}")
    names = NameMaker(rng, world_names(world))
    return [invent_entity(world, rng.choice(KINDS), rng, names) for _ in range(n)]


def practice_documents(world: World) -> list[tuple[str, str]]:
    """(style, text) articles about the practice entities, each twice in other words, for the index."""
    rng = random.Random(f"practice-docs-{world.seed}")
    return [("practice entity", short_article(e, rng)) for e in practice_entities(world) for _ in range(NEWS_ENTRIES_PER_ENTITY)]


def generate_documents(world: World, seed: int = 0, split: str = "train") -> Iterator[tuple[str, str]]:
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
    - docs-news.jsonl: the articles about the news entities, for the search index only
    - docs-practice.jsonl: the articles about the practice entities, for the search index only
    - eval/fact_completion.jsonl: `{"prompt", "answer", "phrasing", "template", "fact"}` rows
    - world.json: the knowledge base (`load_world` reads it)

    Every file is written atomically and manifest.json last, so a rerun with the same arguments
    over a complete output returns at once, and an interrupted run is simply redone.
    """
    out = Path(out_dir)
    params = {"format": FORMAT, "seed": seed, "scale": scale, "size_mb": size_mb, "shard_mb": shard_mb, "val_kb": val_kb,
              "news_entries": NEWS_ENTRIES_PER_ENTITY, "practice_entities": PRACTICE_ENTITIES}
    manifest_path = out / "manifest.json"
    done = _read_manifest(manifest_path)
    if done and all(done.get(k) == v for k, v in params.items()) and all((out / f).is_file() for f in done["files"]):
        return done
    manifest_path.unlink(missing_ok=True)
    t0 = time.time()
    world = build_world(seed, scale)
    save_world(world, out)
    eval_rows = fact_completion_rows(world)
    atomic_write_jsonl(out / "eval" / "fact_completion.jsonl", eval_rows)

    styles: Counter = Counter()
    docs = generate_documents(world, seed, "train")
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
    val_docs = generate_documents(world, seed, "val")
    val_bytes = atomic_write_lines(out / "docs-val.jsonl", _document_lines(val_docs, int(val_kb * 1e3), Counter()))
    news = news_documents(world)
    atomic_write_jsonl(out / NEWS_FILE, [{"text": text, "style": style} for style, text in news])
    practice = practice_documents(world)
    atomic_write_jsonl(out / PRACTICE_FILE, [{"text": text, "style": style} for style, text in practice])
    summary = {
        **params,
        "files": [WORLD_FILE, "eval/fact_completion.jsonl", "docs-val.jsonl", NEWS_FILE, PRACTICE_FILE, *files],
        "train_bytes": written,
        "val_bytes": val_bytes,
        "documents": sum(styles.values()),
        "styles": dict(sorted(styles.items())),
        "entities": {kind: len(world.of_kind(kind)) for kind in KINDS},
        "news_entities": len(world.news),
        "news_documents": len(news),
        "facts": len(world.facts()),
        "fact_prompts": dict(Counter(r["phrasing"] for r in eval_rows)),
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(manifest_path, summary, indent=1)
    return summary


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
