"""Storage settings and run identity, without Ray: what travels to workers, how the run
folder is named, and that a run folder refuses a different training."""

import pickle

import pytest

from conftest import TINY_LLAMA, job_doc, make_job
from finetune_api.spec import parse_job
from finetune_train import launch
from finetune_train.storage import Store, build_once, paths_for

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "store, path_style",
    [
        (Store(), False),  # AWS: virtual-hosted
        (Store(endpoint="http://minio:9000"), True),  # S3-compatible stores: path-style
        (Store(endpoint="http://minio:9000", path_style=False), False),
        (Store(path_style=True), True),
    ],
)
def test_addressing_defaults_to_path_style_only_with_an_endpoint(store, path_style):
    assert store.client.meta.config.s3["addressing_style"] == ("path" if path_style else "virtual")


def test_only_settings_travel_to_other_processes():
    store = Store(endpoint="http://127.0.0.1:9", timeout_seconds=3, max_attempts=2)
    store.client, store.s3  # created and cached here
    copy = pickle.loads(pickle.dumps(store))
    assert copy == store and "client" not in copy.__dict__ and "s3" not in copy.__dict__
    assert copy.client.meta.endpoint_url == "http://127.0.0.1:9"


def test_local_inputs_pass_through_unchanged(tmp_path):
    assert Store().local_copy(str(tmp_path)) == str(tmp_path)
    assert Store().local_copy("org/model") == "org/model"


def test_a_cache_folder_is_built_once_and_never_left_half_built(tmp_path):
    out = tmp_path / "model"
    (tmp_path / "model.0123.tmp").mkdir()  # left by a build that was killed

    def fails(tmp):
        (tmp / "tokenizer.json").parent.mkdir(parents=True)
        (tmp / "tokenizer.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        build_once(out, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lock"]

    calls = []

    def builds(tmp):
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")

    build_once(out, builds)
    build_once(out, builds)
    assert len(calls) == 1 and (out / "config.json").exists()


def test_run_name_carries_the_kubernetes_uid_so_a_recreated_job_starts_afresh(tmp_path):
    doc = job_doc("sft", tmp_path, TINY_LLAMA)
    assert parse_job(doc).run_name == "sft"
    doc["metadata"]["uid"] = "3f2a9c4e-1b2d-4e5f-8a9b-0c1d2e3f4a5b"
    assert parse_job(doc).run_name == "sft-3f2a9c4e"


def test_a_run_folder_refuses_a_different_training(tmp_path):
    job = make_job("same", tmp_path, TINY_LLAMA)
    paths = paths_for(job)
    launch.check_same_run(job, paths)
    launch.check_same_run(job, paths)  # the same spec continues
    resized = make_job("same", tmp_path, TINY_LLAMA, resources={"nodes": 1}, checkpointing={"keep": 5})
    launch.check_same_run(resized, paths)  # mutable fields may change between attempts
    changed = make_job("same", tmp_path, TINY_LLAMA, training={"lr": 0.5})
    with pytest.raises(ValueError, match=r"different spec \(changed: training\).*--restart"):
        launch.check_same_run(changed, paths)


def test_the_same_data_under_another_path_is_the_same_run(tmp_path):
    """A second clone of the repository: same spec, same bytes, another absolute path."""
    job = make_job("clone", tmp_path, TINY_LLAMA)
    paths = paths_for(job)
    launch.check_same_run(job, paths)
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "data.jsonl").write_bytes((tmp_path / "data.jsonl").read_bytes())
    moved = job.model_copy(deep=True)
    moved.spec.dataset.train = str(clone / "data.jsonl")
    launch.check_same_run(moved, paths)
    (clone / "data.jsonl").write_text((tmp_path / "data.jsonl").read_text().replace("cat", "cow"))
    with pytest.raises(ValueError, match=r"changed: dataset"):
        launch.check_same_run(moved, paths)


@pytest.mark.parametrize("stage, training, refused", [(0, {"maxSteps": None, "epochs": 2}, True), (2, {"maxSteps": None, "epochs": 2}, True),
                                                    (0, {"maxSteps": 8}, False), (2, {"maxSteps": 8}, False), (3, {"maxSteps": 8}, False)])
def test_a_resize_that_the_checkpoints_cannot_follow_is_refused_naming_resources(tmp_path, stage, training, refused):
    from finetune_api.status import Progress
    from finetune_train.progress import write_progress

    job = make_job("resize", tmp_path, TINY_LLAMA, deepspeed={"zeroStage": stage}, training=training)  # 2 workers
    paths = paths_for(job)
    launch.check_same_run(job, paths)
    launch.check_same_run(job, paths, workers=1)  # no checkpoint yet: any size
    launch.check_same_run(job, paths)
    write_progress(paths.store, paths.progress, Progress(latest_checkpoint=f"{paths.run}/checkpoint_00000004"))
    if refused:  # an epoch's steps depend on the workers; ZeRO 1-3 resize through the universal format
        with pytest.raises(launch.RunMismatch, match=r"^spec.resources: the checkpoints of run resize were written by 2 workers, and the steps of an epoch"):
            launch.check_same_run(job, paths, workers=1)
    else:
        launch.check_same_run(job, paths, workers=1)
