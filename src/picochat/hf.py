"""The Hugging Face boundary: a picochat run to and from a `Qwen3ForCausalLM` folder, both directions.

picochat's Transformer is Qwen3's layout parameter for parameter, so the weights cross under the
same names either way. What this module maps is written once, each direction beside the other:
the config (`config_to_hf` / `config_from_hf`), the tied output head (`hf_tensors`), and the
special tokens, which must sit at picochat's ids 0..8 on both sides.

Export writes a folder that loads in transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and vLLM
with no custom code (for llama.cpp, `picochat.gguf_export` writes a GGUF file directly):

    config.json              Qwen3Config fields, dtype, bos/eos/pad token ids
    model.safetensors        the weights (with tied embeddings, lm_head.weight is left out, as Qwen3 expects)
    tokenizer.json           the run's tokenizer, unchanged
    tokenizer_config.json    PreTrainedTokenizerFast; bos <|endoftext|>, eos <|im_end|>, pad <|pad|>; chat template
    chat_template.jinja      picochat's chat protocol (`chat.CHAT_TEMPLATE`)
    generation_config.json   stop on <|im_end|> (end of turn) and <|endoftext|>

The folder is assembled under a temporary name beside the destination and renamed into place, so
a crash never leaves a half-written export that looks complete.

Import reads such a folder into a run (`<run>/tokenizer/tokenizer.json` and `<run>/<stage>/`), so
SFT, RL, chat and serving work on it. The folder must hold `config.json`, `tokenizer.json` and the
weights as safetensors (`model.safetensors`, or shards listed in `model.safetensors.index.json`;
pickled `pytorch_model.bin` files are not read). Every parameter name, shape and config field is
checked: what picochat's network cannot reproduce exactly is refused with the reason, never
approximated. Two refusals are by design:
- Llama (`LlamaForCausalLM`): picochat's attention always normalizes queries and keys (RMSNorm per
  head, as Qwen3 does) and Llama has no such norms; an RMSNorm with unit weight is not the identity,
  so no picochat weights reproduce a Llama model.
- Tokenizers without picochat's special tokens at ids 0..8: the chat protocol, the engine and the
  loss masks use those fixed ids. A Qwen3 release tokenizer (`<|im_start|>` at 151644, no
  `<|im_sep|>`) is a different chat format, so remapping ids would give a model that does not speak
  picochat's protocol; such models are refused rather than silently mistrained.

    picochat export --run runs/demo --stage sft --out exports/demo-sft
    picochat import --hf path/to/hf-folder --run runs/imported            # writes tokenizer/ and sft/
    picochat import --hf path/to/hf-folder --run runs/imported --stage base
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from picochat.chat import CHAT_TEMPLATE
from picochat.checkpoint import load_model, save_model, write_safetensors
from picochat.io import atomic_write_bytes, atomic_write_json
from picochat.io import read_json as read_json_file
from picochat.model import ModelConfig, ModelConfigError, Transformer
from picochat.run import STAGES, Run
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, read_tokenizer_file

ARCHITECTURE, MODEL_TYPE = "Qwen3ForCausalLM", "qwen3"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOS_TOKEN = "<|endoftext|>"  # every rendered document and conversation starts with it
EOS_TOKEN = "<|im_end|>"  # the end of an assistant turn: where a chat reply stops
PAD_TOKEN = "<|pad|>"
TOKEN_IDS = {"bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN), "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
             "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN)}
# Defaults of transformers' Qwen3Config, for fields a config.json may leave out.
QWEN3_DEFAULTS = {"head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                  "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ExportError(ValueError):
    """A run that cannot be exported, or a destination that would be overwritten."""


class HFImportError(ValueError):
    """A Hugging Face folder that cannot become a picochat run, with the file and the reason."""


# --- the config: ModelConfig <-> Qwen3Config fields ------------------------------------------------
def config_to_hf(config: ModelConfig) -> dict:
    """The Hugging Face `Qwen3Config` fields (config.json) describing the same network."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
    }


