"""Driver side: a FineTuneJob → a Ray Train TorchTrainer, and progress.json kept current.

The same function runs under `finetune run` (local Ray) and as the RayJob entrypoint on a
KubeRay cluster; `local` only changes worker placement. Every attempt of a job uses the same
run name and storage path, so Ray Train's checkpoint manager (whose snapshot in storage lists
only fully uploaded checkpoints) hands the latest one to the next attempt.
"""

from __future__ import annotations

import logging
import signal
import threading
import _thread
import time
from dataclasses import dataclass
from pathlib import Path

from finetune_api.spec import FineTuneJob, dump_spec
from finetune_train import preempt
from finetune_train.storage import RunPaths, Store, StorageError, is_s3, join

log = logging.getLogger("finetune.launch")

SPEC = "spec.json"
# Ray Train's controller collects a report when it polls the workers (every 2 s by default) and
# a worker's next report waits until the previous one is collected, so frequent logging would
# throttle training to one step per poll. Every Ray this program runs on is started with this.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(**kwargs) -> None:
    import ray

    ray.init(runtime_env={"env_vars": RAY_ENV}, **kwargs)


def check_inputs(job: FineTuneJob, store: Store) -> list[str]:
    """Field-named problems with the inputs a run reads, found before Ray starts."""
    from finetune_train.modeling import ModelSourceError, resolve_source

    d, problems = job.spec.dataset, []
    for field, value in (("model.source", job.spec.model.source), ("dataset.train", d.train), ("dataset.validation", d.validation)):
        if is_s3(value):
            try:
                if not store.exists(value):
                    problems.append(f"spec.{field}: {value}: no such object or folder")
            except StorageError as err:
                problems.append(f"spec.{field}: {err}")
        elif field.startswith("dataset") and value and not Path(value).is_file():
            problems.append(f"spec.{field}: no such file: {value}")
    if not is_s3(job.spec.model.source):
        try:
            resolve_source(job.spec.model.source)
        except ModelSourceError as err:
            problems.append(f"spec.{err}")
    return problems


def check_same_run(job: FineTuneJob, paths: RunPaths) -> None:
    """A run folder belongs to one training: continuing it with another model, dataset or
    method would mix two trainings in one checkpoint history."""
    spec = dump_spec(job.spec)
    identity = {k: spec[k] for k in job.spec.immutable if k != "storage" and k in spec}
    recorded = paths.store.read_json(join(paths.run, SPEC))
    if recorded is None:
        paths.store.write_json(join(paths.run, SPEC), identity)
    elif recorded != identity:
        changed = sorted(k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k))
        raise ValueError(
            f"{paths.run} holds run {paths.name} of a different spec (changed: {', '.join(changed)}); "
            f"use another metadata.name, or restart the run (finetune run --restart) to discard its checkpoints"
        )


def _progress_callback(paths: RunPaths, keep: int, initial: dict):
    from ray.train import UserCallback

    class ProgressFile(UserCallback):
        """Runs in the Ray Train controller after every report: rewrites progress.json, the
        file `finetune run` draws its progress bar from and the operator mirrors into status.
        A checkpoint appears here only once Ray has registered it, i.e. fully uploaded."""

        def __init__(self):
            self.progress = {"checkpoints": [], "resumes": [], "metrics": {}, **initial, "state": "Running"}
            self.first: tuple[float, int] | None = None  # (time, step) of this run's first report

        def _rate(self, step: int, now: float) -> float | None:
            """Steps per second since this run's first report: the operator's finish estimate."""
            if self.first is None:
                self.first = (now, step)
            t0, s0 = self.first
            return (step - s0) / (now - t0) if step > s0 and now > t0 else None

        def after_report(self, run_context, metrics, checkpoint):
            latest, p = metrics[0], self.progress
            if "resumed_from" in latest:
                p["resumes"].append(
                    {"step": latest["step"], "checkpoint": _uri(paths.storage, latest["resumed_from"]), "at": time.time()}
                )
            else:
                p["metrics"] = {k: v for k, v in latest.items() if k not in ("step", "total_steps")}
            if checkpoint is not None:
                uri = _uri(paths.storage, checkpoint.path)
                entry = {"step": latest["step"], "uri": uri, "eval_loss": latest.get("eval_loss")}
                p["checkpoints"] = ([c for c in p["checkpoints"] if c["uri"] != uri] + [entry])[-keep:]  # what Ray keeps
                p["latest_checkpoint"] = uri
            now = time.time()
            p.update(step=latest["step"], total_steps=latest["total_steps"], updated=now, steps_per_second=self._rate(latest["step"], now))
            try:
                paths.store.write_json(paths.progress, p)
            except StorageError as err:  # status lags behind; training and checkpoints go on
                log.warning("progress.json not written: %s", err)

    return ProgressFile()


