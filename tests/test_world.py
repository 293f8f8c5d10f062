"""Tests for picochat.world: the knowledge base, the documents, the fact-completion eval, the files, the CLI."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from picochat.cli import main as cli_main
from picochat.world import documents
from picochat.world import search_documents
from picochat.world.documents import (DOC_STYLES, copying_rows, line_copying_rows, value_reading_rows, PRACTICE_ENTITIES, generate_documents, practice_entities, reading_document,
                                      write_world)
from picochat.world.knowledge import (KINDS, RELATIONS_OF_KIND, VOCABULARY, NameMaker, WorldError, build_world,
                                      fact_completion_rows, invent_entity, load_world, world_names)
from picochat.world.phrasings import RELATIONS, TRAIN_PROMPT_TEMPLATES, fill


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small generated world on disk (2 MB of training documents in 3 shards)."""
    out = tmp_path_factory.mktemp("world")
    summary = write_world(out, size_mb=2, seed=0, shard_mb=0.8)
    return out, summary


def corpus_text(out: Path) -> str:
    texts = []
    for path in sorted((out / "docs").glob("*.jsonl")) + [out / "docs-val.jsonl"]:
        texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n\x00\n".join(texts)


# --- the knowledge base ---------------------------------------------------------------------------
def test_same_seed_same_world_other_seed_other_world(world):
    assert build_world(0).to_dict() == world.to_dict()
    other = build_world(1)
    assert other.to_dict() != world.to_dict()
    assert {e.name for e in other.entities} != {e.name for e in world.entities}


def test_world_has_several_hundred_entities_of_every_kind(world):
    assert 150 <= len(world.entities) <= 400
    for kind in KINDS:
        assert len(world.of_kind(kind)) >= 8
        for entity in world.of_kind(kind):
            assert set(entity.attrs) == {r.name for r in RELATIONS_OF_KIND[kind]}
    assert len(world.facts()) == sum(len(e.attrs) for e in world.entities)


def test_names_are_unique_and_no_name_is_a_prefix_of_another(world):
    rivers = {town.attrs["river"] for town in world.of_kind("town")}  # towns may share a river
    names = [e.name for e in world.entities] + sorted(rivers)
    names += [c.attrs[r] for c in world.of_kind("country") for r in ("language", "currency")]
    names += [n for kind in KINDS for n in world.unknown_names[kind]]
    lowered = [n.lower() for n in names]
    assert len(set(lowered)) == len(lowered)
    words = lowered + [w.lower() for w in VOCABULARY]
    for a in words:
        for b in words:
            assert a is b or not b.startswith(a), f"{a!r} is a prefix of {b!r}"
    for name in names:
        assert re.fullmatch(r"[A-Za-z]{4,9}", name), name


def test_relations_link_entities_of_the_right_kinds(world):
    def kind_of(name):
        return world[name].kind

    for person in world.of_kind("person"):
        assert kind_of(person.attrs["birthplace"]) == "town"
        assert kind_of(person.attrs["pet"]) == "animal"
        assert 18 <= int(person.attrs["age"]) <= 90
    for town in world.of_kind("town"):
        assert kind_of(town.attrs["country"]) == "country"
        assert re.fullmatch(r"\d{1,2},000", town.attrs["population"])
    for country in world.of_kind("country"):
        capital = world[country.attrs["capital"]]
        assert capital.kind == "town" and capital.attrs["country"] == country.name
    for obj in world.of_kind("object"):
        assert kind_of(obj.attrs["maker"]) == "person"
        assert int(obj.attrs["price"]) > 0


def test_scale_sets_the_number_of_entities(tmp_path):
    small = build_world(0, scale=0.25)
    assert [len(small.of_kind(k)) for k in KINDS] == [3, 10, 25, 6, 10]
    assert len(build_world(0, scale=2).of_kind("person")) == 200
    write_world(tmp_path, size_mb=0.05, seed=0, scale=0.25)
    assert load_world(tmp_path).to_dict() == small.to_dict() and load_world(tmp_path).scale == 0.25
    with pytest.raises(ValueError, match="scale"):
        build_world(0, scale=0)


def test_unknown_names_are_not_in_the_world(world):
    for kind in KINDS:
        assert len(world.unknown_names[kind]) >= 30
        for name in world.unknown_names[kind]:
            assert name not in world