def config_from_hf(config: dict, source: Path) -> ModelConfig:
    """The picochat ModelConfig of a Qwen3 config.json; HFImportError for anything it cannot express."""
    _check_architecture(config, source)
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


def _check_architecture(config: dict, source: Path) -> None:
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if "LlamaForCausalLM" in architectures or model_type == "llama":
        raise HFImportError(
            f"{source}: Llama models are not supported: picochat's attention always applies RMSNorm to queries "
            "and keys (the Qwen3 layout) and Llama has none, so its weights cannot be mapped exactly"
        )
    if architectures != [ARCHITECTURE] and (architectures or model_type != MODEL_TYPE):
        raise HFImportError(
            f"{source}: unsupported architecture {architectures or model_type!r}; "
            f"picochat imports {ARCHITECTURE} (model_type {MODEL_TYPE})"
        )


def _refuse_unless(condition: bool, source: Path, what: str) -> None:
    if not condition:
        raise HFImportError(f"{source}: picochat cannot reproduce {what}")


# --- the weights -----------------------------------------------------------------------------------
def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors as a Qwen3 checkpoint holds them: a tied output head is the embedding, so
    it is not stored (the config says tie_word_embeddings) and a copy in a file is not read, as in HF."""
    tensors = model.state_dict(keep_vars=True)
    if model.config.tie_embeddings:
        del tensors["lm_head.weight"]
    return tensors


# --- export: a run's stage -> a Hugging Face folder ------------------------------------------------
def hf_config(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json of the exported model."""
    return {
        **config_to_hf(config),
        # transformers < 4.56 reads torch_dtype, later versions dtype; both name the weights' dtype.
        "torch_dtype": dtype,
        "dtype": dtype,
        **TOKEN_IDS,
        "use_cache": True,
    }


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json: the fast tokenizer on tokenizer.json, its special tokens and chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,  # the chat template starts with {{ bos_token }}
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        # Plain text encodes as in picochat: nothing added around it (documents get <|endoftext|> explicitly).
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation pads on the left
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, token in enumerate(SPECIAL_TOKENS)
        },
    }


def generation_config() -> dict:
    """generation_config.json: a reply ends at <|im_end|>; a document at <|endoftext|>."""
    return {**TOKEN_IDS, "eos_token_id": [TOKEN_IDS["eos_token_id"], TOKEN_IDS["bos_token_id"]]}


def write_hf_folder(folder: Path, model: Transformer, tok: Tokenizer, dtype: str = "float32") -> None:
    """Write every file of the export into an existing folder."""
    weights = {name: tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
               for name, tensor in hf_tensors(model).items()}
    write_safetensors(folder / "model.safetensors", weights)
    atomic_write_json(folder / "config.json", hf_config(model.config, dtype))
    atomic_write_json(folder / "generation_config.json", generation_config())
    tok.save(folder / "tokenizer.json")
    atomic_write_json(folder / "tokenizer_config.json", tokenizer_config(model.config.max_seq_len))
    atomic_write_bytes(folder / "chat_template.jinja", CHAT_TEMPLATE.encode())


def load_for_export(run_dir: Path, stage: str | None = None) -> tuple[Transformer, Tokenizer, Path]:
    """The model of `<run_dir>/<stage>` (default: the most advanced finished stage), its tokenizer and
    the stage folder, checked to belong together; ExportError naming the file when they do not."""
    run = Run(run_dir)
    stage_dir = run.find_stage(stage)
    model, meta = load_model(stage_dir)
    tok = Tokenizer.load(run.tokenizer)
    trained_with = meta.get("tokenizer")
    if trained_with and trained_with != tok.fingerprint:
        raise ExportError(
            f"{stage_dir / 'model.json'}: the model was trained with tokenizer {trained_with[:12]}, "
            f"but {run.tokenizer} holds {tok.fingerprint[:12]}"
        )
    if tok.vocab_size > model.config.vocab_size:
        raise ExportError(f"{run_dir / 'tokenizer'}: {tok.vocab_size} tokens, more than the "
                          f"{model.config.vocab_size} embeddings of the model in {stage_dir}")
    return model, tok, stage_dir


