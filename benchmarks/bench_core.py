"""Speed of the CORE-like suite (`picochat.evals`) against a plain transformers scorer on the same examples.

The model (a run's stage with --run, or a random one of --n-layer/--d-model on the run's tokenizer,
e.g. 12 x 768 for ~100M parameters) is exported with `picochat.hf` and loaded back with
`AutoModelForCausalLM`. Both score the same examples of the same tasks with the same shots:
picochat's suite runs the few-shot prefix once per task and batches the rows after it; the plain
scorer runs, for each example, one padded forward pass over its options, each the whole prompt (what
lm-evaluation-harness does with a batch of an example's requests). Each figure is the median of
--repeats runs, the two scorers taking turns; accuracy is printed for both (they must agree).

    python benchmarks/bench_core.py --run runs/demo --stage base --limit 100
    python benchmarks/bench_core.py --run runs/demo --n-layer 12 --d-model 768 --context 1024 --limit 20 --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from picochat.checkpoint import save_model
from picochat.evals.core import core_task, prompt_prefix
from picochat.evals.models import load_evaluated
from picochat.evals.tasks import DEFAULT_TASKS, pairs, read_task, shots_text, split_shots
from picochat.hf import export_hf
from picochat.model import ModelConfig, Transformer
from picochat.run import Run
from picochat.tokenizer import Tokenizer


def plain_accuracy(hf_model, ev, folder: Path, task, limit: int) -> tuple[float, int]:
    """(accuracy, examples) of a plain scorer: every option's whole prompt through transformers."""
    rows = read_task(folder, task)
    shot_rows, scored = split_shots(rows, task.shots)
    prefix, _ = prompt_prefix(ev, shots_text([rows[i] for i in shot_rows], task))
    correct = examples = 0
    for index in scored[:limit]:
        encoded = [(prefix + ev.encode(c), ev.encode(t)) for c, t in pairs(rows[index], task)]
        if any(len(c) + len(t) > ev.model.config.max_seq_len for c, t in encoded):
            continue
        width = max(len(c) + len(t) for c, t in encoded)
        ids = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for r, (c, t) in enumerate(encoded):
            ids[r, : len(c) + len(t)] = torch.tensor(c + t)
            mask[r, : len(c) + len(t)] = 1
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf_model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        means, greedy = [], []
        for r, (c, t) in enumerate(encoded):
            predicted = logprobs[r, len(c) - 1 : len(c) + len(t) - 1]
            target = torch.tensor(t)
            means.append(float(predicted.gather(1, target[:, None]).mean()))
            greedy.append(bool((predicted.argmax(-1) == target).all()))
        examples += 1
        if task.kind == "language_modeling":
            correct += greedy[0]
        else:
            correct += max(range(len(means)), key=means.__getitem__) == rows[index]["gold"]
    return correct / max(1, examples), examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder (its tokenizer; its stage unless --n-layer)")
    parser.add_argument("--stage", default="base")
    parser.add_argument("--n-layer", type=int, default=None, help="a random model of this depth instead of the stage")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tasks-dir", type=Path, default=Path("../shared/data/eval"))
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "copa", "winogrande"])
    parser.add_argument("--limit", type=int, default=100, help="examples a task")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t for t in DEFAULT_TASKS if t.name in args.tasks]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if args.n_layer:
            tok = Tokenizer.load(Run(args.run).tokenizer)
            config = ModelConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, d_model=args.d_model,
                                 n_head=args.d_model // 128, n_kv_head=args.d_model // 128, max_seq_len=args.context)
            run = Path(tmp) / "run"
            tok.save(run / "tokenizer")
            save_model(run / args.stage, Transformer(config), {"stage": args.stage, "tokenizer": tok.fingerprint})
        export_hf(run, Path(tmp) / "hf", stage=args.stage)
        ev = load_evaluated(run=run, stage=args.stage)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        print(f"model: {ev.model.num_params() / 1e6:.1f}M parameters, {dataclasses.asdict(ev.model.config)}")
        print(f"threads {args.threads}, tasks {', '.join(t.name for t in tasks)}, at most {args.limit} examples each")
        ours, plain = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = [core_task(ev, args.tasks_dir, task, args.limit, progress=False) for task in tasks]
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            baseline = [plain_accuracy(hf_model, ev, args.tasks_dir, task, args.limit) for task in tasks]
            plain.append(time.perf_counter() - start)
        examples = sum(r["examples"] for r in results)
        print("| task | shots | examples | picochat accuracy | plain accuracy |\n| --- | --- | --- | --- | --- |")
        for task, r, (accuracy, n) in zip(tasks, results, baseline):
            print(f"| {task.name} | {r['shots']} | {r['examples']} ({n}) | {r['accuracy']:.3f} | {accuracy:.3f} |")
        a, b = statistics.median(ours), statistics.median(plain)
        print(f"picochat suite: {a:.1f} s, {examples / a:.1f} examples/s; plain transformers: {b:.1f} s, "
              f"{examples / b:.1f} examples/s; speed-up {b / a:.1f}x (medians of {args.repeats}: {ours}, {plain})")


if __name__ == "__main__":
    main()
