"""The Transformer: config, Qwen3 layout (checked against transformers), loss, init, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from picochat.hf import config_to_hf
from picochat.model import (
    IGNORE_INDEX,
    KVCache,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    Transformer,
    default_ffn_hidden,
    head_cross_entropy,
)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=48)
    return ModelConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    model = Transformer(tiny_config(**overrides))
    model.init_weights(seed)
    with torch.no_grad():  # norms away from 1, so a mistake in how they apply shows up
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    config = tiny_config()
    assert config.head_dim == 8
    assert config.ffn_hidden == 128  # 8/3 * 32 = 85.3 -> next multiple of 64
    assert default_ffn_hidden(768) == 2048 and default_ffn_hidden(1280) % 64 == 0
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(tiny_config(head_dim=16, tie_embeddings=True).to_dict()).head_dim == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_kv_head=3), "multiple of n_kv_head"),
        (dict(d_model=30), "divisible by n_head"),
        (dict(head_dim=7), "even"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(rope_theta=0), "rope_theta"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ModelConfigError, match=message):
        tiny_config(**overrides)


def test_config_from_dict_names_unknown_and_missing_fields():
    with pytest.raises(ModelConfigError, match="n_layers"):
        ModelConfig.from_dict({**tiny_config().to_dict(), "n_layers": 3})
    with pytest.raises(ModelConfigError, match="incomplete"):
        ModelConfig.from_dict({"vocab_size": 10})
    assert issubclass(ModelConfigError, ValueError) and issubclass(ModelInputError, ValueError)


# --- layout and equivalence with Hugging Face Qwen3 ---------------------------------------------


def test_parameter_names_are_qwen3s():
    model = Transformer(tiny_config(n_layer=1))
    per_layer = [
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.0.{name}.weight" for name in per_layer}
    assert set(model.state_dict()) == expected
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_qwen3(tie):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=1, tie_embeddings=tie, head_dim=16)  # head_dim != d_model / n_head on purpose
    fields = {k: v for k, v in config_to_hf(model.config).items() if k not in ("architectures", "model_type")}
    hf_config = transformers.Qwen3Config(**fields, attn_implementation="eager")
    hf_model = transformers.Qwen3ForCausalLM(hf_config).eval()
    state = model.state_dict()
    if tie:  # the tie lives in the config: the embedding alone must be enough
        state.pop("lm_head.weight")
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    if tie:
        assert torch.equal(hf_model.lm_head.weight, model.lm_head.weight)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_model(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == (3, 40, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# --- loss, size, init --------------------------------------------------------------------------


def test_loss_is_mean_cross_entropy_over_unmasked_targets():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    targets[0, :4] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, targets=targets)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    with torch.no_grad():
        assert model(ids, targets=torch.full_like(targets, IGNORE_INDEX)).item() == 0.0


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tie):
    """Chunks of 7 positions (with checkpointed logits) against cross-entropy over all the float32 logits."""
    model = tiny_model(tie_embeddings=tie).train()
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    targets[1, 5:] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX
    plain = F.cross_entropy(model(ids)[keep], targets[keep])
    expected = grads_of(model, plain)

    hidden = model.model.norm(model.model.embed_tokens(ids))  # any hidden state: the head is what is chunked
    sums = [head_cross_entropy(hidden, model.lm_head, targets, "sum", chunk_rows=rows) for rows in (7, 60)]
    torch.testing.assert_close(sums[0], sums[1])
    per_position = head_cross_entropy(hidden, model.lm_head, targets, "none", chunk_rows=7)
    assert per_position.shape == targets.shape and (per_position[~keep] == 0).all()
    torch.testing.assert_close(per_position.sum(), sums[1])

    import picochat.model as model_module

    old, model_module.LOSS_CHUNK_ELEMENTS = model_module.LOSS_CHUNK_ELEMENTS, 7 * 97  # 7 positions a chunk
    try:
        chunked = model(ids, targets=targets)
        got = grads_of(model, chunked)
        with torch.no_grad():
            none = model(ids, targets=targets, reduction="none")
    finally:
        model_module.LOSS_CHUNK_ELEMENTS = old
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(none.sum() / keep.sum(), plain.detach())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_by_autograd(model, ids) -> tuple[torch.Tensor, int]:
    """The loss, and how many elements autograd keeps for the backward pass."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    return loss, sum(saved)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    expected_loss, kept = saved_by_autograd(model, ids)
    expected = grads_of(model, expected_loss)
    model.checkpoint_layers = True
    loss, kept_checkpointed = saved_by_autograd(model, ids)
    assert kept_checkpointed < kept / 2  # the layers' activations are recomputed, not kept
    got = grads_of(model, loss)
    torch.testing.assert_close(loss, expected_loss)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_logits_to_keep_gives_the_last_positions_only():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=1)
        cache = KVCache(model.config, batch_size=2, max_len=12)
        cached_last = model(ids, kv_cache=cache, logits_to_keep=3)
    assert last.shape == (2, 1, 97) and cached_last.shape == (2, 3, 97)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(cached_last, full[:, -3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelInputError, match="logits_to_keep"):
        model(ids, targets=ids, logits_to_keep=1)
    with pytest.raises(ModelInputError, match="logits_to_keep must be >= 0"):
        model(ids, logits_to_keep=-1)


def test_training_steps_lower_the_loss():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(97), rel=0.1)  # a fresh model is close to uniform
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_and_flops(tie):
    model = Transformer(tiny_config(tie_embeddings=tie))
    d, v, f, kv = 32, 97, 128, 2 * 8
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d + 2 * 8
    assert model.num_params() == 2 * per_layer + d + v * d * (1 if tie else 2)
    matmul_params = 2 * per_layer + d + v * d  # the input embedding is a lookup, not a matmul
    assert model.flops_per_token(48) == 6 * matmul_params + 12 * 2 * 4 * 8 * 48


