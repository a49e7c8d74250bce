"""Runs against a real S3 protocol server (moto, over HTTP): inputs from s3://, everything a
run produces in the bucket, and resume after a killed `finetune run`, SIGTERM and a storage
outage. Every run is the real CLI in a subprocess. (A lost worker, resumed by Ray Train from
the latest checkpoint, is the e2e tier's deleted worker pod.)"""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import S3_KEY_ID, S3_SECRET, TINY_BERT, S3Server, job_doc, write_label_data
from finetune_api.status import Progress

pytestmark = pytest.mark.training

MANY_STEPS = {"maxSteps": 30, "microBatchSize": 4, "lr": 0.01, "logEvery": 1, "seed": 7}


class Run:
    """`finetune run SPEC` (or `command`) in its own session, output captured to files."""

    def __init__(self, spec: Path, env: dict, *args: str, command: str = "run"):
        self.log = spec.with_suffix(f".{time.monotonic_ns()}.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_cli.main", command, str(spec), *args],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def kill_everything(self) -> None:
        """What a lost machine or container looks like: every process gone at once."""
        procs = self.processes()
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=60)


class Bucket:
    def __init__(self, server: S3Server, name: str):
        self.client, self.name = server.client(), server.bucket(name)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", ())]

    def json(self, key: str):
        try:
            return json.loads(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())
        except self.client.exceptions.NoSuchKey:
            return None

    def progress(self, run: str) -> Progress | None:
        """<run>/progress.json, as the models read it."""
        doc = self.json(f"{run}/progress.json")
        return None if doc is None else Progress.model_validate(doc)

    def upload(self, local: Path, prefix: str) -> str:
        files = [local] if local.is_file() else [f for f in local.rglob("*") if f.is_file()]
        for f in files:
            key = f"{prefix}/{f.name if local.is_file() else f.relative_to(local)}"
            self.client.upload_file(str(f), self.name, key)
        return f"s3://{self.name}/{prefix}"

    def download(self, prefix: str, dest: Path) -> Path:
        for key in self.keys(prefix + "/"):
            if key.endswith("/"):  # a folder marker
                continue
            target = dest / key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.name, key, str(target))
        return dest


