"""FSDP2 for models that do not fit in data parallel: shard a Transformer's weights, gradients and
optimizer state over the ranks (`torch.distributed.fsdp.fully_shard`), and gather or restore its full
state for checkpoints, which stay the same files as an unsharded run's (any world size resumes them).

Each decoder layer is its own unit (all-gathered just before it runs, freed after), the embeddings,
final norm and head the root's. Every function here is a collective: all ranks call it.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from picochat.model import Transformer

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: Transformer) -> Transformer:
    """Shard `model` in place over the default process group (its parameters become DTensors)."""
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _param_names(model: Transformer, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the order of a plain state dict's ids)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def _renamed(state: dict, rename) -> dict:
    return {"state": {rename(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [rename(k) for k in g["params"]]} for g in state["param_groups"]]}


def full_states(model: Transformer, optimizers: list) -> tuple[dict, list[dict]]:
    """The unsharded model state dict and optimizer state dicts, on the CPU (complete on rank 0). The
    optimizer states are keyed as `optimizer.state_dict()` keys them (parameter numbers), so an unsharded
    run resumes them too."""
    model.reshard()  # a forward without backward (an evaluation) leaves the root's parameters gathered
    states = []
    for opt in optimizers:
        number = {name: i for i, name in enumerate(_param_names(model, opt))}
        state = get_optimizer_state_dict(model, opt, options=FULL)
        states.append(_renamed(state, number.__getitem__) if state else state)  # empty on ranks other than 0
    return get_model_state_dict(model, options=FULL), states


def load_full_states(model: Transformer, optimizers: list, model_state: dict, optimizer_states: list[dict]) -> None:
    """Load unsharded states (`model.state_dict()`, `optimizer.state_dict()` of any run, read by every
    rank) into the sharded model and optimizers."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    for opt, state in zip(optimizers, optimizer_states, strict=True):
        set_optimizer_state_dict(model, opt, _renamed(state, _param_names(model, opt).__getitem__), options=options)


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a possibly sharded result (e.g. the gradient norm clip_grad_norm_ returns)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
