"""The decoder-only Transformer and its KV cache.

The layout is Hugging Face Qwen3's, parameter for parameter, so a picochat state dict loads into
`transformers.Qwen3ForCausalLM` without renaming: pre-norm RMSNorm (computed in float32, then the
weight multiplies), rotary embeddings in the half-split (`rotate_half`) convention, grouped-query
attention through `F.scaled_dot_product_attention`, RMSNorm on each head's queries and keys before
RoPE, a SwiGLU MLP, no biases, optionally tied input/output embeddings.

`KVCache` holds keys and values for incremental decoding. It serves a batch of left-padded prompts
of different lengths (each row's RoPE positions start at 0 on its first real token, and padding is
never attended to), and can repeat or drop rows after prefill (`select_rows`), so one prompt
prefilled once can be sampled N times.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets equal to this are not trained (the SFT/RL loss-mask convention)
# Float32 logits computed at once by the loss: 2**25 (128 MiB) is 16k positions at a 2k vocabulary
# (the cpu preset's whole micro-batch: one chunk, the plain loss) and 512 at 64k.
LOSS_CHUNK_ELEMENTS = 2**25


class ModelConfigError(ValueError):
    """A model configuration that cannot build a Transformer."""


class ModelInputError(ValueError):
    """Input the model cannot take: beyond its context, more than the KV cache holds, or a batch
    that does not match the cache's rows."""