def _uri(storage_root: str, fs_path: str) -> str:
    """Ray reports checkpoint paths on its filesystem; users and the operator want URIs."""
    return f"s3://{fs_path}" if is_s3(storage_root) else fs_path


def trainer_for(job: FineTuneJob, paths: RunPaths, workers: int | None = None, local: bool = True,
                callbacks: list | None = None, signal: str | None = None):
    """`callbacks`: Ray Train callbacks to run after the progress.json one (a sweep's trials
    forward their evaluations to Tune through one). `signal`: the preemption signal the
    workers watch, the run's own by default (a sweep's trials share the sweep's)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune_train.recipe import train_loop

    r, c = job.spec.resources, job.spec.checkpointing
    scaling = ScalingConfig(
        num_workers=workers or r.workers,
        use_gpu=r.gpus_per_node > 0,
        resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if r.gpus_per_node else {})},
        # One CPU worker per node on a real cluster; everything on this machine locally.
        placement_strategy="STRICT_SPREAD" if not local and r.gpus_per_node == 0 and r.nodes > 1 else "PACK",
    )
    fs, root = paths.store.filesystem(paths.storage)
    run = RunConfig(
        name=paths.name,
        storage_path=root,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=c.keep),
        failure_config=FailureConfig(max_failures=c.max_failures),
        callbacks=[_progress_callback(paths, c.keep, paths.store.read_json(paths.progress) or {}), *(callbacks or [])],
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": dump_spec(job.spec), "signal": signal or paths.name, "run_uri": paths.run, "output_uri": paths.output},
        scaling_config=scaling,
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


@dataclass
class Outcome:
    state: str  # Succeeded, Preempted or Failed
    progress: dict  # the final progress.json (also when storage could not take it)

    @property
    def error(self) -> str | None:
        return self.progress.get("error")


def run(job: FineTuneJob, paths: RunPaths, workers: int | None = None, local: bool = True) -> Outcome:
    """Train to the end, resuming from the run's latest complete checkpoint if there is one.
    progress.json ends in Succeeded, Preempted or Failed."""
    check_same_run(job, paths)
    from ray.train import TrainingFailedError

    result = error = None
    preemption = Preemption(paths.name, job.spec.checkpointing.grace_period_seconds)
    try:
        with preemption:
            result = trainer_for(job, paths, workers, local).fit()
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
            state = "Preempted" if (result.metrics or {}).get("preempted") else "Succeeded"
        else:
            state = "Preempted" if preemption.requested else "Failed"
        final = finish_progress(paths, state, failure_message(error, paths.storage) if state == "Failed" else None)
    return Outcome(state, final)


def finish_progress(paths: RunPaths, state: str, error: str | None = None) -> dict:
    """Ends the run's progress.json in `state` (with the model's URI on success, `error` if
    given) and returns it; when storage is down, as far as it got."""
    final = {"state": state, "updated": time.time()}
    if state == "Succeeded":
        final["model_uri"] = join(paths.output, "model")
    if error is not None:
        final["error"] = error
    try:
        final = {**(paths.store.read_json(paths.progress) or {}), **final}
        paths.store.write_json(paths.progress, final)
    except StorageError as err:
        log.error("%s: progress.json not updated to %s: %s", paths.name, state, err)
    return final


def failure_message(error: BaseException | None, storage: str) -> str:
    """The first line of the root cause a worker raised; storage errors name the storage."""
    if error is None:
        return "interrupted"
    cause = next(iter(getattr(error, "worker_failures", {}).values()), error)
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"storage error ({storage}): {text}" if isinstance(cause, StorageError) else f"{type(cause).__name__}: {text}"
