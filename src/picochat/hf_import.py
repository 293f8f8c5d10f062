"""Import a Hugging Face Qwen3 checkpoint as a picochat run, so SFT, RL, chat and serving work on it.

    picochat import --hf path/to/hf-folder --run runs/imported            # writes tokenizer/ and sft/
    picochat import --hf path/to/hf-folder --run runs/imported --stage base

The folder must hold `config.json`, `tokenizer.json` and the weights as safetensors
(`model.safetensors`, or shards listed in `model.safetensors.index.json`; pickled
`pytorch_model.bin` files are not read). Every parameter name, shape and config field is checked:
what picochat's network cannot reproduce exactly is refused with the reason, never approximated.

Two refusals are by design:
- Llama (`LlamaForCausalLM`): picochat's attention always normalizes queries and keys (RMSNorm per
  head, as Qwen3 does) and Llama has no such norms; an RMSNorm with unit weight is not the identity,
  so no picochat weights reproduce a Llama model.
- Tokenizers without picochat's special tokens at ids 0..8: the chat protocol, the engine and the
  loss masks use those fixed ids. A Qwen3 release tokenizer (`<|im_start|>` at 151644, no
  `<|im_sep|>`) is a different chat format, so remapping ids would give a model that does not speak
  picochat's protocol; such models are refused rather than silently mistrained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from picochat.checkpoint import STAGES, save_model
from picochat.model import ModelConfig, ModelConfigError, Transformer
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, read_tokenizer_file

SUPPORTED_ARCHITECTURE = "Qwen3ForCausalLM"
# Defaults of transformers' Qwen3Config, for fields a config.json may leave out.
QWEN3_DEFAULTS = {"head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                  "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class HFImportError(ValueError):
    """A Hugging Face folder that cannot become a picochat run, with the file and the reason."""


def read_json(path: Path) -> dict:
    if not path.exists():
        raise HFImportError(f"{path}: missing; is {path.parent} a Hugging Face model folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HFImportError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise HFImportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def model_config_from_hf(config: dict, source: Path) -> ModelConfig:
    """The picochat ModelConfig of a Qwen3 config.json; HFImportError for anything it cannot express."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if "LlamaForCausalLM" in architectures or model_type == "llama":
        raise HFImportError(
            f"{source}: Llama models are not supported: picochat's attention always applies RMSNorm to queries "
            "and keys (the Qwen3 layout) and Llama has none, so its weights cannot be mapped exactly"
        )
    if architectures != [SUPPORTED_ARCHITECTURE] and (architectures or model_type != "qwen3"):
        raise HFImportError(
            f"{source}: unsupported architecture {architectures or model_type!r}; "
            f"picochat imports {SUPPORTED_ARCHITECTURE} (model_type qwen3)"
        )
    missing = [name for name in REQUIRED_FIELDS if name not in config]
    if missing:
        raise HFImportError(f"{source}: missing field(s) {', '.join(missing)}")
    field = {**QWEN3_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    _refuse_unless(field["hidden_act"] == "silu", source, f"hidden_act {field['hidden_act']!r} (picochat's MLP is SwiGLU: silu)")
    _refuse_unless(not field["attention_bias"], source, "attention_bias true (picochat's projections have no biases)")
    _refuse_unless(not field.get("use_sliding_window", False), source, "use_sliding_window true (picochat attends to the full context)")
    layer_types = set(field.get("layer_types") or ["full_attention"])
    _refuse_unless(layer_types == {"full_attention"}, source, f"layer_types {sorted(layer_types)} (only full_attention)")
    rope = field.get("rope_parameters") or field.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _refuse_unless(rope_type == "default", source, f"rope type {rope_type!r} (picochat has plain RoPE, no scaling)")
    try:
        return ModelConfig(
            vocab_size=field["vocab_size"],
            n_layer=field["num_hidden_layers"],
            d_model=field["hidden_size"],
            n_head=field["num_attention_heads"],
            n_kv_head=field.get("num_key_value_heads", field["num_attention_heads"]),
            head_dim=field["head_dim"],
            ffn_hidden=field["intermediate_size"],
            max_seq_len=field["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", field["rope_theta"])),
            norm_eps=float(field["rms_norm_eps"]),
            tie_embeddings=bool(field["tie_word_embeddings"]),
        )
    except ModelConfigError as err:
        raise HFImportError(f"{source}: {err}") from None


def _refuse_unless(condition: bool, source: Path, what: str) -> None:
    if not condition:
        raise HFImportError(f"{source}: picochat cannot reproduce {what}")


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors file(s) holding the weights: model.safetensors or the shards of its index."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFImportError(f"{index}: expected a non-empty 'weight_map' object")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    hint = " (pickled .bin weights are not read: convert them to safetensors)" if any(hf_dir.glob("*.bin")) else ""
    raise HFImportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")


