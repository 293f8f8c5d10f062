"""Export a picochat checkpoint to the Hugging Face format (a `Qwen3ForCausalLM` folder).

picochat's Transformer is Qwen3's layout parameter for parameter, so the export is a renaming-free
copy plus the metadata files the ecosystem reads. The folder loads in transformers
(`AutoModelForCausalLM`, `AutoTokenizer`) with no custom code, and in vLLM and llama.cpp's converter:

    config.json              Qwen3Config fields, dtype, bos/eos/pad token ids
    model.safetensors        the weights (with tied embeddings, lm_head.weight is left out, as Qwen3 expects)
    tokenizer.json           the run's tokenizer, unchanged
    tokenizer_config.json    PreTrainedTokenizerFast; bos <|endoftext|>, eos <|im_end|>, pad <|pad|>; chat template
    chat_template.jinja      picochat's chat protocol (`chat.CHAT_TEMPLATE`)
    generation_config.json   stop on <|im_end|> (end of turn) and <|endoftext|>

The folder is assembled under a temporary name beside the destination and renamed into place, so
a crash never leaves a half-written export that looks complete.

    picochat export --run runs/demo --stage sft --out exports/demo-sft
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from picochat.chat import CHAT_TEMPLATE
from picochat.checkpoint import atomic_write_bytes, atomic_write_json, find_stage, load_model
from picochat.model import ModelConfig, Transformer, qwen3_config_dict
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOS_TOKEN = "<|endoftext|>"  # every rendered document and conversation starts with it
EOS_TOKEN = "<|im_end|>"  # the end of an assistant turn: where a chat reply stops
PAD_TOKEN = "<|pad|>"


class ExportError(ValueError):
    """A run that cannot be exported, or a destination that would be overwritten."""


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json of the exported model."""
    return {
        **qwen3_config_dict(config),
        # transformers < 4.56 reads torch_dtype, later versions dtype; both name the weights' dtype.
        "torch_dtype": dtype,
        "dtype": dtype,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
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
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": [SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(BOS_TOKEN)],
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
    }


def hf_state_dict(model: Transformer, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The weights under their (already Qwen3) names; a tied output head is left to the config."""
    state = {name: tensor.detach().to("cpu", DTYPES[dtype]).contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    return state


def write_hf_folder(folder: Path, model: Transformer, tok: Tokenizer, dtype: str = "float32") -> None:
    """Write every file of the export into an existing folder."""
    weights = folder / "model.safetensors"
    save_file(hf_state_dict(model, dtype), str(weights), metadata={"format": "pt"})
    with open(weights, "rb") as f:
        os.fsync(f.fileno())
    atomic_write_json(folder / "config.json", hf_config(model.config, dtype))
    atomic_write_json(folder / "generation_config.json", generation_config())
    tok.save(folder / "tokenizer.json")
    atomic_write_json(folder / "tokenizer_config.json", tokenizer_config(model.config.max_seq_len))
    atomic_write_bytes(folder / "chat_template.jinja", CHAT_TEMPLATE.encode())


def export_hf(run_dir: Path, out_dir: Path, stage: str | None = None, dtype: str = "float32", force: bool = False) -> Path:
    """Export `<run_dir>/<stage>` (default: the most advanced finished stage) to `out_dir`; returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    stage_dir = find_stage(run_dir, stage)
    model, meta = load_model(stage_dir)
    tok = Tokenizer.load(run_dir / "tokenizer")
    trained_with = meta.get("tokenizer")
    if trained_with and trained_with != tok.fingerprint:
        raise ExportError(
            f"{stage_dir / 'model.json'}: the model was trained with tokenizer {trained_with[:12]}, "
            f"but {run_dir / 'tokenizer'} holds {tok.fingerprint[:12]}"
        )
    if tok.vocab_size > model.config.vocab_size:
        raise ExportError(f"{run_dir / 'tokenizer'}: {tok.vocab_size} tokens, more than the "
                          f"{model.config.vocab_size} embeddings of the model in {stage_dir}")
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


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export a checkpoint as a Hugging Face Qwen3ForCausalLM folder that transformers, "
                          "vLLM and llama.cpp's convert_hf_to_gguf.py load with no custom code.")
    parser.add_argument("--run", required=True, help="run folder (holds tokenizer/ and the stages, e.g. runs/demo)")
    parser.add_argument("--stage", default=None, help="base, sft or rl (default: the most advanced finished stage)")
    parser.add_argument("--out", required=True, help="destination folder (must not exist unless --force)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="dtype of the exported weights (default float32, exact; bfloat16 halves the size)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    out = export_hf(Path(args.run), Path(args.out), args.stage, args.dtype, args.force)
    print(f"export: {args.run} -> {out} (Qwen3ForCausalLM, {args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")