def export_hf(run_dir: Path, out_dir: Path, stage: str | None = None, dtype: str = "float32", force: bool = False) -> Path:
    """Export `<run_dir>/<stage>` (default: the most advanced finished stage) to `out_dir`; returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)} for a Hugging Face folder, got {dtype!r}"
                          + (" (q8_0 is for --format gguf)" if dtype == "q8_0" else ""))
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    model, tok, _ = load_for_export(run_dir, stage)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        write_hf_folder(staging, model, tok, dtype)
        _open_permissions(staging)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _open_permissions(folder: Path) -> None:
    """Temporary files and folders are private (0600/0700); an export is for others to read, as usual."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder to out_dir; an existing out_dir is replaced only after that succeeds."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
    os.replace(out_dir, retired / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


# --- import: a Hugging Face folder -> a run's stage ------------------------------------------------
def read_json(path: Path) -> dict:
    if not path.exists():
        raise HFImportError(f"{path}: missing; is {path.parent} a Hugging Face model folder?")
    data = read_json_file(path, HFImportError)
    if not isinstance(data, dict):
        raise HFImportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors file(s) holding the weights: model.safetensors or the shards of its index."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFImportError(f"{index}: expected a non-empty 'weight_map' object")
        files = [hf_dir / name for name in sorted(set(map(str, weight_map.values())))]
        outside = [str(path) for path in files if path.resolve().parent != hf_dir.resolve()]
        if outside:
            raise HFImportError(f"{index}: the weight_map must name files in {hf_dir}, not {', '.join(outside[:3])}")
        return files
    hint = " (pickled .bin weights are not read: convert them to safetensors)" if any(hf_dir.glob("*.bin")) else ""
    raise HFImportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")


@torch.no_grad()
def load_hf_weights(model: Transformer, files: list[Path]) -> None:
    """Copy every tensor of the files into the model, checking names and shapes first."""
    targets = hf_tensors(model)
    not_read = model.state_dict().keys() - targets.keys()
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
                if name in not_read:
                    continue
                if name not in targets:
                    raise HFImportError(f"{path}: unexpected tensor {name!r}; a Qwen3 model without biases has "
                                        f"{', '.join(sorted(targets)[:3])}, ...")
                shape, expected = tuple(handle.get_slice(name).get_shape()), tuple(targets[name].shape)
                if shape != expected:
                    raise HFImportError(f"{path}: tensor {name!r} has shape {list(shape)}, "
                                        f"config.json implies {list(expected)}")
                targets[name].copy_(handle.get_tensor(name))
                found[name] = path
    missing = sorted(set(targets) - set(found))
    if missing:
        raise HFImportError(f"{files[0].parent}: the weights lack {len(missing)} tensor(s): {', '.join(missing[:4])}"
                            + (", ..." if len(missing) > 4 else ""))


def load_hf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer.json as a picochat Tokenizer, which refuses one without picochat's special tokens at ids 0..8."""
    if not path.exists():
        raise HFImportError(f"{path}: missing; picochat needs the fast tokenizer file tokenizer.json")
    try:
        hf = read_tokenizer_file(path)
    except ValueError as err:  # it names the file
        raise HFImportError(str(err)) from None
    try:
        return Tokenizer(hf)
    except ValueError as err:
        raise HFImportError(f"{path}: {err}. Only tokenizers trained by picochat (or with the same reserved tokens) "
                            "can be imported") from None


def import_hf(hf_dir: Path, run_dir: Path, stage: str = "sft", force: bool = False) -> Path:
    """Write `<run_dir>/tokenizer/tokenizer.json` and `<run_dir>/<stage>/` from a Hugging Face folder;
    returns the stage folder. Refuses to overwrite a different tokenizer or an existing stage unless force."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if stage not in STAGES:
        raise HFImportError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir}: not a folder (expected a Hugging Face model folder)")
    config = config_from_hf(read_json(hf_dir / "config.json"), hf_dir / "config.json")
    tok = load_hf_tokenizer(hf_dir / "tokenizer.json")
    if tok.vocab_size > config.vocab_size:
        raise HFImportError(f"{hf_dir / 'tokenizer.json'}: {tok.vocab_size} tokens, more than the model's "
                            f"{config.vocab_size} embeddings (config.json vocab_size)")
    tok_path, stage_dir = Run(run_dir).tokenizer / "tokenizer.json", Run(run_dir).stage(stage)
    if not force:
        if tok_path.exists() and Tokenizer.load(tok_path).fingerprint != tok.fingerprint:
            raise HFImportError(f"{tok_path}: the run already has a different tokenizer; import into a new run or pass --force")
        if (stage_dir / "model.json").exists():
            raise HFImportError(f"{stage_dir}: already holds a model; pass --force to replace it")
    model = Transformer(config)
    load_hf_weights(model, weight_files(hf_dir))
    tok.save(tok_path)
    save_model(stage_dir, model, {"stage": stage, "tokenizer": tok.fingerprint,
                                  "imported_from": str(hf_dir.resolve()), "architecture": ARCHITECTURE})
    return stage_dir


# --- CLI: `picochat export` and `picochat import` --------------------------------------------------
def register_export_cli(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export a checkpoint as a Hugging Face Qwen3ForCausalLM folder that transformers and vLLM "
                          "load with no custom code (--format hf), or as one GGUF file that stock llama.cpp, "
                          "Ollama and LM Studio run (--format gguf).")
    parser.add_argument("--run", required=True, help="run folder (holds tokenizer/ and the stages, e.g. runs/demo)")
    parser.add_argument("--stage", default=None, help="base, sft or rl (default: the most advanced finished stage)")
    parser.add_argument("--format", default="hf", choices=("hf", "gguf"),
                        help="hf: a Hugging Face folder (default); gguf: a single .gguf file for llama.cpp")
    parser.add_argument("--out", required=True,
                        help="destination: a folder for hf, a file such as demo.gguf for gguf (must not exist unless --force)")
    parser.add_argument("--dtype", default="float32", choices=[*DTYPES, "q8_0"],
                        help="dtype of the exported weights (default float32, exact; bfloat16 halves the size; "
                             "q8_0, 8-bit blocks, quarters it: gguf only)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.set_defaults(func=_export_cmd)


def register_import_cli(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Import a Hugging Face Qwen3ForCausalLM folder (safetensors weights, and a tokenizer with "
                          "picochat's special tokens at ids 0..8, e.g. one made by `picochat export`) as a run.")
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json, tokenizer.json, *.safetensors)")
    parser.add_argument("--run", required=True, help="run folder to write (tokenizer/ and the stage folder)")
    parser.add_argument("--stage", default="sft", choices=STAGES,
                        help="stage folder the model goes to (default sft: chat/serve use it; `base` to continue with SFT)")
    parser.add_argument("--force", action="store_true", help="replace the run's tokenizer and the stage's model if present")
    parser.set_defaults(func=_import_cmd)


def _export_cmd(args) -> None:
    if args.format == "gguf":
        from picochat.gguf_export import export_gguf  # imports the gguf package only when asked

        out = export_gguf(Path(args.run), Path(args.out), args.stage, args.dtype, args.force)
        print(f"export: {args.run} -> {out} (GGUF, qwen3, {args.dtype}); run it with `llama-server -m {out} --jinja` "
              f"or `llama-cli -m {out} -cnv`")
        return
    out = export_hf(Path(args.run), Path(args.out), args.stage, args.dtype, args.force)
    print(f"export: {args.run} -> {out} (Qwen3ForCausalLM, {args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")


def _import_cmd(args) -> None:
    stage_dir = import_hf(Path(args.hf), Path(args.run), args.stage, args.force)
    print(f"import: {args.hf} -> {stage_dir} (chat with `picochat chat --run {args.run} --stage {args.stage}`)")
