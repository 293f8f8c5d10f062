"""Serving: the OpenAI-compatible HTTP API and the web chat behind the lecture's text box.

    app.py          the FastAPI app (routes, API key, OpenAI-shaped errors) and `picochat serve`
    schemas.py      the request bodies the API accepts and its error type
    completions.py  chat and text completions: prompts, stop strings, usage, streamed events
    batcher.py      the worker thread that decodes every request of a model in continuous batches
    text.py         stop strings: cut the reply text where one appears
    static/         the web page (plain HTML, CSS and JavaScript; no build step, no network)
"""
