"""`picochat serve`: the OpenAI-compatible HTTP API and the web chat (FastAPI + uvicorn).

    picochat serve --run runs/demo                      # http://127.0.0.1:8000/ (web chat), /v1 (API)
    picochat serve --run runs/demo --stage rl --api-key secret --max-batch 16 --max-body-mb 8
    picochat serve --run runs/demo --no-tools           # the model gets no tools

Endpoints: `POST /v1/chat/completions` (the chat model), `POST /v1/completions` (documents; the
base model `<run>/base` when the run has one), `GET /v1/models`, `POST /v1/tokenize` (the token
view: a conversation exactly as the model sees it), `GET /health`, and the web page at `/`.
Every served model decodes in its own worker thread (see batcher.py), many requests per step.
The server runs the model's tools itself (the calculator, and search when the run has an index;
`--no-tools` turns them off): chat completions offer them unless a request says `"tool_choice":
"none"`, and return the steps in `tool_steps` (schemas.py); `GET /v1/models` lists them per model.
Errors are OpenAI's shape (errors.py): 400 for invalid requests, 401 without the API key, 404,
413 for a body over the limit (limits.py), 500 for the server's own failures, 503 when the queue
is full. Work that grows with a request (rendering, tokenizing, the token view) runs in worker
threads, so that one large request does not stall the others; a client that leaves a request
that does not stream cancels it, as one that leaves a stream does.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from picochat.chat import ConversationError
from picochat.chat import token_view as chat_token_view
from picochat.checkpoint import load_model
from picochat.run import STAGES, Run
from picochat.serve.batcher import Batcher, Overloaded, RequestFailed
from picochat.serve.completions import (
    chat_generation,
    complete,
    conversation,
    least_conversation_tokens,
    least_tokens,
    offers_tools,
    sse_events,
    text_generation,
)
from picochat.serve.errors import add_error_handlers
from picochat.serve.limits import DEFAULT_MAX_BODY_MB, BodyLimit
from picochat.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest, TokenizeRequest
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from picochat.tools import Tools

STATIC = Path(__file__).parent / "static"
CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (as nginx)
API_KEY_ENV = "PICOCHAT_API_KEY"


class _EventStream(StreamingResponse):
    """A server-sent-event response that frees its request's batch rows however the stream ends:
    finished, failed, or cut short by a client that went away."""

    def __init__(self, events, submission, headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self._submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._submission.close()


def create_app(tokenizer: Tokenizer, models: dict, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
               max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20), tools: Tools | None = None) -> FastAPI:
    """The server for `models` (model id -> Transformer, first = the default chat model); ids that
    name the same Transformer share its batcher. Batchers start and stop with the app. `tools` are
    offered in chat completions and run the models' calls (None: no tools)."""
    batchers: dict[int, Batcher] = {}
    served: dict[str, Batcher] = {}
    for model_id, model in models.items():
        if id(model) not in batchers:
            batchers[id(model)] = Batcher(model, max_batch=max_batch, max_queue=max_queue, tools=tools)
        served[model_id] = batchers[id(model)]
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for batcher in batchers.values():
            batcher.start()
        yield
        for batcher in batchers.values():
            batcher.close()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    add_error_handlers(app)
    longest_context = max(batcher.model.config.max_seq_len for batcher in served.values())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")

    def batcher_for(model_id: str) -> Batcher:
        if model_id not in served:
            raise APIError(404, f"the model {model_id!r} does not exist; this server has {', '.join(served)}",
                           param="model", code="model_not_found")
        return served[model_id]

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "picochat",
                "context_length": served[model_id].model.config.max_seq_len, "tools": tool_names(tools)}

    async def answer(generation, batcher: Batcher, connection: Request):
        try:
            submission = batcher.submit(generation.prompt, generation.n, **generation.options)
        except Overloaded as error:
            raise APIError(503, str(error), type="server_error", code="overloaded") from None
        if generation.stream:
            return _EventStream(sse_events(generation, submission, tokenizer), submission, generation.headers())
        try:
            body = await _unless_disconnected(complete(generation, submission, tokenizer), connection)
            return Response(status_code=CLIENT_GONE) if body is None else JSONResponse(body, headers=generation.headers())
        except ValueError as error:  # the engine refused the request
            raise APIError(400, str(error)) from None
        except RequestFailed as error:
            raise APIError(500, str(error), type="server_error") from None

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @api.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card(model_id) for model_id in served]}

    @api.get("/models/{model_id}")
    async def get_model(model_id: str):
        batcher_for(model_id)
        return model_card(model_id)

    @api.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, connection: Request):
        batcher = batcher_for(request.model)
        generation = await asyncio.to_thread(chat_generation, request, request.model, tokenizer,
                                             batcher.model.config.max_seq_len, max_batch, tools is not None)
        return await answer(generation, batcher, connection)

    @api.post("/completions")
    async def completions(request: CompletionRequest, connection: Request):
        batcher = batcher_for(request.model)
        generation = await asyncio.to_thread(text_generation, request, request.model, tokenizer,
                                             batcher.model.config.max_seq_len, max_batch)
        return await answer(generation, batcher, connection)

    @api.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        offer = offers_tools(tools is not None, request.tool_choice)
        return await asyncio.to_thread(lambda: JSONResponse(token_view(request, tokenizer, longest_context, offer)))

    app.include_router(api)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {model_id: batcher.stats() for model_id, batcher in served.items()}}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _unless_disconnected(work: Awaitable[dict], connection: Request) -> dict | None:
    """What `work` returns, or None if the client disconnects first: `work` is then cancelled,
    which frees its batch rows."""
    result = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnection(connection))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            await asyncio.wait({result})
    return None if result.cancelled() else result.result()