def default_ffn_hidden(d_model: int) -> int:
    """SwiGLU hidden width: 8/3 * d_model rounded up to a multiple of 64.

    Three matrices of width 8/3*d hold as many parameters (and cost as many FLOPs) as the classic
    two-matrix MLP of width 4*d, which is the LLaMA convention; a multiple of 64 keeps matmuls on
    efficient tile sizes.
    """
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class ModelConfig:
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int | None = None  # None -> d_model // n_head
    ffn_hidden: int | None = None  # None -> default_ffn_hidden(d_model)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ModelConfigError(
                f"ModelConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}) "
                "for grouped-query attention"
            )
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ModelConfigError(
                    f"ModelConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) "
                    "when head_dim is not given"
                )
            self.head_dim = self.d_model // self.n_head
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 2:
            raise ModelConfigError(f"ModelConfig.head_dim must be an integer >= 2, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ModelConfigError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.ffn_hidden is None:
            self.ffn_hidden = default_ffn_hidden(self.d_model)
        if isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 1:
            raise ModelConfigError(f"ModelConfig.ffn_hidden must be a positive integer, got {self.ffn_hidden!r}")
        if not self.rope_theta > 0:
            raise ModelConfigError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ModelConfigError(f"ModelConfig.norm_eps must be positive, got {self.norm_eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"unknown ModelConfig field(s) {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as err:  # a required field is missing
            raise ModelConfigError(f"incomplete ModelConfig {data}: {err}") from None


class RMSNorm(nn.Module):
    """Normalizes in float32, casts back, then scales by the weight (as Qwen3RMSNorm does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # the same arithmetic in one call (decode is overhead-bound)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), computed in float32 the way HF does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    angles = torch.arange(config.max_seq_len, dtype=torch.float)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache_writer):
        """x (B, T, d); cos/sin (B, T, head_dim); mask: None (plain causal) or bool (B, 1, T, S)."""
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache_writer is not None:
            k, v = cache_writer(k, v)
        gqa = self.n_head != self.n_kv_head
        if mask is None:
            # Without a cache, or decoding one token with no padding: causal == attend to everything seen.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache_writer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_writer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer for up to `max_len` slots per row.

    Rows are left-padded: row b's first `pad_lengths[b]` slots hold padding, which is never
    attended to, and the token in slot s has RoPE position s - pad_lengths[b]. All rows advance
    together, one slot per token fed to the model.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32, pad_lengths: list[int] | torch.Tensor | None = None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        if pad_lengths is None:
            pad_lengths = [0] * batch_size
        self.pad_lengths = torch.as_tensor(pad_lengths, dtype=torch.long, device=device)
        if self.pad_lengths.shape != (batch_size,):
            raise ModelInputError(
                f"pad_lengths must hold one count per row ({batch_size}), got shape {tuple(self.pad_lengths.shape)}"
            )
        self._note_padding()
        self.length = 0  # slots filled so far, the same for every row

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def positions(self, num_new: int) -> torch.Tensor:
        """RoPE positions (B, num_new) of the next tokens; padding slots get 0."""
        slots = torch.arange(self.length, self.length + num_new, device=self.pad_lengths.device)
        return (slots[None, :] - self.pad_lengths[:, None]).clamp(min=0)

    def attention_mask(self, num_new: int) -> torch.Tensor | None:
        """Which slots each new token may attend to, (B, 1, num_new, length + num_new), or None
        when plain causal attention is exact (no padding, and either a fresh cache or one token)."""
        if not self.has_padding and (self.length == 0 or num_new == 1):
            return None
        device = self.pad_lengths.device
        query_slots = torch.arange(self.length, self.length + num_new, device=device)
        key_slots = torch.arange(self.length + num_new, device=device)
        causal = key_slots[None, :] <= query_slots[:, None]
        real_key = key_slots[None, :] >= self.pad_lengths[:, None]
        # A padding query attends to itself only, so no softmax row is empty (that would give NaN).
        itself = key_slots[None, :] == query_slots[:, None]
        return ((causal[None] & real_key[:, None, :]) | itself[None])[:, None]

    def layer_writer(self, layer: int, start: int):
        """A function that stores one layer's new keys/values at `start` and returns all so far."""

        def write(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            end = start + k.shape[2]
            self.keys[layer, :, :, start:end] = k
            self.values[layer, :, :, start:end] = v
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

        return write

    def select_rows(self, rows: list[int] | torch.Tensor) -> None:
        """Keep only these rows, in this order; repeating a row copies it (one prefill, N samples)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.keys.device)
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)
        self.pad_lengths = self.pad_lengths.index_select(0, index.to(self.pad_lengths.device))
        self._note_padding()

    def _note_padding(self) -> None:
        # Kept as Python values so that forward needs no device sync to read them.
        self.has_padding = bool(self.pad_lengths.any())
        self.min_pad = int(self.pad_lengths.min()) if len(self.pad_lengths) else 0

    def last_position(self, num_new: int) -> int:
        """The largest RoPE position among the next num_new tokens of any row."""
        return self.length + num_new - 1 - self.min_pad


def head_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, reduction: str = "sum",
                       chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` (float32 logits) against `targets`, never holding the logits of
    more than `chunk_rows` positions (default LOSS_CHUNK_ELEMENTS // vocab).

    hidden (..., d), targets (...). reduction "sum" (over positions whose target is not IGNORE_INDEX)
    or "none" (a loss per position, 0 where ignored, shaped like targets). With more positions than a
    chunk, each chunk's logits are recomputed in the backward pass (activation checkpointing) instead
    of being kept: the memory of a full-vocabulary logits tensor (17 GB in float32 for 32 x 2,048
    positions at 65,536) becomes one chunk's, for one more head matmul forward. The result is the plain
    loss's, summed in another order.
    """
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // head.out_features)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, ignore_index=IGNORE_INDEX, reduction=reduction)

    if len(flat_targets) <= rows:
        losses = piece(flat_hidden, flat_targets)
    else:
        grad = torch.is_grad_enabled()
        parts = [checkpoint(piece, flat_hidden[i : i + rows], flat_targets[i : i + rows], use_reentrant=False) if grad
                 else piece(flat_hidden[i : i + rows], flat_targets[i : i + rows])
                 for i in range(0, len(flat_targets), rows)]
        losses = torch.cat(parts) if reduction == "none" else torch.stack(parts).sum()
    return losses.view(targets.shape) if reduction == "none" else losses


class Transformer(nn.Module):
    """The language model: token ids in, next-token logits (or the training loss) out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layer))
        self.model.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Recompute each layer's activations in the backward pass instead of keeping them (training only):
        # activation memory becomes one layer's plus the layer inputs, for about a third more compute.
        self.checkpoint_layers = False
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights(seed=0)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, 0.02) matrices; the projections that write into the residual stream (o_proj,
        down_proj) scaled by 1/sqrt(2*n_layer) so the residual variance does not grow with depth;
        norms at 1. Drawn on the CPU, so the same seed gives the same weights on any device.
        A model built on the meta device is left alone; call this again after `to_empty`."""
        if self.lm_head.weight.is_meta:
            return
        cos, sin = rope_tables(self.config)  # recomputed too, for models built on the meta device
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            param.copy_(torch.randn(param.shape, generator=generator) * std)

    def num_params(self) -> int:
        """Parameters, counting tied embeddings once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at this sequence length.

        6 * N for the weight matmuls, N being the parameters that take part in a matmul (all but
        the input embedding table, which is a lookup; with tied embeddings the shared matrix counts
        once, as the output head), plus 12 * n_layer * (n_head * head_dim) * seq_len for the
        attention scores and weighted sum (2 matmuls * 2 FLOPs per multiply-add * 3 for fwd+bwd),
        counted over the full context as in the PaLM/nanoGPT convention (causal masking halves the
        real work, which this ignores).
        """
        cfg = self.config
        matmul_params = self.num_params()
        if not cfg.tie_embeddings:
            matmul_params -= self.model.embed_tokens.weight.numel()
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
        return 6 * matmul_params + attention

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, positions: torch.Tensor | None = None, logits_to_keep: int = 0,
                reduction: str = "mean"):
        """input_ids (B, T). Returns float32 logits (B, T, V), or, with targets (B, T), the mean
        cross-entropy over positions whose target is not IGNORE_INDEX (0 if there are none), or with
        reduction="none" the loss of every position (B, T), 0 where ignored; the loss is computed in
        chunks of positions (`head_cross_entropy`), never from all logits at once.
        logits_to_keep > 0 computes logits for the last that many positions only (B, logits_to_keep, V):
        a prefill needs just the last one, and the output head is the largest matmul.

        With a kv_cache the tokens go into the next T slots of every row and attend to all real
        tokens before them; positions then default to the cache's per-row positions. Without one,
        attention is plainly causal and positions default to 0..T-1. positions may be given as
        (T,) or (B, T).
        """
        batch, seq = input_ids.shape
        if logits_to_keep < 0:
            raise ModelInputError(f"logits_to_keep must be >= 0 (0: every position), got {logits_to_keep}")
        if logits_to_keep and targets is not None:
            raise ModelInputError("logits_to_keep is for inference; a loss needs the logits of every position")
        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            if kv_cache.batch_size != batch:
                raise ModelInputError(f"KV cache has {kv_cache.batch_size} rows, input has {batch}")
            if start + seq > kv_cache.max_len:
                raise ModelInputError(
                    f"KV cache holds {kv_cache.max_len} slots; {start} are used and {seq} more do not fit"
                )
        if positions is None:
            last_position = kv_cache.last_position(seq) if kv_cache is not None else seq - 1
            if last_position >= self.config.max_seq_len:
                raise ModelInputError(
                    f"position {last_position} is beyond the model's context of {self.config.max_seq_len} tokens"
                )
            positions = kv_cache.positions(seq) if kv_cache is not None else torch.arange(seq, device=input_ids.device)
        positions = positions.expand(batch, seq)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)
        mask = kv_cache.attention_mask(seq) if kv_cache is not None else None
        recompute = self.checkpoint_layers and kv_cache is None and torch.is_grad_enabled()
        for index, layer in enumerate(self.model.layers):
            writer = kv_cache.layer_writer(index, start) if kv_cache is not None else None
            x = checkpoint(layer, x, cos, sin, mask, writer, use_reentrant=False) if recompute else layer(x, cos, sin, mask, writer)
        if kv_cache is not None:
            kv_cache.length = start + seq
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if targets is None:
            return self.lm_head(self.model.norm(x)).float()
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be mean or none, not {reduction!r}")
        losses = head_cross_entropy(self.model.norm(x), self.lm_head, targets, "none" if reduction == "none" else "sum")
        if reduction == "none":
            return losses
        return losses / (targets != IGNORE_INDEX).sum().clamp(min=1)
