"""What a run reports and what the operator writes, typed once.

`Progress` is what a run (a FineTuneJob's, a sweep's or a sweep trial's) reports: the training
program writes it to `<run>/progress.json` (what `finetune run` draws its progress bar from and
a resumed run continues) and, on Kubernetes, pushes it to the operator. `JobStatus` and
`SweepStatus` are the `.status` of the two kinds; the CRD's status schema is generated from
them like the spec's. `State` is the one set of states of jobs, sweeps, trials and runs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from finetune_api.spec import Model


class State(StrEnum):
    PENDING = "Pending"  # the RayJob is being created, or waits for something outside the spec
    INITIALIZING = "Initializing"  # the Ray cluster is starting
    RUNNING = "Running"
    SUSPENDED = "Suspended"  # a job's Ray cluster stopped by spec.suspend (or a queue)
    PREEMPTED = "Preempted"  # a run that checkpointed on SIGTERM; running it again continues it
    SUCCEEDED = "Succeeded"
    EARLY_STOPPED = "EarlyStopped"  # a sweep trial ASHA stopped
    FAILED = "Failed"


DONE = (State.SUCCEEDED, State.EARLY_STOPPED, State.FAILED)  # a trial or run that will not run again
FINAL = (State.SUCCEEDED, State.FAILED)  # the end of a job or sweep

# Why a run failed, when it is the input's fault: nothing a retry can fix.
INVALID_INPUT = "InvalidInput"

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Reported(Model):
    """What the operator and older files may add or drop: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class Problem(Reported, frozen=True):
    """Something wrong outside the spec (a missing Secret, unreachable storage, a pod that
    cannot start): the reason a condition gives, and a message naming what to fix."""

    reason: str
    message: str


# ---- Progress: what a run reports


class CheckpointRecord(Reported):
    step: int
    uri: str
    eval_loss: float | None = None


class ResumeRecord(Reported):
    step: int
    checkpoint: str
    at: float | None = None


class TrialRecord(Reported):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    state: State = State.PENDING
    step: int = 0
    total_steps: int | None = None
    metric: float | None = None
    error: str | None = None


class BestTrial(Reported):
    name: str = Field(description="The trial's name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its values of the search space.")
    metric: float | None = Field(default=None, description="Its final evaluation of the sweep's metric.")


class Progress(Reported):
    """A run's progress. Unset fields are unknown (a sweep has no step, a run that has not
    reported yet no metrics)."""

    kind: Literal["job", "sweep"] = "job"
    state: State = State.RUNNING
    updated: float = Field(default=0.0, description="Unix time of the report; a later report wins.")
    step: int | None = None
    total_steps: int | None = None
    steps_per_second: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # as the run names them: train_loss, eval_accuracy, ...
    checkpoints: list[CheckpointRecord] = Field(default_factory=list)  # oldest first, what storage keeps
    latest_checkpoint: str | None = None
    resumes: list[ResumeRecord] = Field(default_factory=list)
    model_uri: str | None = Field(default=None, alias="modelURI")
    error: str | None = None
    reason: str | None = Field(default=None, description="Why it failed, e.g. InvalidInput: a retry cannot help.")
    warning: Problem | None = Field(default=None, description="Trouble the run works through, e.g. storage unreachable.")
    # a sweep's
    max_trials: int | None = None
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    trials: list[TrialRecord] = Field(default_factory=list)
    best_trial: BestTrial | None = None

    @property
    def trials_done(self) -> int:
        return sum(t.state in DONE for t in self.trials)


# ---- Status: what the operator writes


class Condition(Reported):
    type: str = Field(description="Ready, Running, Suspended, Succeeded, Failed or Reporting.")
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    last_transition_time: Timestamp
    observed_generation: int | None = None


class StepProgress(Reported):
    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps the run makes.")
    percent: int = Field(description="Percent done (of steps; of trials for a sweep).")


class CheckpointStatus(Reported):
    step: int
    uri: str
    eval_loss: float | None = None


class ResumeStatus(Reported):
    step: int = Field(description="The step the run continued from.")
    checkpoint: str = Field(description="The checkpoint it continued from.")


class TrialStatus(Reported):
    name: str
    params: dict[str, Any] = Field(default_factory=dict, description="The trial's values of the search space.")
    state: State
    metric: float | None = None
    step: int | None = None
    total_steps: int | None = None


class CommonStatus(Reported):
    """What the status of every kind has."""

    phase: State = Field(description="Pending, Initializing, Running, Suspended, Succeeded or Failed.")
    reason: str = Field(description="Why the object is in its phase, in one CamelCase word.")
    message: str
    observed_generation: int | None = Field(default=None, description="The metadata.generation this status is for.")
    attempts: int = Field(default=1, description="Ray clusters started so far (retries count).")
    conditions: list[Condition] = Field(default_factory=list)
    ray_job_name: str | None = Field(default=None, description="The KubeRay RayJob that runs it.")
    model_uri: str | None = Field(default=None, alias="modelURI", description="Where the exported model is, once Succeeded.")


class JobStatus(CommonStatus):
    progress: StepProgress | None = None
    metrics: dict[str, float] | None = Field(default=None, description="Latest training and evaluation metrics (trainLoss, evalLoss, ...).")
    latest_checkpoint: str | None = None
    checkpoints: list[CheckpointStatus] | None = Field(default=None, description="The newest checkpoints, newest first.")
    resumes: list[ResumeStatus] | None = Field(default=None, description="Each continuation from a checkpoint (a lost worker, a retry, a resume).")
    estimated_finish: Timestamp | None = None


class SweepStatus(CommonStatus):
    trials_done: str | None = Field(default=None, description="Trials finished of maxTrials, e.g. 2/4.")
    progress: StepProgress | None = None
    trials: list[TrialStatus] | None = None
    best_trial: BestTrial | None = Field(default=None, description="The best finished trial so far.")