def test_init_weights_is_seeded_and_scaled():
    a, b = Transformer(tiny_config(n_layer=8)), Transformer(tiny_config(n_layer=8))
    a.init_weights(7)
    b.init_weights(7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.init_weights(8)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    layer = a.model.layers[0]
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.self_attn.q_norm.weight == 1)
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)


def test_bf16_autocast_gives_float32_logits():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model(ids).detach(), atol=0.1, rtol=0.1)


def test_position_beyond_context_is_refused():
    model = tiny_model()
    with pytest.raises(ModelInputError, match="context of 48"):
        model(torch.zeros(1, 49, dtype=torch.long))


# --- KV cache ----------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 1, 5, 3, 3]])
def test_cached_decoding_matches_full_forward(chunks):
    model = tiny_model()
    ids = torch.randint(0, 97, (1, sum(chunks)), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    cache = KVCache(model.config, batch_size=1, max_len=sum(chunks))
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model(ids[:, start:start + size], kv_cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == sum(chunks)


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone():
    model = tiny_model(seed=2)
    rows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 1, 7)]
    width, extra = 9, 6
    continuation = torch.randint(0, 97, (4, extra), generator=torch.Generator().manual_seed(5))
    pads = [width - len(r) for r in rows]
    padded = torch.stack([torch.cat([torch.full((p,), 3), r]) for p, r in zip(pads, rows)])
    cache = KVCache(model.config, batch_size=4, max_len=width + extra, pad_lengths=pads)
    assert cache.positions(width).tolist()[1] == [0] * 5 + [0, 1, 2, 3]  # each row counts from its first token
    prefill = model(padded, kv_cache=cache)
    steps = [model(continuation[:, i:i + 1], kv_cache=cache) for i in range(extra)]
    for b, row in enumerate(rows):
        alone = model(torch.cat([row, continuation[b]])[None])[0]
        torch.testing.assert_close(prefill[b, pads[b]:], alone[:len(row)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([s[b] for s in steps]), alone[len(row):], atol=1e-5, rtol=1e-5)
    assert cache.positions(1)[:, 0].tolist() == [len(row) + extra for row in rows]


@torch.no_grad()
def test_one_prefill_expanded_to_several_rows():
    model = tiny_model(seed=3)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    cache = KVCache(model.config, batch_size=1, max_len=8)
    model(prompt, kv_cache=cache)
    cache.select_rows([0, 0, 0])
    next_tokens = torch.tensor([[5], [50], [90]])
    step = model(next_tokens, kv_cache=cache)
    for b in range(3):
        alone = model(torch.cat([prompt[0], next_tokens[b]])[None])[0, -1]
        torch.testing.assert_close(step[b, 0], alone, atol=1e-5, rtol=1e-5)
    cache.select_rows([2])  # a finished row leaves; the others carry on
    last = model(torch.tensor([[7]]), kv_cache=cache)
    alone = model(torch.cat([prompt[0], next_tokens[2], torch.tensor([7])])[None])[0, -1]
    torch.testing.assert_close(last[0, 0], alone, atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_row_mismatch_are_refused():
    model = tiny_model()
    cache = KVCache(model.config, batch_size=1, max_len=4)
    with pytest.raises(ModelInputError, match="4 slots"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ModelInputError, match="1 rows"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
