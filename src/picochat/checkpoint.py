"""Checkpoints on disk: a stage's model (safetensors + config) and resumable training state.

Layout of one stage of a run (`runs/<name>/<stage>/`, stage = base | sft | rl | rm | dpo | rlhf):

    model.safetensors, model.json     the stage's result, read by the next stage, chat, serve, export
    checkpoints/step-000200/          periodic training state: model.safetensors, state.pt, meta.json
    checkpoints/LATEST                the name of the newest complete checkpoint folder
    metrics.jsonl                     one JSON line per logged step
    done.json                         written last: the stage is complete (its summary metrics)

Every file is written to a temporary name and renamed into place; a checkpoint folder is assembled
under a temporary name and renamed whole, and LATEST is updated only after that. A kill at any
moment therefore leaves either the previous checkpoint or the new one, never a torn one.
Optimizer and RNG states go through `torch.save` and are read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picochat.io import atomic_write_bytes, atomic_write_json
from picochat.model import ModelConfig, Transformer

class CheckpointError(ValueError):
    """A missing or unreadable checkpoint."""


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically: under a temporary name, fsynced, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_weights(model: Transformer, path: Path, state: dict | None = None) -> None:
    """`state`: the model's full state dict when it is not `model.state_dict()` (a sharded model's, gathered)."""
    # Tied embeddings share storage; safetensors refuses shared tensors, so the tie is stored in the config.
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    write_safetensors(path, state)


def _read_weights(model: Transformer, path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable weights ({e})") from None
    if model.config.tie_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _load_weights(model: Transformer, path: Path) -> None:
    state = _read_weights(model, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# --- a stage's final model ------------------------------------------------------------------------
def save_model(stage_dir: Path, model: Transformer, info: dict | None = None, state: dict | None = None) -> None:
    """`state`: the full state dict of a sharded model (see `picochat.train.sharding.full_states`)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(model, stage_dir / "model.safetensors", state)
    atomic_write_json(stage_dir / "model.json", {"model": model.config.to_dict(), **(info or {})})


def load_model(stage_dir: Path, device: str | torch.device = "cpu",
               build: Callable[[ModelConfig], Transformer] = Transformer) -> tuple[Transformer, dict]:
    """Load `<stage_dir>/model.safetensors`; returns (model in eval mode, model.json contents).
    `build` makes the empty model from its config (the reward model adds its scalar head)."""
    stage_dir = Path(stage_dir)
    meta_path = stage_dir / "model.json"
    if not meta_path.exists():
        raise CheckpointError(f"{stage_dir}: no model here (model.json missing); has this stage been run?")
    meta = json.loads(meta_path.read_text())
    model = build(ModelConfig.from_dict(meta["model"]))
    _load_weights(model, stage_dir / "model.safetensors")
    return model.to(device).eval(), meta


# --- resumable training state ---------------------------------------------------------------------
def save_training_state(stage_dir: Path, step: int, model: Transformer, optimizers: list, extra: dict, keep: int = 2,
                        full: tuple[dict, list[dict]] | None = None) -> Path:
    """Write checkpoints/step-XXXXXX atomically, point LATEST at it, and keep the newest `keep`.
    `full`: (model state, optimizer states) gathered from a sharded model, written in place of its own."""
    ckpt_root = Path(stage_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for left_by_a_kill in ckpt_root.glob(".step-*"):
        shutil.rmtree(left_by_a_kill, ignore_errors=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step-{step:06d}."))
    try:
        _save_weights(model, tmp / "model.safetensors", full[0] if full else None)
        state = {
            "optimizers": full[1] if full else [opt.state_dict() for opt in optimizers],
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        atomic_write_json(tmp / "meta.json", {"step": step, "model": model.config.to_dict(), **extra})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(ckpt_root / "LATEST", final.name.encode())
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(stage_dir: Path) -> Path | None:
    pointer = Path(stage_dir) / "checkpoints" / "LATEST"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load_training_state(ckpt: Path, model: Transformer, optimizers: list, sharded: bool = False) -> dict:
    """Restore weights, optimizer and RNG states from a checkpoint folder; returns its meta.json.
    sharded: the model is sharded with FSDP2 (every rank calls this and reads the files)."""
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    if sharded:
        from picochat.train.sharding import load_full_states

        load_full_states(model, optimizers, _read_weights(model, ckpt / "model.safetensors"), state["optimizers"])
    else:
        _load_weights(model, ckpt / "model.safetensors")
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return json.loads((ckpt / "meta.json").read_text())
