"""Driver side: a FineTuneJob → a Ray Train TorchTrainer, and progress.json kept current.

The same function runs under `finetune run` (local Ray) and as the RayJob entrypoint on a
KubeRay cluster; `local` only changes worker placement. Every attempt of a job uses the same
run name and storage path, so Ray Train's checkpoint manager (whose snapshot in storage lists
only fully uploaded checkpoints) hands the latest one to the next attempt.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import _thread
import time
from pathlib import Path

from finetune_api.spec import FineTuneJob, dump_spec
from finetune_api.status import INVALID_INPUT, CheckpointRecord, Problem, Progress, ResumeRecord, State
from finetune_train import preempt
from finetune_train.data import file_digest
from finetune_train.progress import HEARTBEAT_SECONDS, Reporter, Target, read_progress, write_progress
from finetune_train.storage import RunPaths, Store, StorageError, is_s3, join
from finetune_train.tracking import Tracker

log = logging.getLogger("finetune.launch")

SPEC = "spec.json"
LAYOUT = "layout"  # in spec.json: how many workers the run's checkpoints were written by
# Ray Train's controller collects a report when it polls the workers (every 2 s by default) and
# a worker's next report waits until the previous one is collected, so frequent logging would
# throttle training to one step per poll. Every Ray this program runs on is started with this.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(**kwargs) -> None:
    import ray

    ray.init(runtime_env={"env_vars": RAY_ENV}, **kwargs)


def check_inputs(job: FineTuneJob, store: Store) -> list[str]:
    """Field-named problems with the inputs a run reads, found before any worker starts (by
    `finetune run` and by the RayJob entrypoint alike): nothing a retry could fix. Storage
    that is unwell (not wrong) raises StorageError instead: a later attempt may succeed."""
    from finetune_train.data import DataError, check_file
    from finetune_train.modeling import ModelSourceError, resolve_source, weights_file

    d, m, problems = job.spec.dataset, job.spec.model, []
    image = m.task == "image-classification"

    def refused(field: str, err: StorageError) -> None:
        if not err.permanent:
            raise err
        problems.append(f"spec.{field}: {err}")

    if is_s3(job.spec.storage.uri):  # a missing bucket or refused credentials show here
        try:
            store.exists(job.spec.storage.uri)
        except StorageError as err:
            refused("storage.uri", err)
    reference = job.spec.training.preference and job.spec.training.preference.reference_model
    models = (("model.source", m.source), ("training.preference.referenceModel", reference))
    inputs = (*models, ("dataset.train", d.train), ("dataset.validation", d.validation), ("dataset.test", d.test))
    for field, value in inputs:
        if is_s3(value):
            try:
                if not store.exists(value):
                    problems.append(f"spec.{field}: {value}: no such object or folder")
            except StorageError as err:
                refused(field, err)
        elif field.startswith("dataset") and value and not (Path(value).is_file() or image and Path(value).is_dir()):
            problems.append(f"spec.{field}: no such file: {value}")
    for field, value in models:
        if value and not is_s3(value):
            try:
                source = resolve_source(value)
                if m.architecture:
                    weights_file(source)
            except ModelSourceError as err:
                problems.append(f"spec.{field}{str(err).removeprefix('model.source')}")
    if m.architecture:
        import timm

        if not timm.is_model(m.architecture):
            problems.append(f"spec.model.architecture: timm has no architecture {m.architecture!r} (timm.list_models() names them)")
    if not problems:  # the rows themselves, numbered as in the files: columns, labels, chat structure, images
        try:
            for split, path in (("train", d.train), ("validation", d.validation), ("test", d.test)):
                if path and image:
                    from finetune_train.images import check_images, image_table

                    check_images(image_table(store.local_copy(path), split, job.spec))
                elif path:
                    check_file(store.local_copy(path), split, job.spec)
        except DataError as err:
            problems.append(f"spec.{err}")
    return problems


class RunMismatch(ValueError):
    """The run folder's history cannot be continued by this spec: nothing a retry fixes."""


def check_same_run(job: FineTuneJob, paths: RunPaths, workers: int | None = None) -> None:
    """A run folder belongs to one training: continuing it with another model, dataset or
    method would mix two trainings in one checkpoint history. Data files count by content, so
    the same data under another path (a second clone of the repository) is the same run.

    The number of workers may change (resources is mutable): ZeRO 1-3 checkpoints are read
    through DeepSpeed's universal format then (engine.load_checkpoint). Not with
    training.epochs: a step is a share of an epoch that depends on the workers, so the step
    reached, the LR schedule and the steps left would not agree. That resume is refused,
    naming spec.resources."""
    spec = dump_spec(job.spec)
    named = {k: spec[k] for k in job.spec.immutable if k != "storage" and k in spec}
    identity = json.loads(json.dumps(named))
    for key in ("train", "validation", "test"):
        if key in identity["dataset"]:
            identity["dataset"][key] = "sha256:" + file_digest(paths.store.local_copy(identity["dataset"][key]))
    recorded = paths.store.read_json(join(paths.run, SPEC))
    layout = recorded.pop(LAYOUT, None) if recorded else None
    workers = workers or job.spec.resources.workers
    if recorded is not None and recorded not in (identity, named):  # named: recorded by an older version, by path
        changed = sorted(k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k))
        raise RunMismatch(
            f"{paths.run} holds run {paths.name} of a different spec (changed: {', '.join(changed)}); "
            f"use another metadata.name, or restart the run (finetune run --restart) to discard its checkpoints"
        )
    checkpointed = (read_progress(paths.store, paths.progress) or Progress()).latest_checkpoint
    if layout and layout["workers"] != workers and checkpointed and not job.spec.training.max_steps:
        raise RunMismatch(
            f"spec.resources: the checkpoints of run {paths.name} were written by {layout['workers']} workers, and the steps "
            f"of an epoch depend on the workers (training.maxSteps fixes the steps: then a run can resize), so {workers} "
            f"workers cannot continue them; give the job {layout['workers']} workers (nodes × gpusPerNode, or × workersPerNode "
            f"on CPU) or restart the run (--restart)"
        )
    paths.store.write_json(join(paths.run, SPEC), {**identity, LAYOUT: {"workers": workers}})


