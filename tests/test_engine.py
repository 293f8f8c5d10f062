"""The engine: sampling, batching, num_samples, stop ids, streaming, context limits, tool calls."""

import dataclasses

import pytest
import torch
from conftest import SAMPLE_TEXT

from picochat.chat import result_text
from picochat.data.index import SearchIndex, build_index
from picochat.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    ContextLengthError,
    ContinuousBatch,
    GenerationError,
    Sampling,
    context_room,
    generate,
    sample_next,
    stream,
)
from picochat.model import ModelConfig, Transformer
from picochat.tokenizer import Tokenizer
from picochat.tools import TOOLS_SYSTEM_PROMPT, CalculatorError, Tools, calculate, with_tools

VOCAB = 101
PROMPTS = [[5, 17, 33, 2, 9, 60, 1], [42, 7], [88], [3, 14, 15, 92]]
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=VOCAB, n_layer=2, d_model=48, n_head=4, n_kv_head=2, max_seq_len=40)
    model = Transformer(config)
    model.init_weights(seed=11)
    with torch.no_grad():  # sharper next-token distributions than a fresh init, so greedy has no near-ties
        model.lm_head.weight.mul_(40)
    return model.eval()


@torch.no_grad()
def greedy_without_cache(model, prompt, max_new_tokens):
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# --- greedy, seeds, batching ---------------------------------------------------------------


def test_greedy_matches_recomputing_the_whole_sequence(model):
    result = generate(model, PROMPTS, 12, GREEDY)
    for prompt, [completion] in zip(PROMPTS, result):
        assert completion == Completion(greedy_without_cache(model, prompt, 12), FINISH_LENGTH)
    assert generate(model, PROMPTS, 12, GREEDY) == result


def test_batch_of_different_lengths_equals_one_at_a_time(model):
    batched = generate(model, PROMPTS, 10, GREEDY)
    assert batched == [generate(model, [p], 10, GREEDY)[0] for p in PROMPTS]


def test_seeded_sampling_is_reproducible(model):
    first = generate(model, PROMPTS, 10, Sampling(seed=123), num_samples=2)
    again = generate(model, PROMPTS, 10, Sampling(seed=123), num_samples=2)
    other = generate(model, PROMPTS, 10, Sampling(seed=124), num_samples=2)
    assert first == again
    assert first != other


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, 10, GREEDY)
    assert generate(model, PROMPTS, 10, Sampling(1.3, top_k=1, seed=5)) == greedy
    assert generate(model, PROMPTS, 10, Sampling(1.3, top_p=1e-6, seed=5)) == greedy


def test_sample_next_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=generator).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.7, generator=generator).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample_next(logits, top_p=0.85, generator=generator).tolist()) == {0, 1, 2}
    counts = torch.bincount(sample_next(logits, generator=generator), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.05, rtol=0)
    assert sample_next(logits[:1], temperature=0).tolist() == [0]


def test_num_samples_share_one_prefill(model):
    prefills = []
    hook = model.register_forward_pre_hook(lambda _, args: prefills.append(tuple(args[0].shape)))
    try:
        result = generate(model, PROMPTS[:2], 6, GREEDY, num_samples=3)
    finally:
        hook.remove()
    assert prefills[0] == (2, 7)
    assert all(shape[1] == 1 for shape in prefills[1:])  # no other call prefills
    assert prefills[1] == (6, 1)  # 2 prompts x 3 samples decode together
    for prompt, samples in zip(PROMPTS[:2], result):
        assert samples == generate(model, [prompt], 6, GREEDY)[0] * 3
    sampled = generate(model, PROMPTS[:1], 8, Sampling(seed=3), num_samples=4)[0]
    assert len({tuple(c.tokens) for c in sampled}) > 1  # the copies sample independently


# --- stopping, streaming, limits -----------------------------------------------------------


def test_stops_at_a_stop_id_and_excludes_it(model):
    [[full]] = generate(model, PROMPTS[:1], 12, GREEDY)
    stop = full.tokens[4]
    cut = full.tokens.index(stop)
    [[stopped]] = generate(model, PROMPTS[:1], 12, Sampling(0, stop_ids=[stop, VOCAB + 5]))
    assert stopped == Completion(full.tokens[:cut], FINISH_STOP, stop_id=stop)


