"""The API fuzzed from its own OpenAPI schema (Schemathesis, in process through ASGI): requests the
schema allows and requests that break it, each answered within a time limit and none with a 5xx.

Bounded for a 2-core machine: models with a 16-token context (replies of at most 15 tokens), at
most 2 choices a request, at most MAX_EXAMPLES generated requests per operation, the explicit
examples and fuzzing phases only (Schemathesis's coverage phase enumerates every boundary of every
field), and derandomized: every run sends the same requests, so its length does not vary.
"""

import schemathesis
from hypothesis import HealthCheck, settings

from conftest import SAMPLE_TEXT
from picochat.serve.app import create_app
from picochat.tokenizer import Tokenizer
from test_serve import tiny_model

MAX_EXAMPLES = 30
REQUEST_TIMEOUT = 30  # seconds: longer is a hang
SERVED = {"/v1/chat/completions": "demo-sft", "/v1/completions": "demo-base"}
ROLES = {"system", "developer", "user", "assistant", "tool"}


def fuzzed_app():
    # Built at import: Schemathesis reads the schema when pytest collects the tests (its
    # fixture-based loader does not run on this pytest).
    tokenizer = Tokenizer.train([SAMPLE_TEXT], vocab_size=512)
    models = {"demo-sft": tiny_model(tokenizer.vocab_size, seed=2, context=16),
              "demo-base": tiny_model(tokenizer.vocab_size, seed=1, context=16)}
    return create_app(tokenizer, models, max_batch=2, max_queue=2)


schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app())
schema.config.phases.update(phases=["examples", "fuzzing"])
schema.config.generation.update(max_examples=MAX_EXAMPLES)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
def test_no_request_gets_a_server_error_or_hangs(case):
    # Random model names and roles only ever meet a 404 or a 400; served ones let requests reach the model.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and case.path in SERVED:
        case.body["model"] = SERVED[case.path]
    messages = case.body.get("messages") if isinstance(case.body, dict) else None
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and isinstance(message.get("role"), str) and message["role"] not in ROLES:
            message["role"] = "user"
    response = case.call(timeout=REQUEST_TIMEOUT)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r:.500}: {response.status_code} {response.text:.500}"
