"""Pure status builder: (FineTuneJob or FineTuneSweep, what was observed, previous status) →
the object's `.status` (finetune_api.status). No Kubernetes client, no kopf: the operator
writes what this returns, and only when it differs from what is there."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from finetune_api.spec import FineTuneJob
from finetune_api.status import (
    FINAL, INVALID_INPUT, BestTrial, CheckpointStatus, CommonStatus, Condition, JobStatus, Problem, Progress, ResumeStatus,
    State, StepProgress, SweepStatus, TrialStatus,
)
from finetune_api.sweep import FineTuneSweep

# The phases a job or sweep goes through (State has the trials' too).
PHASES = (State.PENDING, State.INITIALIZING, State.RUNNING, State.SUSPENDED, State.SUCCEEDED, State.FAILED)
CONDITION_TYPES = ("Ready", "Running", "Suspended", "Succeeded", "Failed")
CHECKPOINTS_SHOWN = 5


@dataclass(frozen=True)
class Observed:
    """What the operator knows of a job besides its spec."""

    rayjob: dict | None = None  # the RayJob, as the watch delivered it
    progress: Progress | None = None  # the run's latest report; None: none since the operator started
    problem: Problem | None = None  # why it is stuck or unwell (pods, reports), if it is
    queue: str | None = None  # Kueue's word on a job waiting in its queue

    @property
    def rayjob_status(self) -> dict:
        return (self.rayjob or {}).get("status") or {}


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _camel(key: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)


# Container waiting reasons that no retry by the kubelet will cure without a change of image.
IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
# The kubelet's words for a Secret an env var names that is missing, or lacks the key.
SECRET_MISSING = re.compile(r'secret "([^"]+)" not found|couldn\'t find key (\S+) in Secret \S+/(\S+)')


def pod_problem(pods: list[dict]) -> Problem | None:
    """Why the Ray pods of a job that is not running yet cannot start: a missing Secret, an
    image no node can pull, or a pod no node can fit (the scheduler's own words); None while
    they are just starting."""
    for pod in pods:
        name = pod["metadata"]["name"]
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (c.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_PULL:
                return Problem(reason="ImagePullBackOff", message=f"spec.image: pod {name} cannot pull image {c.get('image')} "
                               f"({waiting.get('message') or waiting['reason']}); set spec.image to an image the nodes can pull")
            if waiting.get("reason") == "CreateContainerConfigError" and SECRET_MISSING.search(waiting.get("message", "")):
                return Problem(reason="SecretNotFound", message=f"spec.storage.credentialsSecret: pod {name} cannot start: "
                               f"{waiting['message']}; create the Secret in the job's namespace with the keys the spec names")
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                return Problem(reason="Unschedulable", message=f"spec.resources: pod {name} fits no node ({cond.get('message')}); "
                               "ask for less (nodes, cpusPerWorker, memoryPerWorker, gpusPerNode, head) or add nodes")
    return None


def queued(suspend: bool, queue_name: str | None, rayjob: dict | None) -> bool:
    """Suspended by Kueue, not by the user: waiting in its queue for quota."""
    return bool(queue_name) and not suspend and rayjob is not None and bool(rayjob.get("spec", {}).get("suspend"))


def phase_of(suspend: bool, queue_name: str | None, seen: Observed) -> tuple[State, str, str]:
    """(phase, reason, message) from what KubeRay and Kueue report and what the run reported."""
    rayjob, progress, problem = seen.rayjob, seen.progress or Progress(), seen.problem
    st = seen.rayjob_status
    deployment, job_status = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    if progress.state == State.FAILED and progress.reason == INVALID_INPUT:  # no retry can help: failed at once
        return State.FAILED, INVALID_INPUT, progress.error or "invalid input"
    if queued(suspend, queue_name, rayjob):
        return State.SUSPENDED, "Queued", f"waiting for Kueue to admit it from queue {queue_name}" + (f": {seen.queue}" if seen.queue else "")
    if deployment in ("Suspending", "Suspended") or (suspend and rayjob is None):
        return State.SUSPENDED, deployment or "Suspended", "the Ray cluster is stopped; suspend: false resumes from the latest checkpoint"
    if deployment == "Complete" and job_status == "SUCCEEDED":
        return State.SUCCEEDED, "Succeeded", f"model exported to {progress.model_uri or 'storage'}"
    # ValidationFailed: KubeRay refused the RayJob itself (its reason and message say why) and will not run it.
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job_status in ("FAILED", "STOPPED")):
        return State.FAILED, progress.reason or st.get("reason") or "RayJobFailed", progress.error or st.get("message") or "the Ray job failed"
    if rayjob is None and problem is not None:
        return State.PENDING, problem.reason, problem.message
    if rayjob is None:
        return State.PENDING, "Creating", "creating the RayJob"
    if deployment == "Running":
        if progress.kind == "sweep" and progress.max_trials:
            return State.RUNNING, "Searching", f"{progress.trials_done} of {progress.max_trials} trials done"
        return State.RUNNING, "Training", f"step {progress.step} of {progress.total_steps}" if progress.step else "starting"
    if deployment == "Retrying":
        return State.INITIALIZING, "Retrying", f"attempt {st.get('failed', 0) + 1} starts a new Ray cluster and resumes from the latest checkpoint"
    if problem is not None:  # e.g. pod_problem: the reason it is stuck, not a generic "starting"
        return State.INITIALIZING, problem.reason, problem.message
    return State.INITIALIZING, "Initializing", "starting the Ray cluster"


def conditions(phase: State, reason: str, message: str, problem: Problem | None, generation: int | None,
               previous: list[dict], now: str) -> list[Condition]:
    """One condition per type, in Kubernetes' shape; lastTransitionTime moves only when the
    condition's status changes."""
    before = {c["type"]: c for c in previous}
    out = []
    for kind in CONDITION_TYPES:
        if kind == "Ready":
            true = problem is None
            why, text = (problem.reason, problem.message) if problem else ("Reconciled", "the RayJob matches the spec")
        else:
            true = phase == kind
            why, text = (reason, message) if true else (f"Not{kind}", f"phase is {phase}")
        status = "True" if true else "False"
        old = before.get(kind)
        out.append(Condition(
            type=kind, status=status, reason=why, message=text, observed_generation=generation,
            last_transition_time=old["lastTransitionTime"] if old and old["status"] == status else now,
        ))
    return out


def _common(obj: FineTuneJob | FineTuneSweep, suspend: bool, queue_name: str | None, seen: Observed, previous: dict,
            now: float) -> dict:
    """The fields every kind's status has: phase, reason, message, conditions, attempts, rayJobName, modelURI."""
    phase, reason, message = phase_of(suspend, queue_name, seen)
    generation = obj.metadata.generation
    progress = seen.progress
    model_uri = progress.model_uri if progress is not None else previous.get("modelURI")
    return {
        "phase": phase, "reason": reason, "message": message, "observed_generation": generation,
        # KubeRay counts a failed attempt as it marks it Failed: the last one is in `failed` then.
        "attempts": seen.rayjob_status.get("failed", 0) + (seen.rayjob_status.get("jobDeploymentStatus") != "Failed"),
        "conditions": conditions(phase, reason, message, seen.problem, generation, previous.get("conditions", []), _rfc3339(now)),
        "ray_job_name": seen.rayjob["metadata"]["name"] if seen.rayjob is not None else previous.get("rayJobName"),
        "model_uri": model_uri if phase == State.SUCCEEDED else None,
    }


def build_status(job: FineTuneJob, seen: Observed, previous: dict | None, now: float) -> JobStatus:
    """A FineTuneJob's status. Without a report since the operator started, the progress
    fields stay what the previous status said."""
    previous = previous or {}
    status = JobStatus(**_common(job, job.spec.suspend, job.spec.queue_name, seen, previous, now))
    p = seen.progress
    if p is None:
        carried = {k: previous[k] for k in ("progress", "metrics", "latestCheckpoint", "checkpoints", "resumes") if previous.get(k)}
        return JobStatus.model_validate({**status.wire(), **carried})
    if p.total_steps:
        status.progress = StepProgress(step=p.step, total_steps=p.total_steps, percent=int(100 * (p.step or 0) / p.total_steps))
        if status.phase == State.RUNNING and p.steps_per_second:
            status.estimated_finish = _rfc3339(p.updated + (p.total_steps - (p.step or 0)) / p.steps_per_second)
    status.metrics = {_camel(k): v for k, v in p.metrics.items()} or None
    if p.latest_checkpoint:
        status.latest_checkpoint = p.latest_checkpoint
        status.checkpoints = [CheckpointStatus(step=c.step, uri=c.uri, eval_loss=c.eval_loss)
                              for c in reversed(p.checkpoints[-CHECKPOINTS_SHOWN:])]
    if p.resumes:  # each a continuation from a checkpoint: a lost worker, a retry, a resume after suspend
        status.resumes = [ResumeStatus(step=r.step, checkpoint=r.checkpoint) for r in p.resumes[-CHECKPOINTS_SHOWN:]]
    return status


def build_sweep_status(sweep: FineTuneSweep, seen: Observed, previous: dict | None, now: float) -> SweepStatus:
    """A FineTuneSweep's status: the common part plus one entry per trial (name, params, state,
    metric, step), the best trial so far and trials done of maxTrials."""
    previous = previous or {}
    status = SweepStatus(**_common(sweep, sweep.spec.suspend, sweep.spec.template.queue_name, seen, previous, now))
    p = seen.progress
    if p is None:
        carried = {k: previous[k] for k in ("trialsDone", "progress", "trials", "bestTrial") if previous.get(k)}
        return SweepStatus.model_validate({**status.wire(), **carried})
    total = sweep.spec.max_trials
    status.trials_done = f"{p.trials_done}/{total}"
    status.progress = StepProgress(percent=int(100 * p.trials_done / total))
    status.trials = [TrialStatus(name=t.name, params=t.params, state=t.state, metric=t.metric, step=t.step if t.total_steps else None,
                                 total_steps=t.total_steps) for t in p.trials] or None
    status.best_trial = BestTrial.model_validate(p.best_trial.wire()) if p.best_trial else None
    return status


def invalid_status(generation: int | None, message: str, previous: dict | None, now: float) -> CommonStatus:
    """The status of an object the models reject although the apiserver stored it (a CRD older
    than the operator, a rule only the models know): Failed, naming the field."""
    problem = Problem(reason="InvalidSpec", message=message)
    conds = conditions(State.FAILED, problem.reason, message, problem, generation, (previous or {}).get("conditions", []), _rfc3339(now))
    return CommonStatus(phase=State.FAILED, reason=problem.reason, message=message, observed_generation=generation, conditions=conds)


def finished(status: dict | None) -> bool:
    return (status or {}).get("phase") in FINAL
