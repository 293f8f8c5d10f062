"""Evaluation on real benchmarks, for a picochat run's stage or a Hugging Face folder
(`picochat eval --suite core|chat`, `picochat eval --bpb FILE...`; the world's own sets are `picochat.evaluate`).

    tasks.py       the task table, reading and checking task files (llm-foundry layout), few-shot prompt texts
    scoring.py     log-likelihood of continuations after a shared prefix, batched
    core.py        the CORE-like suite: accuracy, chance, centred accuracy per task, and their mean
    chat_suite.py  ARC and GSM8K asked as chat questions, plus the world's chat sets
    bpb.py         bits per byte on held-out documents
    models.py      the model under evaluation: a run's stage or a Hugging Face folder
    card.py        the report card's section, and the speedrun's benchmark stage
    cli.py         the options `picochat eval` gains, and running them
"""
