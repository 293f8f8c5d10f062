"""Shared test fixtures: the real-data folder beside the repository and a small trained tokenizer."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SAMPLE_TEXT = (
    "The capital of Varnia is Oskel. Oskel lies on the river Tam, and 12,345 people live there.\n"
    "Dear Mira, I bought 3 apples and 2 oranges; each apple cost $2. Ünïcödé, 日本語, emoji 🎉.\n"
    "def f(x):\n    return x ** 2  # code too\n"
) * 20


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when that folder is not beside the clone."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data tests need ../shared/data beside the repository")
    return path


@pytest.fixture(scope="session")
def small_tokenizer():
    from picochat.tokenizer import Tokenizer

    return Tokenizer.train([SAMPLE_TEXT], vocab_size=512)
