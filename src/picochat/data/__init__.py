"""Generic data for the pipeline; nothing here knows about the synthetic world (`picochat.world`).

    sources.py        read documents: text, JSONL, parquet, each optionally gzip; folders recursively
    download.py       download FineWeb-edu parquet shards (`picochat download`)
    shards.py         tokenize documents into token shards and a manifest; the pretraining loader
    conversations.py  conversation files (messages, ShareGPT, Alpaca), FILE:WEIGHT mixtures, the SFT loader
    tasks.py          verifiable problems: read them (picochat JSONL, GSM8K), extract an answer, reward it
    preferences.py    preference pairs: read them ({prompt, chosen, rejected}, stack-exchange-paired), encode them
    passages.py       cut documents into passages of bounded size (what a search returns)
    index.py          the search index: passages in SQLite FTS5, BM25 search (`picochat index`)
"""
