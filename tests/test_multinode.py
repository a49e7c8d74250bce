"""Two real Ray nodes on one machine (ray.cluster_utils.Cluster): one training worker on each,
or two (workersPerNode: 2, as with 2 GPUs per node)."""

import threading
from pathlib import Path

import pytest

from conftest import TINY_LLAMA, make_job
from finetune_api.status import Progress
from finetune_train import launch, preempt
from finetune_train.storage import paths_for

pytestmark = pytest.mark.training


@pytest.fixture
def two_nodes(request):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=getattr(request, "param", 1)) for _ in range(2)]
    launch.init_ray(address=cluster.address)
    yield [n.node_id for n in nodes]
    ray.shutdown()
    cluster.shutdown()


def watch_placement(seen: dict, stop: threading.Event, workers: int = 2) -> None:
    """Records the training workers' placement group while it exists (Ray removes it after)."""
    import ray

    while not stop.wait(0.2):
        for pg in ray.util.placement_group_table().values():
            if len(pg["bundles"]) == workers and pg["bundles_to_node_id"]:
                seen.update(strategy=pg["strategy"], nodes=sorted(pg["bundles_to_node_id"].values()))


def run_watched(job, paths, workers: int):
    """launch.run on the cluster, and where its `workers` were placed (watch_placement's record)."""
    seen, stop = {}, threading.Event()
    watcher = threading.Thread(target=watch_placement, args=(seen, stop, workers))
    watcher.start()
    try:
        return launch.run(job, paths, local=False), seen
    finally:
        stop.set()
        watcher.join()


def test_one_worker_per_node_trains_and_checkpoints(two_nodes, tmp_path):
    job = make_job("multinode", tmp_path, TINY_LLAMA, deepspeed={"zeroStage": 2}, checkpointing={"everySteps": 3})
    paths = paths_for(job)
    result, seen = run_watched(job, paths, 2)
    assert result.error is None, result.error
    assert seen == {"strategy": "STRICT_SPREAD", "nodes": sorted(two_nodes)}
    progress = Progress.model_validate_json(Path(paths.progress).read_text())
    assert progress.state == "Succeeded" and progress.step == 6
    assert [c.step for c in progress.checkpoints] == [3, 6]
    assert all(Path(c.uri, "state").is_dir() for c in progress.checkpoints)


@pytest.mark.parametrize("two_nodes", [2], indirect=True)
def test_two_workers_on_each_of_two_nodes_train(two_nodes, tmp_path):
    """4 workers, 2 per node: local ranks 0 and 1 on each node (DeepSpeed's per-node choices
    follow them), one data-parallel group of 4."""
    job = make_job("twobytwo", tmp_path, TINY_LLAMA, resources={"nodes": 2, "workersPerNode": 2}, deepspeed={"zeroStage": 2})
    assert job.spec.resources.workers == 4
    paths = paths_for(job)
    result, seen = run_watched(job, paths, 4)
    assert result.error is None, result.error
    assert sorted(seen["nodes"]) == sorted([two_nodes[0]] * 2 + [two_nodes[1]] * 2), seen
    assert result.state == "Succeeded" and result.step == 6


def test_the_preemption_signal_lives_on_the_drivers_node(two_nodes):
    """Not on a worker node, whose loss would take it along: a run that lost a worker in the
    e2e tier then ignored its suspension."""
    import ray
    from ray._private.state import actors

    signal = preempt.create("placed")
    ray.get(signal.requested.remote())
    placed = actors(signal._actor_id.hex())["Address"]["NodeID"]
    assert placed == ray.get_runtime_context().get_node_id() and placed not in two_nodes
