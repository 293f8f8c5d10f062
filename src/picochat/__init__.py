"""picochat: build your own ChatGPT end to end, from a BPE tokenizer to a chat box."""

__version__ = "0.1.0"