def test_rows_that_stop_early_do_not_disturb_the_others(model):
    greedy = generate(model, PROMPTS, 10, GREEDY)
    stop = greedy[1][0].tokens[1]  # prompt 1 stops after one token
    result = generate(model, PROMPTS, 10, Sampling(0, stop_ids=[stop]))
    for full, [completion] in zip(greedy, result):
        tokens = full[0].tokens
        expected = tokens[:tokens.index(stop)] if stop in tokens else tokens
        assert completion.tokens == expected


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(0.9, top_k=20, top_p=0.9, seed=8)])
def test_stream_yields_what_generate_returns(model, sampling):
    stop = generate(model, [PROMPTS[0]], 15, sampling)[0][0].tokens[9]
    sampling = dataclasses.replace(sampling, stop_ids=[stop])
    [[expected]] = generate(model, [PROMPTS[0]], 15, sampling)
    tokens = stream(model, PROMPTS[0], 15, sampling)
    assert tokens.finish_reason is None
    assert next(tokens) == expected.tokens[0]
    assert [expected.tokens[0], *tokens] == expected.tokens
    assert tokens.finish_reason == expected.finish_reason == FINISH_STOP


def test_context_length_limits_the_completion_and_rejects_full_prompts(model):
    prompt = list(range(35))
    [[completion]] = generate(model, [prompt], 20, GREEDY)
    assert len(completion.tokens) == 5 and completion.finish_reason == FINISH_LENGTH
    assert list(stream(model, prompt, 20, GREEDY)) == completion.tokens
    # a short prompt batched with it still gets its own, longer budget
    [_, [short]] = generate(model, [prompt, [1, 2]], 20, GREEDY)
    assert len(short.tokens) == 20
    with pytest.raises(ContextLengthError, match="40"):
        stream(model, list(range(40)), 1)