def _progress_callback(paths: RunPaths, keep: int, initial: Progress, target: Target | None, tracker: Tracker | None):
    from ray.train import UserCallback

    class ProgressFile(UserCallback):
        """Runs in the Ray Train controller after every report: rewrites progress.json and, on
        Kubernetes, pushes the same to the operator; hands the report to the tracker (MLflow,
        TensorBoard). A checkpoint appears here only once Ray has registered it, i.e. fully
        uploaded."""

        def __init__(self):
            self.progress = initial.model_copy(update={"state": State.RUNNING, "error": None, "reason": None})
            self.first: tuple[float, int] | None = None  # (time, step) of this run's first report
            self.reporter: Reporter | None = None  # started in the controller, where this runs

        def _rate(self, step: int, now: float) -> float | None:
            """Steps per second since this run's first report: the operator's finish estimate."""
            if self.first is None:
                self.first = (now, step)
            t0, s0 = self.first
            return (step - s0) / (now - t0) if step > s0 and now > t0 else None

        def after_report(self, run_context, metrics, checkpoint):
            latest, p = metrics[0], self.progress
            if "resumed_from" in latest:
                p.resumes.append(ResumeRecord(step=latest["step"], checkpoint=_uri(paths.storage, latest["resumed_from"]), at=time.time()))
            else:
                p.metrics = {k: v for k, v in latest.items() if k not in ("step", "total_steps") and _number(v)}
            if checkpoint is not None:
                uri = _uri(paths.storage, checkpoint.path)
                entry = CheckpointRecord(step=latest["step"], uri=uri, eval_loss=latest.get("eval_loss"))
                p.checkpoints = ([c for c in p.checkpoints if c.uri != uri] + [entry])[-keep:]  # what Ray keeps
                p.latest_checkpoint = uri
            now = time.time()
            p.step, p.total_steps, p.updated = latest["step"], latest["total_steps"], now
            p.steps_per_second = self._rate(latest["step"], now)
            if tracker is not None:
                tracker.log(latest)
            try:
                p.warning = tracker and tracker.problem
                write_progress(paths.store, paths.progress, p)
            except StorageError as err:  # training and checkpoints go on; the status says why it lags
                log.warning("progress.json not written: %s", err)
                p.warning = Problem(reason="StorageUnreachable", message=f"spec.storage.uri: progress.json not written: {err}")
            if target is not None:
                self.reporter = self.reporter or Reporter(target)
                self.reporter.report(p.model_copy(deep=True))

    return ProgressFile()


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _uri(storage_root: str, fs_path: str) -> str:
    """Ray reports checkpoint paths on its filesystem; users and the operator want URIs."""
    return f"s3://{fs_path}" if is_s3(storage_root) else fs_path


def scaling_config(job: FineTuneJob, workers: int | None = None, local: bool = True):
    """The Ray Train workers of the job: how many, and what each holds."""
    from ray.train import ScalingConfig

    r = job.spec.resources
    return ScalingConfig(
        num_workers=workers or r.workers,
        use_gpu=r.gpus_per_node > 0,
        resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if r.gpus_per_node else {})},
        # One CPU worker per node on a real cluster (each pod is sized for its workers: several
        # per node pack, one per GPU or workersPerNode); everything on this machine locally.
        placement_strategy="STRICT_SPREAD" if not local and r.per_node == 1 and r.nodes > 1 else "PACK",
    )