@torch.no_grad()
def load_hf_weights(model: Transformer, files: list[Path]) -> None:
    """Copy every tensor of the files into the model, checking names and shapes first."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:  # the output head is the embedding; a copy in the file is ignored, as in HF
        del expected["lm_head.weight"]
    targets = dict(model.state_dict(keep_vars=True))
    found: dict[str, Path] = {}
    for path in files:
        if not path.exists():
            raise HFImportError(f"{path}: missing (listed in model.safetensors.index.json)")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types
            raise HFImportError(f"{path}: unreadable safetensors file ({err})") from None
        with handle:
            for name in handle.keys():
                if name == "lm_head.weight" and model.config.tie_embeddings:
                    continue
                if name not in expected:
                    raise HFImportError(f"{path}: unexpected tensor {name!r}; a Qwen3 model without biases has "
                                        f"{', '.join(sorted(expected)[:3])}, ...")
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise HFImportError(f"{path}: tensor {name!r} has shape {list(shape)}, "
                                        f"config.json implies {list(expected[name])}")
                targets[name].copy_(handle.get_tensor(name))
                found[name] = path
    missing = sorted(set(expected) - set(found))
    if missing:
        raise HFImportError(f"{files[0].parent}: the weights lack {len(missing)} tensor(s): {', '.join(missing[:4])}"
                            + (", ..." if len(missing) > 4 else ""))


def load_hf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer.json as a picochat Tokenizer; refused unless picochat's special tokens are at ids 0..8."""
    if not path.exists():
        raise HFImportError(f"{path}: missing; picochat needs the fast tokenizer file tokenizer.json")
    try:
        hf = read_tokenizer_file(path)
    except ValueError as err:
        raise HFImportError(str(err)) from None
    wrong = [f"{token} at {hf.token_to_id(token)}" for token in SPECIAL_TOKENS
             if hf.token_to_id(token) != SPECIAL_TOKENS.index(token)]
    if wrong:
        raise HFImportError(
            f"{path}: picochat's chat protocol needs its special tokens at ids 0..8 "
            f"({', '.join(SPECIAL_TOKENS)}); this tokenizer has {'; '.join(wrong)} (None = absent). "
            "Only tokenizers trained by picochat (or with the same reserved tokens) can be imported"
        )
    return Tokenizer(hf)


def import_hf(hf_dir: Path, run_dir: Path, stage: str = "sft", force: bool = False) -> Path:
    """Write `<run_dir>/tokenizer/tokenizer.json` and `<run_dir>/<stage>/` from a Hugging Face folder;
    returns the stage folder. Refuses to overwrite a different tokenizer or an existing stage unless force."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if stage not in STAGES:
        raise HFImportError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir}: not a folder (expected a Hugging Face model folder)")
    config = model_config_from_hf(read_json(hf_dir / "config.json"), hf_dir / "config.json")
    tok = load_hf_tokenizer(hf_dir / "tokenizer.json")
    if tok.vocab_size > config.vocab_size:
        raise HFImportError(f"{hf_dir / 'tokenizer.json'}: {tok.vocab_size} tokens, more than the model's "
                            f"{config.vocab_size} embeddings (config.json vocab_size)")
    tok_path, stage_dir = run_dir / "tokenizer" / "tokenizer.json", run_dir / stage
    if not force:
        if tok_path.exists() and Tokenizer.load(tok_path).fingerprint != tok.fingerprint:
            raise HFImportError(f"{tok_path}: the run already has a different tokenizer; import into a new run or pass --force")
        if (stage_dir / "model.json").exists():
            raise HFImportError(f"{stage_dir}: already holds a model; pass --force to replace it")
    model = Transformer(config)
    load_hf_weights(model, weight_files(hf_dir))
    tok.save(tok_path)
    save_model(stage_dir, model, {"stage": stage, "tokenizer": tok.fingerprint,
                                  "imported_from": str(hf_dir.resolve()), "architecture": SUPPORTED_ARCHITECTURE})
    return stage_dir


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Import a Hugging Face Qwen3ForCausalLM folder (safetensors weights, and a tokenizer with "
                          "picochat's special tokens at ids 0..8, e.g. one made by `picochat export`) as a run.")
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json, tokenizer.json, *.safetensors)")
    parser.add_argument("--run", required=True, help="run folder to write (tokenizer/ and the stage folder)")
    parser.add_argument("--stage", default="sft", choices=STAGES,
                        help="stage folder the model goes to (default sft: chat/serve use it; `base` to continue with SFT)")
    parser.add_argument("--force", action="store_true", help="replace the run's tokenizer and the stage's model if present")
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    stage_dir = import_hf(Path(args.hf), Path(args.run), args.stage, args.force)
    print(f"import: {args.hf} -> {stage_dir} (chat with `picochat chat --run {args.run} --stage {args.stage}`)")