def test_context_room_is_what_is_left_after_the_prompt():
    assert [context_room(40, n) for n in (1, 39, 40, 41)] == [39, 1, 0, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, VOCAB]]), "outside the vocabulary"),
        (dict(prompts=[]), "no prompts"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_arguments_are_refused(model, kwargs, message):
    arguments = {**dict(prompts=[[1, 2]], max_new_tokens=3), **kwargs}
    with pytest.raises(GenerationError, match=message):
        generate(model, **arguments)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top_k"),
     (dict(top_k=True), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p")],
)
def test_bad_sampling_is_refused(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        Sampling(**kwargs)


# --- the calculator and tool calls ---------------------------------------------------------


@pytest.mark.parametrize(
    "expression, result",
    [("2+3*4", "14"), ("(2+3)*4", "20"), ("7/2", "3.5"), ("6/3", "2"), ("17//5", "3"), ("17 % 5", "2"),
     ("2**10", "1024"), ("-(3-5)", "2"), ("1/3", "0.3333333333"), ("1.5*4", "6"), (" 12 * 3 ", "36")],
)
def test_calculator_computes(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('ls')", "open('/etc/passwd')", "x + 1", "(1).__class__", "[1, 2]", "'a' * 3",
     "2 ** 1000", "10 ** 10 ** 10", "9" * 30, "1 / 0", "5 % 0", "(-8) ** 0.5", "True + 1", "lambda: 1",
     "1; 2", "", "1 +", "2" + "*2" * 150, "\x00"],
)
def test_calculator_refuses(expression):
    with pytest.raises(CalculatorError):
        calculate(expression)


def bigram_model(tokenizer, successors: dict[int, int], context: int = 64) -> Transformer:
    """A real Transformer whose weights make it predict successors[current token] (attention and
    MLP outputs are zeroed, so the residual stream is the current token's embedding)."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=64, n_head=2, n_kv_head=1,
                         max_seq_len=context)
    model = Transformer(config)
    model.init_weights(seed=0)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        for current, following in successors.items():
            model.lm_head.weight[following] += 10 * embeddings[current] / embeddings[current].norm()
    return model.eval()


@pytest.fixture(scope="module")
def tool_tokenizer():
    """A tokenizer in which the tool names are single tokens, so a bigram model can write a call."""
    return Tokenizer.train([SAMPLE_TEXT + "calc: 2+3 search: capital of Varnia\n" * 30], vocab_size=512)


def tool_ids(tok):
    return (tok.special_id(s) for s in ("<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>", "<|im_end|>"))


def calling_model(tok, call: str, context: int = 64) -> tuple[Transformer, list[int]]:
    """A bigram model that, after token 100, writes `<|tool_call|>call<|/tool_call|>`, and after a tool
    result token 200 then <|im_end|>; the chain of tokens it writes from token 100."""
    call_id, end_call, _, end_res, im_end = tool_ids(tok)
    chain = [100, call_id, *tok.encode(call), end_call]
    assert len(set(chain)) == len(chain), "the hand-made bigram model needs distinct tokens"
    return bigram_model(tok, dict(zip(chain, chain[1:])) | {end_res: 200, 200: im_end, 150: im_end}, context), chain


@pytest.mark.parametrize("call, result", [("calc: 6*7", "42"), ("calc: 6/0", "error: division by zero")])
def test_tool_call_result_is_forced_into_the_sequence(tool_tokenizer, call, result):
    tok = tool_tokenizer
    _, _, res, end_res, im_end = tool_ids(tok)
    model, chain = calling_model(tok, call)
    forced = [res, *tok.encode(result_text(result)), end_res]
    expected = Completion([*chain[1:], *forced, 200], FINISH_STOP, stop_id=im_end)
    prompts = [[100], [7, 150]]
    until_end = Sampling(temperature=0, stop_ids=[im_end])
    batch = generate(model, prompts, 50, until_end, tokenizer=tok)
    assert batch == [[expected], [Completion([], FINISH_STOP, stop_id=im_end)]]
    assert list(stream(model, [100], 50, until_end, tokenizer=tok)) == expected.tokens
    # without a tokenizer there are no tools: nothing is forced after <|/tool_call|>
    [[plain]] = generate(model, [[100]], 50, until_end)
    assert plain.tokens[:len(chain) - 1] == chain[1:] and plain.tokens[len(chain) - 1:len(chain) + 2] != forced
    # forced tokens count toward max_new_tokens
    [[short]] = generate(model, [[100]], len(chain) + 1, GREEDY, tokenizer=tok)
    assert short == Completion([*chain[1:], *forced[:2]], FINISH_LENGTH)


def test_a_search_call_gets_the_passages_fed_back(tool_tokenizer, tmp_path):
    tok = tool_tokenizer
    _, _, res, end_res, im_end = tool_ids(tok)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "Oskel is the capital of Varnia."}\n{"text": "The river Tam is long."}\n')
    build_index(docs, tmp_path / "index", progress=False)
    index = SearchIndex(tmp_path / "index")
    model, chain = calling_model(tok, "search: capital of Varnia", context=256)
    until_end = Sampling(temperature=0, stop_ids=[im_end])
    [[completion]] = generate(model, [[100]], 200, until_end, tools=Tools(tok, index))
    forced = [res, *tok.encode(result_text("[1] Oskel is the capital of Varnia.")), end_res]
    assert completion == Completion([*chain[1:], *forced, 200], FINISH_STOP, stop_id=im_end)
    # without an index the model reads why there is no result
    [[no_index]] = generate(model, [[100]], 200, until_end, tokenizer=tok)
    assert tok.decode(no_index.tokens[len(chain) - 1:-1]) == "<|tool_result|> error: no search index is available<|/tool_result|>"
    index.close()


def test_an_unterminated_call_is_closed_with_an_error(tool_tokenizer):
    tok = tool_tokenizer
    call_id, end_call, res, end_res, im_end = tool_ids(tok)
    model = bigram_model(tok, {100: call_id, call_id: 101, 101: 101, end_res: 200, 200: im_end})  # 101 forever
    tools = Tools(tok, max_call_tokens=5)
    [[completion]] = generate(model, [[100]], 40, Sampling(temperature=0, stop_ids=[im_end]), tools=tools)
    error = tok.encode(result_text("error: the call is longer than 5 tokens"))
    assert completion == Completion([call_id, *[101] * 6, end_call, res, *error, end_res, 200], FINISH_STOP, stop_id=im_end)


def test_sequences_added_with_run_tools_false_share_a_batch_with_tools_and_run_none(tool_tokenizer):
    tok = tool_tokenizer
    _, _, res, end_res, im_end = tool_ids(tok)
    model, chain = calling_model(tok, "calc: 6*7")
    batch = ContinuousBatch(model, tools=Tools(tok))
    until_end = Sampling(temperature=0, stop_ids=[im_end])
    [with_tools] = batch.add([100], 30, until_end)
    [without] = batch.add([100], 30, until_end, run_tools=False)
    tokens = {with_tools: [], without: []}
    while len(batch):
        for event in batch.step():
            if event.token is not None:
                tokens[event.sequence].append(event.token)
    assert tokens[with_tools] == [*chain[1:], res, *tok.encode(result_text("42")), end_res, 200]
    assert tokens[without][:len(chain) - 1] == chain[1:] and res not in tokens[without]


def test_generate_runs_the_tools_of_the_prompts_flagged_only(tool_tokenizer):
    tok = tool_tokenizer
    _, _, res, end_res, im_end = tool_ids(tok)
    model, chain = calling_model(tok, "calc: 6*7")
    until_end = Sampling(temperature=0, stop_ids=[im_end])
    for seeds in (None, [1, 2]):  # one random stream, or one per prompt
        [[ran], [not_run]] = generate(model, [[100], [100]], 30, until_end, tools=Tools(tok), seeds=seeds, run_tools=[True, False])
        assert ran.tokens == [*chain[1:], res, *tok.encode(result_text("42")), end_res, 200]
        assert not_run.tokens[:len(chain) - 1] == chain[1:] and res not in not_run.tokens


def test_evaluation_runs_tools_only_in_conversations_that_offer_them(tool_tokenizer):
    from picochat.evaluate import chat_replies  # the evaluation's decoding: as a person talks to the model

    tok = tool_tokenizer
    call_id, end_call, res, end_res, im_end = tool_ids(tok)
    chain = [tok.special_id("<|im_sep|>"), call_id, *tok.encode("calc: 6*7"), end_call]
    model = bigram_model(tok, dict(zip(chain, chain[1:])) | {end_res: 200, 200: im_end}, context=128)
    question = [{"role": "user", "content": "6*7?"}]
    offered, plain = chat_replies(model, tok, [with_tools(question), question], 30, tools=Tools(tok))
    assert offered[0].endswith(f"<|tool_result|>{result_text('42')}<|/tool_result|>" + tok.decode([200]))
    assert "<|tool_result|>" not in plain[0] and plain[0].startswith("<|tool_call|>calc: 6*7<|/tool_call|>")


def test_rl_rollouts_run_tools_only_for_problems_that_offer_them(tool_tokenizer):
    from picochat.config import RLConfig
    from picochat.train.rl import prompt_ids, sample_groups

    tok = tool_tokenizer
    call_id, end_call, res, end_res, im_end = tool_ids(tok)
    chain = [tok.special_id("<|im_sep|>"), call_id, *tok.encode("calc: 6*7"), end_call]
    model = bigram_model(tok, dict(zip(chain, chain[1:])) | {end_res: 200, 200: im_end}, context=128)
    problems = [{"prompt": "6*7?", "answer": 42, "system": TOOLS_SYSTEM_PROMPT}, {"prompt": "6*7?", "answer": 42}]
    rollouts = sample_groups(model, tok, prompt_ids(tok, problems), problems, RLConfig(group_size=2, max_new_tokens=30),
                             seeds=[0, 1], reward_fn=lambda text, problem: float("<|tool_result|>" in text), tools=Tools(tok))
    assert rollouts.rewards.tolist() == [[1.0, 1.0], [0.0, 0.0]]  # unasked, a call gets no result
