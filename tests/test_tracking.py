"""Experiment tracking against a real `mlflow server` on loopback (sqlite backend store, artifacts
in the moto S3 server) and TensorBoard event files read with tensorboard's own reader. Every
run is the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import S3_KEY_ID, S3_SECRET, TINY_LLAMA, free_port, job_doc, wait_serving
from finetune_api.status import Progress
from finetune_train.tracking import flatten
from test_storage import Bucket, Run, wait_for

STEPS = {"maxSteps": 6, "microBatchSize": 4, "lr": 0.01, "logEvery": 1, "evalEvery": 3, "seed": 7}


class MlflowServer:
    """`mlflow server` as a subprocess: runs and the model registry in sqlite, artifacts proxied
    into a bucket of the moto server."""

    def __init__(self, root: Path, s3):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        bucket = s3.bucket(f"mlflow-{self.port}")
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
        self.log = root / "mlflow.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", f"s3://{bucket}/artifacts"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        wait_serving(f"{self.uri}/health", self.proc, self.log, 120)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str):
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3)
    yield server
    server.stop()


def manifest(tmp_path: Path, name: str, tracking: dict, **overrides) -> Path:
    doc = job_doc(name, tmp_path, TINY_LLAMA, **{"training": STEPS, "resources": {"nodes": 1}, **overrides})
    doc["spec"]["tracking"] = tracking
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.unit
def test_the_spec_is_flattened_into_dotted_params():
    doc = {"training": {"lr": 0.001, "earlyStopping": {"patience": 3}}, "method": {"lora": {"targetModules": ["q", "v"]}}}
    assert flatten(doc) == {"training.lr": "0.001", "training.earlyStopping.patience": "3", "method.lora.targetModules": '["q", "v"]'}


@pytest.mark.training
def test_a_run_in_mlflow_and_tensorboard_with_its_model_registered(tmp_path, s3, s3_env, mlflow_server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    bucket = Bucket(s3, "tracked")
    tracking = {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "tracked", "registeredModel": "tiny-llama"},
                "tensorboard": True}
    spec = manifest(tmp_path, "tracked", tracking, storage={"uri": f"s3://{bucket.name}/runs", "endpoint": s3.endpoint})
    tmp = tmp_path / "tmp"  # where the run's processes make temporary files (Ray's own: /tmp/ray as always)
    tmp.mkdir()
    run = Run(spec, {**s3_env, "TMPDIR": str(tmp), "RAY_TMPDIR": "/tmp"})
    assert run.wait() == 0, run.output[-5000:]
    assert f"tensorboard --logdir s3://{bucket.name}/runs/tracked/tensorboard" in run.output
    assert not list(tmp.glob("finetune-tb-*"))  # the events' local copy went with the last upload

    (tracked,) = mlflow_server.runs("tracked")
    client, run_id = mlflow_server.client(), tracked.info.run_id
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "tracked"
    params = tracked.data.params
    assert params["training.lr"] == "0.01" and params["method.type"] == "full" and params["deepspeed.zeroStage"] == "2"
    tags = tracked.data.tags
    assert tags["finetune.job"] == "tracked" and tags["system.workers"] == "1" and tags["system.precision"] == "fp32"
    metrics = bucket.json("runs/tracked/output/metrics.json")
    train = [(p["step"], p["train_loss"]) for p in metrics["train"]]
    assert [s for s, _ in train] == [1, 2, 3, 4, 5, 6]
    logged = history(client, run_id, "train_loss")
    assert [s for s, _ in logged] == [s for s, _ in train]  # every point once, at its step
    assert [v for _, v in logged] == pytest.approx([v for _, v in train])
    assert [s for s, _ in history(client, run_id, "eval_loss")] == [0, 3, 6]
    assert [s for s, _ in history(client, run_id, "lr")] == [1, 2, 3, 4, 5, 6]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "loss.png"}

    (version,) = client.search_model_versions("name='tiny-llama'")
    assert version.run_id == run_id and version.source == f"s3://{bucket.name}/runs/tracked/output/model"
    AutoModelForCausalLM.from_pretrained(bucket.download("runs/tracked/output/model", tmp_path / "registered"))

    events = EventAccumulator(str(bucket.download("runs/tracked/tensorboard", tmp_path / "tb")))
    events.Reload()
    scalars = events.Scalars("train_loss")  # float32 in the event file
    assert [e.step for e in scalars] == [s for s, _ in train]
    assert [e.value for e in scalars] == pytest.approx([v for _, v in train], rel=1e-6)


@pytest.mark.training
def test_a_killed_run_continues_its_mlflow_run_and_repeats_no_step(tmp_path, mlflow_server):
    tracking = {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "resumed"}}
    spec = manifest(tmp_path, "resumed", tracking, training={**STEPS, "maxSteps": 12}, checkpointing={"everySteps": 3})
    env = {**os.environ, "RAY_ADDRESS": "local"}
    progress_file = tmp_path / "runs" / "resumed" / "progress.json"
    progress = lambda: progress_file.exists() and Progress.model_validate_json(progress_file.read_text())  # noqa: E731
    first = Run(spec, env)
    wait_for(lambda: (p := progress()) and p.latest_checkpoint and p.step >= 5, first, what="a checkpoint and step 5")
    first.kill_everything()
    (killed,) = mlflow_server.runs("resumed")
    assert killed.info.status == "RUNNING"  # a lost run stays RUNNING: its next attempt continues it
    again = Run(spec, env)
    assert again.wait() == 0, again.output[-5000:]
    (tracked,) = mlflow_server.runs("resumed")  # still one run
    assert tracked.info.run_id == killed.info.run_id and tracked.info.status == "FINISHED", again.output[-3000:]
    steps = [s for s, _ in history(mlflow_server.client(), tracked.info.run_id, "train_loss")]
    assert steps == list(range(1, 13))


@pytest.mark.training
def test_a_sweep_is_a_parent_run_with_a_nested_run_per_trial(tmp_path, mlflow_server):
    template = job_doc("t", tmp_path, TINY_LLAMA, training={**STEPS, "maxSteps": 4, "evalEvery": 2}, resources={"nodes": 1})["spec"]
    template["tracking"] = {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "swept"}}
    sweep = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "swept"},
             "spec": {"template": template, "searchSpace": {"training.lr": {"choice": [0.01, 0.001]}},
                      "metric": "eval_loss", "mode": "min", "maxTrials": 2, "maxConcurrentTrials": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    run = Run(path, {**os.environ, "RAY_ADDRESS": "local"}, command="sweep")
    assert run.wait() == 0, run.output[-5000:]
    runs = mlflow_server.runs("swept")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(trials) == 2
    progress = Progress.model_validate_json((tmp_path / "runs" / "swept" / "progress.json").read_text())
    assert {t.info.run_name: float(t.data.params["training.lr"]) for t in trials} == {
        t.name: t.params["training.lr"] for t in progress.trials}  # each nested run has its trial's values
    assert all(t.info.status == "FINISHED" and "eval_loss" in t.data.metrics for t in trials)
    assert parent.info.status == "FINISHED" and parent.data.tags["finetune.best_trial"].startswith("swept-trial-")
    assert json.loads(parent.data.params["searchSpace.training.lr.choice"]) == [0.01, 0.001]
    assert parent.data.metrics["best_eval_loss"] == min(t.data.metrics["eval_loss"] for t in trials)


@pytest.mark.training
def test_a_run_whose_tracking_server_stops_succeeds_and_says_why(tmp_path, s3):
    (tmp_path / "own").mkdir()
    server = MlflowServer(tmp_path / "own", s3)  # its own: this test stops it
    tracking = {"mlflow": {"trackingUri": server.uri, "experiment": "lost"}}
    spec = manifest(tmp_path, "lost", tracking, training={**STEPS, "maxSteps": 12})
    progress_file = tmp_path / "runs" / "lost" / "progress.json"
    run = Run(spec, {**os.environ, "RAY_ADDRESS": "local"})
    try:
        wait_for(lambda: progress_file.exists() and (Progress.model_validate_json(progress_file.read_text()).step or 0) >= 2,
                 run, what="step 2")
        logged = server.runs("lost")
    finally:
        server.stop()
    assert logged and "train_loss" in logged[0].data.metrics  # it was tracking until then
    assert run.wait() == 0, run.output[-5000:]
    assert "tracking stopped" in run.output and "training goes on" in run.output
    progress = Progress.model_validate_json(progress_file.read_text())
    assert progress.state == "Succeeded" and progress.step == 12
    assert progress.warning.reason == "TrackingStopped" and "spec.tracking.mlflow.trackingUri" in progress.warning.message
