"""Parameter groups and learning rates of the methods (no Ray): discriminative learning rates;
when DeepSpeed may build its shm all-reduce."""

import pytest
import torch

from conftest import TINY_BERT, make_job
from finetune_train.engine import optimizer, param_groups, schedule, shm_allreduce_usable
from finetune_train.modeling import build_model, layout, load_tokenizer, model_folder

pytestmark = pytest.mark.unit


def test_layerwise_lr_decay_gives_each_block_lr_times_decay_to_its_depth(tmp_path):
    job = make_job("lld", tmp_path, TINY_BERT, training={"lr": 0.1, "scheduler": "constant", "layerwiseLrDecay": 0.5})
    spec = job.spec
    path = model_folder(spec)
    model = build_model(spec, path, load_tokenizer(spec, path), pretrained=True)
    parts = layout(model)
    groups = param_groups(model, spec, parts)
    opt = optimizer(groups, spec)
    scheduler = schedule(spec, 10, groups, len(parts.blocks))(opt)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    n = len(parts.blocks)  # 2: the head (above the blocks) and the top block get 0.1, the block under it 0.05, embeddings 0.025
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in parts.top)
    for i, block in enumerate(parts.blocks):
        assert all(lr_of[id(p)] == pytest.approx(0.1 * 0.5 ** (n - 1 - i)) for p in block), i
    assert all(lr_of[id(p)] == pytest.approx(0.1 * 0.5 ** n) for p in parts.embeddings)
    opt.step()
    scheduler.step()  # the schedule keeps the ratios at every step
    assert sorted({round(g["lr"], 6) for g in opt.param_groups}) == [0.025, 0.05, 0.1]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert torch.is_tensor(groups[0]["params"][0])


@pytest.mark.parametrize("local_world, world, compiler, usable", [
    (2, 2, "/usr/bin/c++", True),  # every rank on this host, and a compiler to build the op
    (1, 2, "/usr/bin/c++", False),  # one worker per pod: the ranks are on other hosts
    (1, 1, "/usr/bin/c++", False),  # a single worker has nothing to all-reduce with
    (2, 2, None, False),  # the trainer image has no compiler: building the op would fail the run
])
def test_deepspeeds_shm_allreduce_only_where_ranks_share_a_host_that_can_build_it(local_world, world, compiler, usable):
    assert shm_allreduce_usable(local_world, world, compiler) is usable
