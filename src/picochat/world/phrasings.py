"""How each attribute of the world is put into words: the phrasing tables and the sentence filler.

`RELATIONS` maps each attribute (a person's birthplace, a country's capital ...) to its sentence
templates used in documents, *held-out* completion templates that no document ever uses (to test
that knowledge generalises to new phrasings), and question templates for the chats (`chats.py`).
Besides its own phrasings, every relation is written in shared sentence FRAMES; each relation holds
out two of them, which other relations use (a compositional split a tiny model can learn).
`fill` puts a subject and a value into a template; `completion_prompt` cuts a template before its
value ("The capital of Varnia is").
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
# small model can learn to generalise to; a wholly unseen sentence shape mostly it cannot
# (BENCHMARKS.md). Half the frames name the subject before the relation, half after, and each
# relation keeps one of each.
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
    recalls a fact more often when the subject comes right before the answer (BENCHMARKS.md)."""
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
# The training templates whose prompts are evaluated as "train" phrasings (the rest are not
# unambiguous completions: "The Zorbit is" could go on in several ways).
TRAIN_PROMPT_TEMPLATES = 2


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def fill(template: str, subject: str, value: str, initial: bool = True) -> str:
    """Fill a template. `initial`: it starts a sentence (capitalised); else the first word is
    lowercased unless the template starts with a placeholder (a name keeps its capital)."""
    text = template.format(s=subject, o=value, a=article(value))
    if initial:
        return text[0].upper() + text[1:]
    return text if template.startswith("{") else text[0].lower() + text[1:]


def completion_prompt(template: str, subject: str, value: str) -> str:
    """The words of a completion template before its answer (no trailing space)."""
    return fill(template[: template.index(" {o}")], subject, value)
