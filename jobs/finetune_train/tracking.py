"""Experiment tracking: MLflow and TensorBoard, fed by the reports a run already makes.

The driver opens a run's tracking before training: it creates the MLflow run (params: the spec
flattened; tags: the job, the system), or continues the one whose id the run folder keeps in
tracking.json. The Ray Train controller's progress callback then hands it every report (train
log points, evaluations) with the optimizer step as the x-axis; a point at or before the last
step already logged for its metric is skipped, so a resumed run repeats no step and the final
report does not repeat the last log point. The driver closes it with the job's end state:
artifacts, a registered model version, FINISHED or FAILED; a preempted run stays RUNNING for
the attempt that continues it. A sweep is a parent run; each trial's run is nested in it.

Tracking never fails training. Each MLflow call is retried with backoff (MLflow's own retries
turned down, so this stays bounded); when it still fails, tracking stops with a warning that
reaches progress.json and, on Kubernetes, the job's status, and training goes on.

TensorBoard event files are written by the controller (one writer, like rank 0) under
`<run>/tensorboard/`: into the folder itself for local storage, uploaded from a local copy
for s3:// storage (every TENSORBOARD_UPLOAD_SECONDS and with the final report, after which the
copy is removed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneJob, TrackingSpec, dump_spec
from finetune_api.status import Problem, State
from finetune_train.storage import RunPaths, StorageError, is_s3, join

log = logging.getLogger("finetune.tracking")

TRACKING = "tracking.json"  # in the run folder: the MLflow run this run continues
ATTEMPTS, BACKOFF_SECONDS = 3, 1.0
TENSORBOARD_UPLOAD_SECONDS = 10.0  # s3:// storage: how often the event files are uploaded
NOT_METRICS = {"step", "total_steps", "best_score"}
ARTIFACTS = ("metrics.json", "loss.png", "confusion.png")  # of the output folder, where there is one
SPEC_SECTIONS = ("model", "dataset", "method", "deepspeed", "resources", "training", "checkpointing", "output")


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """{training.lr: "0.0003", method.lora.r: "16", ...}: MLflow params are strings."""
    if isinstance(doc, dict) and doc:
        return {k: v for key, value in doc.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(doc) if isinstance(doc, list | dict) else str(doc)}


def tensorboard_dir(paths: RunPaths) -> str:
    return join(paths.run, "tensorboard")


class Tracker:
    """One run's tracking. Picklable: it travels to the Ray Train controller inside the
    progress callback; its MLflow client and TensorBoard writer are made where they are used."""

    def __init__(self, spec: TrackingSpec, paths: RunPaths, output: str | None = None):
        self.spec, self.paths = spec, paths
        self.output = output or paths.output  # what close() logs and registers: model/, metrics.json, plots
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # metric → last step logged
        self.stopped: set[str] = set()  # "mlflow", "tensorboard": the sinks that failed for good
        self.problem: Problem | None = None  # why, once one has
        self._client = self._writer = None
        self._uploaded = 0.0

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_writer": None}

    @property
    def mlflow(self) -> bool:
        return self.spec.mlflow is not None and "mlflow" not in self.stopped and self.run_id is not None

    # -- resilience

    def _call(self, what: str, fn, *args, sink: str = "mlflow", **kwargs):
        """fn(*args), retried with backoff; after the last attempt the sink stops (None)."""
        for attempt in range(ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MlflowException, connection errors, storage errors alike
                if attempt + 1 == ATTEMPTS:
                    self.stop(sink, f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    return None
                time.sleep(BACKOFF_SECONDS * 2**attempt)

    def stop(self, sink: str, why: str) -> None:
        self.stopped.add(sink)
        field = "spec.tracking.mlflow.trackingUri" if sink == "mlflow" else "spec.tracking.tensorboard"
        self.problem = Problem(reason="TrackingStopped", message=f"{field}: tracking stopped ({why}); training goes on")
        log.warning("tracking stopped: %s; training goes on", why)

    def client(self):
        if self._client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our backoff, not minutes of MLflow's
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.spec.mlflow.tracking_uri)
        return self._client

    # -- opening: the driver, before training

    @classmethod
    def open(cls, job: FineTuneJob, paths: RunPaths, parent: str | None = None, params: dict | None = None,
             output: str | None = None) -> Tracker | None:
        """The run's tracker (None without spec.tracking): its MLflow run created, or continued
        from tracking.json. `parent`: a sweep's run, for a trial's nested run; `params` and
        `output`: those of a run that is not a job's (a sweep's: its settings, its best/)."""
        t = job.spec.tracking
        if t.mlflow is None and not t.tensorboard:
            return None
        tracker = cls(t, paths, output)
        if t.mlflow is not None:
            tracker._call("starting the MLflow run", tracker._start, job, parent, params)
        return tracker

    def _start(self, job: FineTuneJob, parent: str | None, params: dict | None) -> None:
        from mlflow.entities import Param

        client, m = self.client(), self.spec.mlflow
        recorded = self.paths.store.read_json(join(self.paths.run, TRACKING)) or {}
        if recorded.get("mlflowRunId"):
            run = client.get_run(recorded["mlflowRunId"])
            client.update_run(run.info.run_id, status="RUNNING")
            self.logged = {key: max(p.step for p in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}
            self.run_id = run.info.run_id
            return
        experiment = client.get_experiment_by_name(m.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(m.experiment)
        run = client.create_run(experiment_id, run_name=m.run_name or self.paths.name, tags=self._tags(job, parent))
        spec = dump_spec(job.spec)
        values = params if params is not None else flatten({k: spec[k] for k in SPEC_SECTIONS if k in spec})
        items = [Param(k, v[:6000]) for k, v in values.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            client.log_batch(run.info.run_id, params=items[start:start + 100])
        self.paths.store.write_json(join(self.paths.run, TRACKING), {"mlflowRunId": run.info.run_id})
        self.run_id = run.info.run_id

    def _tags(self, job: FineTuneJob, parent: str | None) -> dict[str, str]:
        from finetune_train.engine import precision

        r, meta = job.spec.resources, job.metadata
        tags = {"finetune.job": meta.name, "finetune.namespace": meta.namespace, "finetune.uid": meta.uid,
                "finetune.image": os.environ.get("FINETUNE_IMAGE"), "finetune.task": job.spec.model.task,
                "system.workers": str(r.workers), "system.gpus": str(r.nodes * r.gpus_per_node),
                "system.precision": precision(job.spec), "system.zero_stage": str(job.spec.deepspeed.zero_stage),
                "mlflow.parentRunId": parent}
        return {k: v for k, v in tags.items() if v}

    # -- logging: the controller, every report

    def log(self, report: dict) -> None:
        step = report.get("step")
        if step is None:
            return
        points = {k: float(v) for k, v in report.items() if k not in NOT_METRICS and _number(v) and step > self.logged.get(k, -1)}
        if points and self.mlflow:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._call("logging metrics", self.client().log_batch, self.run_id,
                       metrics=[Metric(k, v, now, step) for k, v in points.items()])
        last = bool(report.get("exported") or report.get("preempted"))  # the final report: upload what is left
        if (points or last) and self.spec.tensorboard and "tensorboard" not in self.stopped:
            self._call("writing TensorBoard events", self._tensorboard, points, step, last, sink="tensorboard")
        self.logged.update({k: step for k in points})

    def _tensorboard(self, points: dict[str, float], step: int, last: bool) -> None:
        remote = is_s3(self.paths.run)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            folder = tempfile.mkdtemp(prefix="finetune-tb-") if remote else tensorboard_dir(self.paths)
            self._writer = SummaryWriter(log_dir=folder)
        for key, value in points.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()
        if remote and (last or time.monotonic() - self._uploaded > TENSORBOARD_UPLOAD_SECONDS):
            self.paths.store.upload_dir(self._writer.log_dir, tensorboard_dir(self.paths))
            self._uploaded = time.monotonic()
        if last:  # the final report: an s3:// run's local copy is uploaded, and goes
            self._writer.close()
            if remote:
                shutil.rmtree(self._writer.log_dir)
            self._writer = None

    # -- closing: the driver, with the run's end state

    def close(self, state: State, tags: dict[str, str] | None = None, register: bool = True) -> None:
        """Tags, artifacts and the registered model (`register`, when it finished), and the
        run's end: FINISHED or FAILED; a preempted run stays RUNNING (its next attempt
        continues it). Each part retried on its own: a retry never registers twice."""
        if not self.mlflow or state == State.PREEMPTED:
            return
        finished = state in (State.SUCCEEDED, State.EARLY_STOPPED)
        self._call("recording the outcome", self._outcome, finished, tags or {})
        if finished and register and self.spec.mlflow.registered_model and self.mlflow:
            self._call("registering the model", self._register, join(self.output, "model"))
        if self.mlflow:
            self._call("ending the run", self.client().set_terminated, self.run_id, "FINISHED" if finished else "FAILED")

    def _outcome(self, finished: bool, tags: dict[str, str]) -> None:
        from mlflow.entities import Metric

        client, store, output = self.client(), self.paths.store, self.output
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)
        if not finished:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name in ARTIFACTS:
                if store.exists(join(output, name)):
                    local = Path(tmp) / name
                    local.write_bytes(Path(store.local_copy(join(output, name))).read_bytes())
                    client.log_artifact(self.run_id, str(local))
        metrics = store.read_json(join(output, "metrics.json")) or {}
        if metrics.get("test"):  # evaluated once, with the final model: at the last step
            now = int(time.time() * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, metrics.get("steps", 0))
                                                    for k, v in metrics["test"].items() if _number(v)])

    def _register(self, source: str) -> None:
        from mlflow.exceptions import MlflowException

        client, name = self.client(), self.spec.mlflow.registered_model
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source=source, run_id=self.run_id)
        log.warning("registered %s version %s (source %s)", name, version.version, source)

    @classmethod
    def continued(cls, spec: TrackingSpec, paths: RunPaths) -> Tracker | None:
        """The tracker of a run another process opened (a sweep's trial, ended by the sweep's
        driver): its MLflow run from tracking.json, nothing logged from here."""
        if spec.mlflow is None:
            return None
        tracker = cls(spec, paths)
        try:
            tracker.run_id = (paths.store.read_json(join(paths.run, TRACKING)) or {}).get("mlflowRunId")
        except StorageError as err:
            tracker.stop("mlflow", f"reading {TRACKING}: {err}")
        return tracker


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