async def _disconnection(connection: Request) -> None:
    # The body has been read: what the connection receives next is its end.
    while (await connection.receive())["type"] != "http.disconnect":
        pass


def token_view(request: TokenizeRequest, tokenizer: Tokenizer, max_tokens: int, offer_tools: bool = False) -> dict:
    """A conversation (or a document prompt) as the model sees it: the rendered protocol text,
    each token's id and piece, and the count. A conversation that ends with a user message
    includes the `<|im_start|>assistant<|im_sep|>` that primes the reply; with `offer_tools` its
    system message offers the tools, as in a chat completion, and its replies' tool steps show as the
    tool tokens they were. Longer than `max_tokens`
    (the longest context served: no model could read it) is refused, before tokenizing when the
    text alone is too long."""
    if (request.messages is None) == (request.prompt is None):
        raise APIError(400, "send either 'messages' (a conversation) or 'prompt' (a document), not both or neither")
    if request.prompt is not None:
        messages, at_least = None, 1 + least_tokens([request.prompt], tokenizer)
    else:
        messages = conversation(request.messages, offer_tools)
        at_least = least_conversation_tokens(messages, tokenizer)
    if at_least > max_tokens:
        raise _longer_than_any_context(f"at least {at_least}", max_tokens)
    if messages is None:
        ids = [tokenizer.eot_id] + tokenizer.encode_batch([request.prompt])[0]
        text = SPECIAL_TOKENS[tokenizer.eot_id] + request.prompt
    else:
        try:
            ids, text = chat_token_view(messages, tokenizer)
        except ConversationError as error:
            raise APIError(400, str(error), param="messages") from None
    if len(ids) > max_tokens:
        raise _longer_than_any_context(str(len(ids)), max_tokens)
    tokens = [{"id": i, "piece": tokenizer.id_to_piece(i), "special": i < len(SPECIAL_TOKENS)} for i in ids]
    return {"text": text, "tokens": tokens, "count": len(ids)}


def _longer_than_any_context(tokens: str, max_tokens: int) -> APIError:
    return APIError(400, f"this takes {tokens} tokens, more than the longest context served ({max_tokens} tokens)",
                    code="context_length_exceeded")


def tool_names(tools: Tools | None) -> list[str]:
    """The tools the server runs: calc, and search when it has an index; none when off."""
    if tools is None:
        return []
    return ["calc", "search"] if tools.index is not None else ["calc"]


# --- command line ---------------------------------------------------------------------------------
def load_models(run: Path, stage: str | None, device: str) -> tuple[Tokenizer, dict, Path]:
    """The run's tokenizer and the models to serve: the chat stage first, then the base model."""
    chat_model, tokenizer, stage_dir = Run(run).load(stage, device)
    name = run.resolve().name
    models = {f"{name}-{stage_dir.name}": chat_model}
    if stage_dir.name != "base" and (Run(run).stage("base") / "model.json").exists():
        models[f"{name}-base"] = load_model(Run(run).stage("base"), device)[0]
    return tokenizer, models, stage_dir


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (e.g. runs/demo)")
    parser.add_argument("--stage", default=None, choices=STAGES,
                        help="the chat model's stage (default: the most advanced finished one); the base model is "
                             "served as well, for /v1/completions, when the run has one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together in one step (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="most sequences waiting for a batch row; beyond it requests get 503 (default 64)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body accepted, in MiB; larger ones get 413 (default {DEFAULT_MAX_BODY_MB:g})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-tools", action="store_true",
                        help="run no tools: chat completions offer none and a call the model writes is not run "
                             "(default: the calculator, and search when the run has a search index)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: PyTorch's choice; 1 is often fastest for small "
                             "models on a few busy cores)")
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    import uvicorn

    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch} and {args.max_queue}")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    tokenizer, models, stage_dir = load_models(run, args.stage, args.device)
    tools = None if args.no_tools else Tools(tokenizer, Run(run).open_index())
    app = create_app(tokenizer, models, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_body_bytes=int(args.max_body_mb * 2**20), tools=tools)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"picochat serve: warning: listening on {args.host} without an API key; anyone who can reach it can use it")
    searching = f" (search reads {tools.index.directory})" if tools is not None and tools.index else ""
    running = f"tools: {', '.join(tool_names(tools))}{searching}" if tools is not None else "tools off"
    print(f"picochat serve: {stage_dir} as {', '.join(models)}; {running}; "
          f"web chat at http://{args.host}:{args.port}/, API at /v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