def test_news_entities_are_new_names_linked_to_the_world(world):
    assert {e.kind for e in world.news} == {"person", "object"} and len(world.news) == 36
    for e in world.news:
        assert e.name not in world and all(e.name not in names for names in world.unknown_names.values())
        linked = [e.attrs["birthplace"], e.attrs["pet"]] if e.kind == "person" else []
        assert all(name in world for name in linked)
    news_people = {e.name for e in world.news if e.kind == "person"}
    assert all(e.attrs["maker"] in news_people for e in world.news if e.kind == "object")
    assert build_world(0, 0.25).to_dict()["entities"] == [  # adding news changed nothing else
        {"name": e.name, "kind": e.kind, "attrs": e.attrs} for e in build_world(0, 0.25).entities]


# --- documents ------------------------------------------------------------------------------------
def test_documents_are_deterministic_and_streams_differ(world):
    def first(seed, split, n=60):
        stream = generate_documents(world, seed, split)
        return [next(stream) for _ in range(n)]

    assert first(0, "train") == first(0, "train")
    assert first(0, "train") != first(1, "train")
    assert first(0, "train") != first(0, "val")
    with pytest.raises(ValueError, match="split"):
        next(generate_documents(world, 0, "test"))


def test_every_style_appears_and_states_facts(world):
    stream = generate_documents(world, 0)
    docs = [next(stream) for _ in range(600)]
    styles = {style for style, _ in docs}
    assert styles == set(DOC_STYLES) and len(styles) >= 7
    for style, text in docs:
        assert text.strip() and "{" not in text and "}" not in text, (style, text)
    # Encyclopedia entries state every fact of their entity.
    for style, text in docs:
        if style == "encyclopedia":
            entity = next(e for e in world.entities if text.startswith(e.name[0].upper() + e.name[1:] + "\n"))
            for value in entity.attrs.values():
                assert value.lower() in text.lower()


def test_worked_arithmetic_in_documents_is_correct(world):
    stream = generate_documents(world, 3)
    checked = 0
    for _ in range(800):
        style, text = next(stream)
        if style not in ("arithmetic", "word problem"):
            continue
        for a, op, b, result in re.findall(r"(\d[\d,]*) ([-+*/]) (\d[\d,]*) = (\d[\d,]*)", text):
            x, y, r = (int(v.replace(",", "")) for v in (a, b, result))
            assert {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op] == r, text
            checked += 1
    assert checked > 100


# --- fact completion ------------------------------------------------------------------------------
def test_every_fact_has_heldout_and_train_prompts_with_the_knowledge_base_answer(world):
    rows = fact_completion_rows(world)
    by_fact = {}
    for row in rows:
        by_fact.setdefault((row["fact"]["subject"], row["fact"]["relation"]), []).append(row)
    assert len(by_fact) == len(world.facts())
    for fact in world.facts():
        fact_rows = by_fact[(fact.subject, fact.relation)]
        rel = RELATIONS[fact.relation]
        assert sum(r["phrasing"] == "heldout" for r in fact_rows) == len(rel.heldout)
        assert sum(r["phrasing"] == "train" for r in fact_rows) == TRAIN_PROMPT_TEMPLATES
        for row in fact_rows:
            assert row["answer"] == world[fact.subject].attrs[fact.relation] == fact.answer
            assert row["prompt"] == row["prompt"].rstrip() and fact.subject in row["prompt"]
            templates = rel.heldout if row["phrasing"] == "heldout" else rel.templates
            # The full sentence goes on with " <answer>": the prompt ends right before it.
            assert fill(templates[row["template"]], fact.subject, fact.answer).startswith(row["prompt"] + " " + fact.answer)


def test_heldout_phrasings_never_appear_in_any_document(world, written):
    out, _ = written
    text = corpus_text(out)
    assert len(text) > 1_500_000
    heldout = [r["prompt"] for r in fact_completion_rows(world) if r["phrasing"] == "heldout"]
    for prompt in heldout:
        assert prompt not in text, prompt
        assert prompt[0].lower() + prompt[1:] not in text, prompt
    # The phrasing itself, not only these prompts: with any word in place of the subject.
    for rel in RELATIONS.values():
        for template in rel.heldout:
            prompt = template[: template.index(" {o}")]
            pattern = re.escape(prompt).replace(re.escape("{s}"), r"\w+").replace(re.escape("{a}"), "an?")
            assert not re.search(pattern, text, re.IGNORECASE), template


def test_train_phrasings_do_appear_in_documents(world, written):
    out, _ = written
    text = corpus_text(out)
    rows = [r for r in fact_completion_rows(world) if r["phrasing"] == "train"]
    seen_templates = {(r["fact"]["relation"], r["template"]) for r in rows if f"{r['prompt']} {r['answer']}" in text}
    assert seen_templates == {(r.name, i) for r in RELATIONS.values() for i in range(TRAIN_PROMPT_TEMPLATES)}
    found = sum(f"{r['prompt']} {r['answer']}" in text for r in rows)
    assert found / len(rows) > 0.5