def s3_manifest(tmp_path: Path, server: S3Server, bucket: str, name: str, **overrides) -> Path:
    model = overrides.pop("model", TINY_BERT)
    doc = job_doc(name, tmp_path, model, **{"training": MANY_STEPS, **overrides})
    doc["spec"]["storage"] = {"uri": f"s3://{bucket}/runs", "endpoint": server.endpoint, **overrides.get("storage", {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def wait_for(predicate, run: Run, timeout: float = 300, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert run.proc.poll() is None, f"run exited ({run.proc.returncode}) before {what}:\n{run.output[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{run.output[-3000:]}")


def progress_of(bucket: Bucket, name: str) -> Progress | None:
    return bucket.progress(f"runs/{name}")


def checkpoint_step(uri: str) -> int:
    return int(uri.rstrip("/").rsplit("checkpoint_", 1)[1])


def save_tiny_bert(path: Path) -> Path:
    """A tiny BERT with MiniLM's tokenizer, saved as a Hugging Face folder to upload."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from finetune_train.modeling import resolve_source

    source = resolve_source(TINY_BERT["source"])
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source, **TINY_BERT["config"], num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def test_model_and_data_from_s3_everything_into_the_bucket_no_credentials_anywhere(tmp_path, s3, s3_env):
    bucket = Bucket(s3, "e2e")
    model_uri = bucket.upload(save_tiny_bert(tmp_path / "tiny-bert"), "models/tiny-bert")
    data_uri = bucket.upload(write_label_data(tmp_path / "train.jsonl"), "data")
    spec = s3_manifest(
        tmp_path, s3, bucket.name, "from-s3",
        model={"source": model_uri, "task": "sequence-classification", "labels": ["no", "yes"]},
        dataset={"train": f"{data_uri}/train.jsonl", "validationSplit": 0.25, "maxLength": 24},
        training={**MANY_STEPS, "maxSteps": 8},
        checkpointing={"everySteps": 4},
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        run = Run(spec, {**s3_env, "RAY_TMPDIR": str(ray_tmp)}, "--verbose")
        assert run.wait() == 0, run.output[-5000:]

        keys = bucket.keys("runs/from-s3/")
        assert {k.split("/")[2] for k in keys if "/checkpoint_0" in k} == {"checkpoint_00000004", "checkpoint_00000008"}
        progress = progress_of(bucket, "from-s3")
        assert progress.state == "Succeeded" and progress.step == 8
        assert progress.model_uri == "s3://e2e/runs/from-s3/output/model"
        assert progress.latest_checkpoint == "s3://e2e/runs/from-s3/checkpoint_00000008"
        metrics = bucket.json("runs/from-s3/output/metrics.json")
        assert metrics["steps"] == 8 and "runs/from-s3/output/loss.png" in keys

        from transformers import pipeline

        model_dir = bucket.download("runs/from-s3/output/model", tmp_path / "downloaded")
        assert pipeline("text-classification", model=str(model_dir))("the cat sat")[0]["label"] in ("no", "yes")

        # A bad input names the field; its error output is scanned below too.
        bad = s3_manifest(tmp_path, s3, bucket.name, "bad", dataset={"train": "s3://e2e/data/missing.jsonl"})
        failed = Run(bad, s3_env)
        assert failed.wait() == 2
        assert "spec.dataset.train: s3://e2e/data/missing.jsonl: no such object or folder" in failed.output

        texts = {"run output": run.output, "error output": failed.output, "progress.json": progress.model_dump_json(), "metrics.json": json.dumps(metrics)}
        texts.update({str(f): f.read_text(errors="replace") for f in ray_tmp.rglob("*.log") if f.is_file()})
        texts.update({str(f): f.read_text(errors="replace") for f in ray_tmp.rglob("*.out") if f.is_file()})
        texts.update({str(f): f.read_text(errors="replace") for f in ray_tmp.rglob("*.err") if f.is_file()})
        assert len(texts) > 10  # Ray's logs were found and read
        for where, text in texts.items():
            for secret in (S3_KEY_ID, S3_SECRET):
                assert secret not in text, f"credential found in {where}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_killed_run_resumes_from_the_latest_complete_checkpoint(tmp_path, s3, s3_env):
    bucket = Bucket(s3, "driver-kill")
    spec = s3_manifest(tmp_path, s3, bucket.name, "driver-kill", checkpointing={"everySteps": 5})
    first = Run(spec, s3_env)
    wait_for(lambda: (p := progress_of(bucket, "driver-kill")) and p.latest_checkpoint, first, what="a checkpoint")
    first.kill_everything()
    latest = progress_of(bucket, "driver-kill").latest_checkpoint

    again = Run(spec, s3_env)
    assert again.wait() == 0, again.output[-5000:]
    progress = progress_of(bucket, "driver-kill")
    assert progress.state == "Succeeded" and progress.step == 30
    assert progress.resumes[-1].checkpoint == latest
    assert f"resumed from {latest} at step {checkpoint_step(latest)}" in again.output


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_next_run_resumes_there(tmp_path, s3, s3_env):
    bucket = Bucket(s3, "sigterm")
    spec = s3_manifest(tmp_path, s3, bucket.name, "sigterm", checkpointing={"gracePeriodSeconds": 120})
    run = Run(spec, s3_env)
    seen = wait_for(lambda: (p := progress_of(bucket, "sigterm")) and (p.step or 0) >= 5 and p.step, run, what="step 5")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=180) == 143, run.output[-5000:]
    assert "preempted at step" in run.output

    progress = progress_of(bucket, "sigterm")
    assert progress.state == "Preempted"
    # The only checkpoint is the one SIGTERM asked for (no periodic ones), at the step reached.
    (checkpoint,) = progress.checkpoints
    assert checkpoint.step == progress.step >= seen
    assert progress.latest_checkpoint == checkpoint.uri

    again = Run(spec, s3_env)
    assert again.wait() == 0, again.output[-5000:]
    assert f"resumed from {checkpoint.uri} at step {checkpoint.step}" in again.output
    assert progress_of(bucket, "sigterm").step == 30


def test_storage_outage_fails_clearly_and_keeps_the_last_complete_checkpoint_latest(tmp_path, s3_env):
    server = S3Server(tmp_path / "moto.log")  # its own server: this test freezes it
    try:
        bucket = Bucket(server, "outage")
        spec = s3_manifest(
            tmp_path, server, bucket.name, "outage",
            checkpointing={"everySteps": 3, "maxFailures": 0},
            storage={"timeoutSeconds": 1, "maxAttempts": 2},
        )
        run = Run(spec, s3_env)
        wait_for(lambda: (p := progress_of(bucket, "outage")) and p.latest_checkpoint, run, what="a checkpoint")
        server.pause()
        try:
            code = run.wait(timeout=300)
        finally:
            server.resume()
        assert code == 1, run.output[-5000:]
        assert "outage failed: storage error (s3://outage/runs): " in run.output, run.output[-5000:]

        latest = progress_of(bucket, "outage").latest_checkpoint
        again = Run(spec, s3_env)
        assert again.wait() == 0, again.output[-5000:]
        assert f"resumed from {latest} at step {checkpoint_step(latest)}" in again.output
        assert progress_of(bucket, "outage").state == "Succeeded"
    finally:
        server.stop()
