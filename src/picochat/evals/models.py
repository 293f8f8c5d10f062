"""The model under evaluation: a picochat run's stage, or a Hugging Face folder read in place.

A Hugging Face folder goes through the import's checks (`hf.config_from_hf`, `hf.load_hf_weights`):
Qwen3ForCausalLM only, and an unsupported `model_type` (Llama's included, see `picochat.hf`) is
refused naming it. Its tokenizer.json need not be picochat's: the CORE-like suite and bits per byte
only encode text, so a published Qwen3 model is scored with its own tokenizer (its
`bos_token_id` starts each prompt, as `<|endoftext|>` does picochat's); the chat suite needs
picochat's chat protocol, so it takes only folders whose tokenizer has picochat's special tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from picochat.hf import HFImportError, config_from_hf, load_hf_weights, read_json, weight_files
from picochat.model import Transformer
from picochat.run import Run
from picochat.tokenizer import EOT_ID, Tokenizer, read_tokenizer_file


@dataclass
class Evaluated:
    model: Transformer
    encode: Callable[[str], list[int]]  # plain text to ids, special-token strings as text
    bos: list[int]  # what starts every prompt (empty when the tokenizer has no such token)
    tokenizer: Tokenizer | None  # picochat's, when the model speaks its chat protocol
    name: str
    folder: Path | None  # where results are written by default (a run's stage folder)


def load_stage(run: Path, stage: str | None, device: str = "cpu") -> Evaluated:
    model, tok, stage_dir = Run(run).load(stage, device)
    return Evaluated(model.eval(), tok.encode, [EOT_ID], tok, f"{run}:{stage_dir.name}", stage_dir)


def load_hf(folder: Path, device: str = "cpu") -> Evaluated:
    folder = Path(folder)
    if not folder.is_dir():
        raise HFImportError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    config_json = read_json(folder / "config.json")
    config = config_from_hf(config_json, folder / "config.json")
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise HFImportError(f"{tokenizer_path}: missing; the evaluation needs the fast tokenizer file tokenizer.json")
    hf_tok = read_tokenizer_file(tokenizer_path)
    if hf_tok.get_vocab_size() > config.vocab_size:
        raise HFImportError(f"{tokenizer_path}: {hf_tok.get_vocab_size()} tokens, more than the model's "
                            f"{config.vocab_size} embeddings (config.json vocab_size)")
    model = Transformer(config)
    load_hf_weights(model, weight_files(folder))
    model = model.to(device).eval()
    try:
        tok = Tokenizer(hf_tok)
    except ValueError:  # not picochat's special tokens: fine for scoring text, not for chat
        tok = None
    if tok is not None:
        return Evaluated(model, tok.encode, [EOT_ID], tok, str(folder), None)
    hf_tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, as for picochat
    bos = config_json.get("bos_token_id")
    return Evaluated(model, lambda text: hf_tok.encode(text, add_special_tokens=False).ids,
                     [bos] if isinstance(bos, int) else [], None, str(folder), None)


def load_evaluated(run: Path | None = None, stage: str | None = None, hf: Path | None = None,
                   device: str = "cpu") -> Evaluated:
    """The model of `--run`/`--stage` or of `--hf` (exactly one of run and hf)."""
    if (run is None) == (hf is None):
        raise ValueError("give either --run (a picochat run, with --stage) or --hf (a Hugging Face folder)")
    return load_hf(hf, device) if hf is not None else load_stage(run, stage, device)
