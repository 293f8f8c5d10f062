"""The GGUF boundary: a picochat run as one `.gguf` file that stock llama.cpp, Ollama and LM Studio run.

GGUF is llama.cpp's single-file format: the architecture's settings, the tokenizer and the tensors.
picochat's network is Qwen3's parameter for parameter, so the file declares the `qwen3`
architecture and the weights go under llama.cpp's names for Qwen3 (the `gguf` package's own map
from Hugging Face names). The tokenizer travels whole: the byte-level vocabulary, the merges, token
types (the special tokens are control tokens), BOS `<|endoftext|>`, EOS and end-of-turn
`<|im_end|>`, and the chat template. llama.cpp does not run a tokenizer's regex from the file: it
applies the split it knows by the name in `tokenizer.ggml.pre`. picochat splits text with GPT-2's
pattern, which llama.cpp knows as `gpt-2`, so a tokenizer with any other split is refused.

    picochat export --format gguf --run runs/demo --stage sft --out demo.gguf [--dtype q8_0]

The weights are written as float32, float16, bfloat16 or q8_0 (8-bit blocks of 32 with a scale;
vectors such as the norms stay float32, as llama.cpp's converter keeps them). The file is written
under a temporary name in the destination folder and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from picochat.chat import CHAT_TEMPLATE
from picochat.hf import ExportError, hf_tensors, load_for_export
from picochat.io import atomic_path
from picochat.model import Transformer
from picochat.tokenizer import (
    EOT_ID,
    GGUF_PRE_TOKENIZER,
    IM_END_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
)

ARCHITECTURE = gguf.MODEL_ARCH.QWEN3
Q = gguf.GGMLQuantizationType
# dtype name -> (type of matrices, file type); vectors stay float32.
GGUF_DTYPES = {
    "float32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "float16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bfloat16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def check_tokenizer(tok: Tokenizer, where: Path) -> None:
    """ExportError unless llama.cpp reproduces this tokenizer: byte-level BPE split by SPLIT_PATTERN."""
    spec = tok.as_json()
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    patterns = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if patterns != [SPLIT_PATTERN] or len(byte_level) != 1 or byte_level[0].get("use_regex") or len(steps) != 2:
        split = patterns[0] if len(patterns) == 1 else f"{pre.get('type', 'no')} pre-tokenizer"
        raise ExportError(
            f"{where}: this tokenizer splits text with {split!r}; llama.cpp applies only the splits it knows by "
            f"name, and picochat's ({GGUF_PRE_TOKENIZER!r}) is {SPLIT_PATTERN!r}. Retrain the run with this "
            "version of picochat (tokenizer and model), or export it with --format hf")
    if spec.get("normalizer") or spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{where}: only a byte-level BPE tokenizer with no normalizer (picochat's) can be written as GGUF")


def vocabulary(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as GGUF stores them; rows past the tokenizer are unused padding."""
    spec = tok.as_json()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for piece, i in spec["model"]["vocab"].items():
        tokens[i], types[i] = piece, gguf.TokenType.NORMAL
    for i, special in enumerate(SPECIAL_TOKENS):
        tokens[i], types[i] = special, gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path: Path, model: Transformer, tok: Tokenizer, dtype: str = "float32", name: str = "picochat") -> None:
    """Write the model and tokenizer to `path` (not atomic: see export_gguf)."""
    config = model.config
    matrix_type, file_type = GGUF_DTYPES[dtype]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHITECTURE])
    writer.add_name(name)
    writer.add_file_type(file_type)
    if matrix_type == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)

    tokens, types, merges = vocabulary(tok, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_eot_token_id(IM_END_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)  # the chat template writes it; plain text encodes as in picochat
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(ARCHITECTURE, config.n_layer)
    for hf_name, tensor in hf_tensors(model).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name} of a qwen3 model")
        data = tensor.detach().to("cpu").float().numpy()
        writer.add_tensor(gguf_name, *_encoded(data, matrix_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encoded(data: np.ndarray, matrix_type: Q) -> tuple[np.ndarray, None, Q | None]:
    """(array, raw shape, raw type) for GGUFWriter.add_tensor: vectors and rows that do not fill q8_0's
    blocks of 32 stay float32, as in llama.cpp's converter. Encoded arrays carry their own shape
    (bytes per row for q8_0), from which the writer derives the tensor's."""
    if data.ndim < 2 or matrix_type == Q.F32:
        return data, None, None
    if matrix_type == Q.F16:
        return data.astype(np.float16), None, None
    if matrix_type == Q.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return data, None, None
    return gguf.quants.quantize(data, matrix_type), None, matrix_type


def export_gguf(run_dir: Path, out_path: Path, stage: str | None = None, dtype: str = "float32", force: bool = False) -> Path:
    """Export `<run_dir>/<stage>` (default: the most advanced finished stage) to the GGUF file `out_path`."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"a GGUF export's dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if out_path.exists() and not force:
        raise ExportError(f"{out_path}: already exists; choose another --out or pass --force to replace it")
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a folder; a GGUF export is one file (e.g. --out {out_path}/model.gguf)")
    model, tok, stage_dir = load_for_export(run_dir, stage)
    check_tokenizer(tok, run_dir / "tokenizer" / "tokenizer.json")
    with atomic_path(out_path) as tmp:
        write_gguf(tmp, model, tok, dtype, name=f"picochat {run_dir.name} {stage_dir.name}")
    return out_path