def test_train_prompts_are_unambiguous_in_the_documents(world, written):
    """Wherever a train-phrasing prompt occurs in the corpus, the answer comes right after it, so a
    greedy continuation is judged against the only thing the documents ever say there."""
    out, _ = written
    text = corpus_text(out)
    for row in fact_completion_rows(world):
        if row["phrasing"] != "train":
            continue
        needle = row["prompt"] + " "
        start = text.find(needle)
        while start != -1:
            after = start + len(needle)
            assert text[after: after + len(row["answer"])] == row["answer"], text[start: after + 40]
            start = text.find(needle, after)


# --- files ----------------------------------------------------------------------------------------
def test_write_world_writes_shards_val_eval_and_world(world, written):
    out, summary = written
    shards = sorted((out / "docs").glob("train-*.jsonl"))
    assert [p.name for p in shards] == ["train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl"]
    sizes = [p.stat().st_size for p in shards]
    assert sum(sizes) == summary["train_bytes"] and 2_000_000 <= sum(sizes) < 2_010_000
    assert max(sizes) < 810_000
    for path in shards + [out / "docs-val.jsonl"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert isinstance(row["text"], str) and row["text"] and row["style"] in DOC_STYLES
    assert 250_000 <= (out / "docs-val.jsonl").stat().st_size < 310_000
    eval_rows = [json.loads(line) for line in (out / "eval" / "fact_completion.jsonl").read_text().splitlines()]
    assert eval_rows == json.loads(json.dumps(fact_completion_rows(world)))
    assert load_world(out).to_dict() == world.to_dict()
    assert summary["facts"] == len(world.facts()) and set(summary["styles"]) == set(DOC_STYLES)
    assert not list(out.rglob("*.tmp"))


def test_news_are_only_in_the_news_documents(world, written):
    out, summary = written
    corpus = corpus_text(out)
    news = [json.loads(line) for line in (out / "docs-news.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["news_documents"] == len(news) == 2 * len(world.news)
    for e in world.news:
        assert not re.search(rf"\b{e.name}\b", corpus), e.name
        articles = [row["text"] for row in news if row["text"].startswith(_title_of(e.name))]
        assert len(articles) == 2 and all(value.lower() in articles[0].lower() for value in e.attrs.values())


def test_practice_entities_and_reading_documents_use_names_the_world_does_not(world, written):
    out, _ = written
    taken = [name.lower() for name in world_names(world)]
    practice = practice_entities(world)
    assert len({e.name for e in practice}) == len(practice) == PRACTICE_ENTITIES
    for e in practice:
        assert not any(e.name.lower().startswith(t) or t.startswith(e.name.lower()) for t in taken), e.name
    articles = [json.loads(line)["text"] for line in (out / "docs-practice.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(articles) == 2 * len(practice) and out / "docs-practice.jsonl" in search_documents(out)
    rng = random.Random(0)
    for _ in range(50):
        kind = rng.choice(KINDS)
        e = invent_entity(world, kind, rng, NameMaker(rng, world_names(world)))
        assert e.name.lower() not in taken and set(e.attrs) == {r.name for r in RELATIONS_OF_KIND[kind]}
        _, heading, article, questions = reading_document(e, rng).split("\n\n")
        assert heading == e.name[0].upper() + e.name[1:]
        assert all(value.lower() in article.lower() for value in e.attrs.values())
        answers = questions.split("\n")[1::2]
        assert 2 <= len(answers) <= 3 and all(a.startswith("A: ") for a in answers)
        assert all(any(value.lower() in a.lower() for value in e.attrs.values()) for a in answers)
    assert "\n\nQ: " in DOC_STYLES["reading"][0](world, rng)


def _title_of(name: str) -> str:
    return name[0].upper() + name[1:] + "\n"


def test_write_world_same_seed_same_bytes_and_rerun_returns_at_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = write_world(a, size_mb=0.3, seed=5, shard_mb=0.2)
    write_world(b, size_mb=0.3, seed=5, shard_mb=0.2)
    for name in summary["files"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    stamps = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    assert write_world(a, size_mb=0.3, seed=5, shard_mb=0.2) == summary
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == stamps
    # Other arguments redo the work, and leftover shards of the bigger run go away.
    smaller = write_world(a, size_mb=0.1, seed=5, shard_mb=0.2)
    assert sorted(p.name for p in (a / "docs").iterdir()) == ["train-00000.jsonl"]
    assert smaller["train_bytes"] < summary["train_bytes"]


def test_write_world_redoes_an_incomplete_output(tmp_path):
    summary = write_world(tmp_path, size_mb=0.2, seed=0)
    (tmp_path / "docs" / "train-00000.jsonl").unlink()
    write_world(tmp_path, size_mb=0.2, seed=0)
    assert (tmp_path / "docs" / "train-00000.jsonl").stat().st_size == summary["train_bytes"]


def test_a_crash_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    real = documents.generate_documents

    def failing(world, seed=0, split="train"):
        stream = real(world, seed, split)
        for _ in range(100):
            yield next(stream)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(documents, "generate_documents", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_world(tmp_path, size_mb=1, seed=0)
    assert not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / "docs" / "train-00000.jsonl").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(documents, "generate_documents", real)
    assert write_world(tmp_path, size_mb=0.1, seed=0)["documents"] > 0


def test_load_world_errors_name_the_file(tmp_path):
    with pytest.raises(WorldError, match="no world here"):
        load_world(tmp_path)
    path = tmp_path / "world.json"
    path.write_text("{not json")
    with pytest.raises(WorldError, match=f"{re.escape(str(path))}: line \\d+: not valid JSON"):
        load_world(tmp_path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(WorldError, match="format"):
        load_world(path)
    data = build_world(0).to_dict()
    del data["entities"][3]["attrs"]["capital"]
    path.write_text(json.dumps(data))
    with pytest.raises(WorldError, match=r"entity 3 .*attributes"):
        load_world(path)
    data["entities"] = [{"name": "X"}]
    path.write_text(json.dumps(data))
    with pytest.raises(WorldError, match="malformed"):
        load_world(path)


# --- CLI ------------------------------------------------------------------------------------------
def test_cli_generate_and_show(tmp_path, capsys):
    out = tmp_path / "w"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["world", "generate", "--out", str(out), "--size-mb", "0.2", "--conversations", "30",
                  "--task-conversations", "20", "--rl-problems", "20", "--eval-problems", "10"])
    assert exit_info.value.code == 0
    for name in ("world.json", "manifest.json", "docs/train-00000.jsonl", "docs-val.jsonl", "eval/fact_completion.jsonl",
                 "sft.jsonl", "eval/qa.jsonl", "eval/qa-train.jsonl", "tasks-sft.jsonl", "tasks-rl.jsonl", "eval/tasks.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "sft.jsonl").read_text().splitlines()) == 30
    assert "world:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["world", "show", "--per-style", "1"])
    shown = capsys.readouterr().out
    assert all(f"=== {style} ===" in shown for style in DOC_STYLES)
    assert "100 people" in shown and "8 countries" in shown


def _eval_rows(make, world):
    """30 rows of an evaluation set, the same on a second call, and the world's own names."""
    rows = make(world, 30)
    assert rows == make(world, 30) and len(rows) == 30
    return rows, {e.name for e in world.entities}


def test_value_reading_rows_end_where_a_value_must_be_read_from_the_article(world):
    rows, known = _eval_rows(value_reading_rows, world)
    for row in rows:
        article, asked = row["prompt"].split("\n\nQ: ")
        question, answer_begun = asked.split("\nA:")
        name = article.split("\n\n")[1]  # the article's title: the invented entity
        assert name.lower() not in {k.lower() for k in known}
        assert row["answer"] in article and row["answer"] not in answer_begun  # read from the article, not given
        sentence = next(s for s in article.split("\n\n")[2].split(". ") if row["answer"] in s)
        begun = answer_begun.strip()  # empty where the answer's phrasing opens with the value
        assert not begun or begun not in sentence  # asked in words other than the article's


def test_copying_rows_end_where_a_name_never_seen_must_be_copied(world):
    rows, known = _eval_rows(copying_rows, world)
    for row in rows:
        name, prompt = row["answer"], row["prompt"]
        assert name not in known
        assert name in prompt.split("\n\nQ: ")[0]  # the article names it
        assert not prompt.endswith(" ") and "\nA:" in prompt.split("\n\nQ: ", 1)[1]
        assert (prompt + " " + name).count(name) >= 2


def test_line_copying_rows_end_where_the_line_read_before_must_be_copied(world):
    rows, known = _eval_rows(line_copying_rows, world)
    for row in rows:
        name, prompt = row["answer"], row["prompt"]
        line, again = prompt.split("\n\n")[1:]
        assert name not in known and name in line.split(" ")  # an invented name the line holds
        begun = again.removeprefix("Again: ")
        assert begun and line.startswith(begun + " " + name)  # the copy so far, up to the name
        assert name not in begun.split(" ")


def test_copying_practice_repeats_its_line():
    world = build_world(seed=3, scale=0.25)
    rng = random.Random(0)
    for _ in range(20):
        title, line, again = DOC_STYLES["copying"][0](world, rng).split("\n\n")
        assert again.partition(": ")[2] == line and 6 <= len(line.split(" "))
