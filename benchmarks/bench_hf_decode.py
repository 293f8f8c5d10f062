"""Decode speed of picochat's engine against transformers' `generate` on the same exported model.

A model (a run's stage with --run, else a random ~5M-parameter one, the size bench_decode.py uses)
is exported with `picochat.hf`, loaded back with `AutoModelForCausalLM`, and both decode the
same prompts greedily on the CPU in float32 with a KV cache, picochat with a decode step compiled
once (compiled_decode.py; --eager for the engine's own). tokens/s is new tokens (all rows) per second,
prefill included; each figure is the median of --repeats runs after one warm-up (which compiles),
the two engines taking turns. Neither side stops early (no stop ids): both produce batch x
new-tokens tokens.

    python benchmarks/bench_hf_decode.py                          # batch 1 and 8
    python benchmarks/bench_hf_decode.py --run runs/demo --stage sft --threads 2
    python benchmarks/bench_hf_decode.py --eager                  # picochat without compiling
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from bench_decode import add_decode_args, bench_config, decode_with_cache, median_seconds  # benchmarks/ is on sys.path
from compiled_decode import greedy_compiled

from picochat.checkpoint import load_model, save_model
from picochat.run import Run
from picochat.hf import export_hf
from picochat.model import Transformer
from picochat.tokenizer import Tokenizer

BENCH_TEXT = "The capital of Varnia is Oskel. Oskel lies on the river Tam, and 12,345 people live there.\n" * 50


def random_run(folder: Path, max_seq_len: int) -> Path:
    """A run folder with a small tokenizer and a random model of bench_decode.py's shape."""
    tok = Tokenizer.train([BENCH_TEXT], vocab_size=512)
    tok.save(folder / "tokenizer")
    save_model(folder / "sft", Transformer(bench_config(max_seq_len)), {"stage": "sft", "tokenizer": tok.fingerprint})
    return folder


@torch.no_grad()
def transformers_decode(hf_model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    output = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=new_tokens)
    return output[:, prompts.shape[1]:].tolist()


def picochat_decode(model: Transformer, prompts: torch.Tensor, new_tokens: int, eager: bool) -> list[list[int]]:
    if eager:
        return decode_with_cache(model, prompts, new_tokens)
    return greedy_compiled(model, prompts.tolist(), new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="run folder to export (default: a random ~5M-parameter model)")
    parser.add_argument("--stage", default=None, help="stage of --run (default: its most advanced one)")
    parser.add_argument("--eager", action="store_true", help="the engine's eager decode step, not the compiled one")
    add_decode_args(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp) / "run", args.prompt_len + args.new_tokens)
        export_dir = export_hf(run, Path(tmp) / "export", args.stage)
        model, _ = load_model(Run(run).find_stage(args.stage))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    hf_model.generation_config.eos_token_id = None  # decode the full length, as picochat does without stop ids

    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, d_model "
          f"{model.config.d_model}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; "
          f"picochat {'eager' if args.eager else 'compiled'}; "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    print("| batch | picochat tok/s | transformers tok/s | ratio | same tokens |")
    print("|------:|---------------:|-------------------:|------:|:-----------:|")
    for batch in args.batch_sizes:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        results = median_seconds({"picochat": lambda: picochat_decode(model, prompts, args.new_tokens, args.eager),
                                  "transformers": lambda: transformers_decode(hf_model, prompts, args.new_tokens)},
                                 args.repeats)
        (ours_s, ours), (theirs_s, theirs) = results["picochat"], results["transformers"]
        produced = batch * args.new_tokens
        print(f"| {batch:5d} | {produced / ours_s:14.0f} | {produced / theirs_s:18.0f} | "
              f"{theirs_s / ours_s:4.2f}x | {'yes' if ours == theirs else 'no':^11} |")


if __name__ == "__main__":
    main()