def trainer_for(job: FineTuneJob, paths: RunPaths, workers: int | None = None, local: bool = True,
                callbacks: list | None = None, signal: str | None = None, target: Target | None = None,
                tracker: Tracker | None = None):
    """`callbacks`: Ray Train callbacks to run after the progress.json one (a sweep's trials
    forward their evaluations to Tune through one). `signal`: the preemption signal the
    workers watch, the run's own by default (a sweep's trials share the sweep's). `target`:
    where the reports are pushed besides progress.json (a job's on Kubernetes; not a trial's).
    `tracker`: the run's opened tracking, fed every report."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from finetune_train.recipe import train_loop

    c = job.spec.checkpointing
    fs, root = paths.store.filesystem(paths.storage)
    run = RunConfig(
        name=paths.name,
        storage_path=root,
        storage_filesystem=fs,
        # restoreBest: Ray keeps the best-scoring checkpoints (the recipe scores a best
        # evaluation's by its metric, others lowest) besides the latest it always keeps.
        checkpoint_config=CheckpointConfig(num_to_keep=c.keep, **(
            {"checkpoint_score_attribute": "best_score", "checkpoint_score_order": "max"}
            if job.spec.training.early_stopping and job.spec.training.early_stopping.restore_best else {})),
        failure_config=FailureConfig(max_failures=c.max_failures),
        callbacks=[_progress_callback(paths, c.keep, read_progress(paths.store, paths.progress) or Progress(), target, tracker),
                   *(callbacks or [])],
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": dump_spec(job.spec), "signal": signal or paths.name, "run_uri": paths.run, "output_uri": paths.output},
        scaling_config=scaling_config(job, workers, local),
        run_config=run,
    )


class Preemption:
    """SIGTERM during fit(): ask the workers watching the signal `name` to checkpoint and stop;
    if they have not finished within the grace period, interrupt fit() (the checkpoint before
    stays latest)."""

    def __init__(self, name: str, grace_seconds: int):
        self.name, self.grace, self.requested = name, grace_seconds, False
        self.deadline = threading.Timer(grace_seconds, _thread.interrupt_main)

    def __enter__(self):
        self.signal = preempt.create(self.name)
        # Python delivers signals to the main thread only; a run started elsewhere keeps the
        # process's handler.
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            return
        self.requested = True
        log.warning("SIGTERM: saving a checkpoint at the current step (grace period %ds)", self.grace)
        self.signal.request.remote("SIGTERM")
        self.deadline.start()

    def __exit__(self, *exc):
        self.deadline.cancel()
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def run(job: FineTuneJob, paths: RunPaths, workers: int | None = None, local: bool = True, target: Target | None = None) -> Progress:
    """Train to the end, resuming from the run's latest complete checkpoint if there is one.
    Returns the final progress (also in progress.json, and pushed to `target`): Succeeded,
    Preempted or Failed. While it runs, the driver pings `target` (see progress.py)."""
    check_same_run(job, paths, workers)
    from ray.train import TrainingFailedError

    result = error = None
    preemption = Preemption(paths.name, job.spec.checkpointing.grace_period_seconds)
    reporter = Reporter(target, heartbeat=HEARTBEAT_SECONDS) if target else None
    tracker = Tracker.open(job, paths)
    try:
        with preemption:
            result = trainer_for(job, paths, workers, local, target=target, tracker=tracker).fit()
    except TrainingFailedError as err:
        error = err
    except KeyboardInterrupt:  # the grace period ran out
        if not preemption.requested:
            raise
    except Exception as err:
        error = err
        raise
    finally:
        if result is not None:
            state = State.PREEMPTED if (result.metrics or {}).get("preempted") else State.SUCCEEDED
        else:
            state = State.PREEMPTED if preemption.requested else State.FAILED
        message, reason = failure(error, paths.storage) if state == State.FAILED else (None, None)
        if tracker is not None:
            tracker.close(state)
        final = finish_progress(paths, state, message, reason, reporter, tracker and tracker.problem)
    return final


def refuse(paths: RunPaths, problems: list[str], target: Target | None) -> Progress:
    """A run that cannot start (input problems): Failed, reason InvalidInput, at once."""
    return finish_progress(paths, State.FAILED, "; ".join(problems), INVALID_INPUT, Reporter(target) if target else None)


def finish_progress(paths: RunPaths, state: State, error: str | None = None, reason: str | None = None,
                    reporter: Reporter | None = None, warning: Problem | None = None) -> Progress:
    """Ends the run's progress.json in `state` (with the model's URI on success, `error`,
    `reason` and `warning` if given), delivers it through `reporter` and returns it; when
    storage is down, as far as it got."""
    final = Progress(state=state, updated=time.time(), error=error, reason=reason, warning=warning)
    try:
        final = (read_progress(paths.store, paths.progress) or final).model_copy(
            update={"state": state, "updated": final.updated, "error": error, "reason": reason, "warning": warning})
        if state == State.SUCCEEDED:
            final.model_uri = join(paths.output, "model")
        write_progress(paths.store, paths.progress, final)
    except StorageError as err:
        log.error("%s: progress.json not updated to %s: %s", paths.name, state, err)
        final.warning = Problem(reason="StorageUnreachable", message=f"spec.storage.uri: progress.json not written: {err}")
    if reporter is not None:
        reporter.close(final)
    return final


def failure(error: BaseException | None, storage: str) -> tuple[str, str]:
    """(message, reason) of a failed run: the first line of the root cause a worker raised;
    storage errors name the storage."""
    if error is None:
        return "interrupted", "Interrupted"
    cause = next(iter(getattr(error, "worker_failures", {}).values()), error)
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(cause, StorageError):
        return f"storage error ({storage}): {text}", "StorageError"
    return f"{type(cause).__name__}: {text}", "TrainingFailed"
