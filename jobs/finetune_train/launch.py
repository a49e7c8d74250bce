"""Driver side: a FineTuneJob → a Ray Train TorchTrainer, and progress.json kept current.

The same function runs under `finetune run` (local Ray) and as the RayJob entrypoint on a
KubeRay cluster; `local` only changes worker placement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finetune_api.spec import FineTuneJob, dump_spec
from finetune_train import storage

PROGRESS = "progress.json"


@dataclass(frozen=True)
class RunPaths:
    storage: str  # normalized storage root
    name: str

    @property
    def run(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def progress(self) -> str:
        return storage.join(self.run, PROGRESS)

    @property
    def output(self) -> str:
        return storage.join(self.run, "output")


def paths_for(job: FineTuneJob, storage_uri: str | None = None) -> RunPaths:
    return RunPaths(storage.normalize(storage_uri or job.spec.storage.uri), job.name)


def check_local_inputs(job: FineTuneJob) -> list[str]:
    """Field-named problems with the inputs a local run reads, found before Ray starts."""
    from finetune_train.modeling import ModelSourceError, resolve_source

    d, problems = job.spec.dataset, []
    for field, value in (("train", d.train), ("validation", d.validation)):
        if value and "://" not in value and not Path(value).is_file():
            problems.append(f"spec.dataset.{field}: no such file: {value}")
    try:
        resolve_source(job.spec.model.source)
    except ModelSourceError as err:
        problems.append(f"spec.{err}")
    return problems


def _progress_callback(paths: RunPaths):
    from ray.train import UserCallback

    class ProgressFile(UserCallback):
        """Runs in the Ray Train controller after every report: rewrites progress.json, the
        file `finetune run` draws its progress bar from and the operator mirrors into status."""

        def __init__(self):
            self.checkpoints: list[dict] = []

        def after_report(self, run_context, metrics, checkpoint):
            latest = metrics[0]
            if checkpoint is not None:
                self.checkpoints = [
                    c for c in self.checkpoints if c["uri"] != checkpoint.path
                ][-9:] + [{"step": latest["step"], "uri": checkpoint.path, "eval_loss": latest.get("eval_loss")}]
            storage.write_json(
                paths.progress,
                {
                    "state": "Running",
                    "step": latest["step"],
                    "total_steps": latest["total_steps"],
                    "metrics": {k: v for k, v in latest.items() if k not in ("step", "total_steps")},
                    "latest_checkpoint": self.checkpoints[-1]["uri"] if self.checkpoints else None,
                    "checkpoints": self.checkpoints,
                    "updated": time.time(),
                },
            )

    return ProgressFile()


def trainer_for(job: FineTuneJob, paths: RunPaths, workers: int | None = None, local: bool = True):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune_train.recipe import train_loop

    r = job.spec.resources
    scaling = ScalingConfig(
        num_workers=workers or r.workers,
        use_gpu=r.gpus_per_node > 0,
        resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if r.gpus_per_node else {})},
        # One CPU worker per node on a real cluster; everything on this machine locally.
        placement_strategy="STRICT_SPREAD" if not local and r.gpus_per_node == 0 and r.nodes > 1 else "PACK",
    )
    run = RunConfig(
        name=paths.name,
        storage_path=paths.storage,
        checkpoint_config=CheckpointConfig(num_to_keep=job.spec.checkpointing.keep),
        failure_config=FailureConfig(max_failures=0),
        callbacks=[_progress_callback(paths)],
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": dump_spec(job.spec), "output_uri": paths.output},
        scaling_config=scaling,
        run_config=run,
    )


def run(job: FineTuneJob, paths: RunPaths, workers: int | None = None, local: bool = True):
    """Train to the end (resuming from the run's latest checkpoint if there is one) and
    return Ray Train's Result. progress.json ends in Succeeded or Failed."""
    result = None
    try:
        result = trainer_for(job, paths, workers, local).fit()
    finally:
        progress = storage.read_json(paths.progress) or {}
        progress.update(state="Succeeded" if result is not None and result.error is None else "Failed")
        if progress["state"] == "Succeeded":
            progress["model_uri"] = storage.join(paths.output, "model")
        progress["updated"] = time.time()
        storage.write_json(paths.progress, progress)
    return result
