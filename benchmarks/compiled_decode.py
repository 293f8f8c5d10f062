"""Greedy decoding with a fixed-shape step compiled once by torch.compile: the fast CPU path
bench_hf_decode.py measures (the engine decodes eagerly; BENCHMARKS.md has the figures).

A small model's eager decode step on a CPU is mostly Python and dispatch overhead, which
torch.compile removes only when shapes never change. So every row decodes exactly
max_new_tokens tokens (no stop ids) and the cache keeps all its slots, read through a mask of
those written so far. Inductor freezes the weights into the compiled code: a model must not
change after its first compiled call (compile a copy instead).

    python benchmarks/compiled_decode.py        # checks it gives the engine's greedy tokens
"""

from __future__ import annotations

import functools

import torch

from picochat.engine import Sampling, generate
from picochat.model import KVCache, ModelConfig, Transformer

# Freezing folds the weights into the compiled code as constants, prepacked for the matmul kernels
# max_autotune picks; cpp_wrapper calls the kernels from C++ rather than Python. Patched around each
# call rather than passed as torch.compile options: dynamo must see `freezing` while tracing to
# guard on the parameters' identity, so that another model gets its own compiled step.
_COMPILE_CONFIG = {"freezing": True, "max_autotune": True, "cpp_wrapper": True}


def _static_step(model: Transformer, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 slot: torch.Tensor, pad_lengths: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) of one decode step whose tensor shapes never change.

    tokens (B, 1) go into slot `slot` (a 0-d tensor, so that its value is no guard to recompile on)
    of each layer's keys and values (B, n_kv_head, S, head_dim), separate tensors written in place
    (inductor copies a view of one cache tensor whole at every write); attention reads all S slots
    through a mask of the real ones written so far.
    """
    key_slots = torch.arange(keys[0].shape[2], device=tokens.device)
    mask = ((key_slots <= slot) & (key_slots >= pad_lengths[:, None]))[:, None, None, :]
    positions = (slot - pad_lengths)[:, None]
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rope_cos[positions].to(x.dtype), model.rope_sin[positions].to(x.dtype)
    for layer, layer_keys, layer_values in zip(model.model.layers, keys, values):
        def write(k, v, layer_keys=layer_keys, layer_values=layer_values):
            layer_keys.index_copy_(2, slot.view(1), k)
            layer_values.index_copy_(2, slot.view(1), v)
            return layer_keys, layer_values

        x = layer(x, cos, sin, mask, write)
    return model.lm_head(model.model.norm(x))[:, -1].float()


@functools.cache
def _compiled_static_step():
    return torch.compile(_static_step, dynamic=False)


@torch.no_grad()
def greedy_compiled(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """max_new_tokens greedy tokens for each prompt: an eager prefill (left-padded), then the
    compiled step, compiled once per batch size and cache size."""
    device = model.lm_head.weight.device
    width = max(len(p) for p in prompts)
    if width + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"{width} prompt tokens + {max_new_tokens} new ones exceed the model's context "
                         f"({model.config.max_seq_len})")
    pad_lengths = [width - len(p) for p in prompts]
    cache = KVCache(model.config, len(prompts), width + max_new_tokens, device=device,
                    dtype=model.lm_head.weight.dtype, pad_lengths=pad_lengths)
    padded = torch.tensor([[0] * pad + list(p) for pad, p in zip(pad_lengths, prompts)], device=device)
    tokens = model(padded, kv_cache=cache, logits_to_keep=1)[:, -1].argmax(dim=-1, keepdim=True)
    keys, values = [layer.clone() for layer in cache.keys], [layer.clone() for layer in cache.values]
    slot = torch.tensor(cache.length, device=device)
    generated = [tokens]
    for _ in range(max_new_tokens - 1):
        with torch._inductor.config.patch(_COMPILE_CONFIG):
            logits = _compiled_static_step()(model, tokens, keys, values, slot, cache.pad_lengths)
        slot += 1
        tokens = logits.argmax(dim=-1, keepdim=True)
        generated.append(tokens)
    return torch.cat(generated, dim=1).tolist()


def main() -> None:
    """The compiled step's tokens against the engine's, on a small random model and prompts of
    different lengths (left padding)."""
    model = Transformer(ModelConfig(vocab_size=101, n_layer=2, d_model=48, n_head=4, n_kv_head=2, max_seq_len=40))
    model.init_weights(seed=11)
    with torch.no_grad():  # sharp next-token distributions, so greedy has no near-ties
        model.lm_head.weight.mul_(40)
    model.eval()
    prompts = [[5, 17, 33, 2, 9, 60, 1], [42, 7], [88], [3, 14, 15, 92]]
    eager = [completion.tokens for [completion] in generate(model, prompts, 10, Sampling(temperature=0))]
    compiled = greedy_compiled(model, prompts, 10)
    print(f"compiled step gives the engine's greedy tokens: {'yes' if compiled == eager else 'NO'}")


if __name__ == "__main__":
    main()
