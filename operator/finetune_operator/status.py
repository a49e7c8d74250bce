"""Pure status builder: (FineTuneJob, observed RayJob, progress.json, previous status) → the
FineTuneJob's `.status`. No Kubernetes client, no kopf: the operator writes what this returns,
and only when it differs from what is there."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import NamedTuple

from finetune_api.spec import FineTuneJob
from finetune_api.sweep import TRIAL_DONE, FineTuneSweep

PHASES = ("Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended")
CONDITION_TYPES = ("Ready", "Running", "Suspended", "Succeeded", "Failed")
CHECKPOINTS_SHOWN = 5


class Problem(NamedTuple):
    """Something outside the spec that is wrong (a missing Secret, unreachable storage): Ready
    turns False; before the RayJob exists it also holds the job in Pending."""

    reason: str
    message: str


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _camel(key: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)


def phase_of(suspend: bool, rayjob: dict | None, progress: dict, problem: Problem | None) -> tuple[str, str, str]:
    """(phase, reason, message) from what KubeRay reports and what the run wrote."""
    st = (rayjob or {}).get("status", {})
    deployment, job_status = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    if deployment in ("Suspending", "Suspended") or (suspend and rayjob is None):
        return "Suspended", deployment or "Suspended", "the Ray cluster is stopped; suspend: false resumes from the latest checkpoint"
    if deployment == "Complete" and job_status == "SUCCEEDED":
        return "Succeeded", "Succeeded", f"model exported to {progress.get('model_uri', 'storage')}"
    if deployment == "Failed" or (deployment == "Complete" and job_status in ("FAILED", "STOPPED")):
        message = progress.get("error") or st.get("message") or "the Ray job failed"
        return "Failed", st.get("reason") or "RayJobFailed", message
    if rayjob is None and problem is not None:
        return "Pending", problem.reason, problem.message
    if rayjob is None:
        return "Pending", "Creating", "creating the RayJob"
    if deployment == "Running":
        if progress.get("kind") == "sweep":
            return "Running", "Searching", f"{_done(progress)} of {progress['max_trials']} trials done"
        return "Running", "Training", f"step {progress['step']} of {progress['total_steps']}" if progress.get("step") else "starting"
    if deployment == "Retrying":
        return "Initializing", "Retrying", f"attempt {st.get('failed', 0) + 1} starts a new Ray cluster and resumes from the latest checkpoint"
    return "Initializing", "Initializing", "starting the Ray cluster"


def conditions(phase: str, reason: str, message: str, problem: Problem | None, generation: int | None,
               previous: list[dict], now: str) -> list[dict]:
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
        out.append({
            "type": kind,
            "status": status,
            "reason": why,
            "message": text,
            "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status else now,
            "observedGeneration": generation,
        })
    return out


def _common(suspend: bool, generation: int | None, rayjob: dict | None, progress: dict, previous: dict,
            now: float, problem: Problem | None) -> dict:
    """What every kind's status has: phase, reason, message, conditions, attempts, rayJobName."""
    phase, reason, message = phase_of(suspend, rayjob, progress, problem)
    status = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "attempts": (rayjob or {}).get("status", {}).get("failed", 0) + 1,
        "conditions": conditions(phase, reason, message, problem, generation, previous.get("conditions", []), _rfc3339(now)),
    }
    if rayjob is not None:
        status["rayJobName"] = rayjob["metadata"]["name"]
    if phase == "Succeeded" and progress.get("model_uri"):
        status["modelURI"] = progress["model_uri"]
    return status


def build_status(job: FineTuneJob, rayjob: dict | None, progress: dict | None, previous: dict | None,
                 now: float, problem: Problem | None = None) -> dict:
    progress, previous = progress or {}, previous or {}
    status = _common(job.spec.suspend, job.metadata.generation, rayjob, progress, previous, now, problem)
    phase = status["phase"]
    if progress.get("total_steps"):
        step, total = progress["step"], progress["total_steps"]
        status["progress"] = {"step": step, "totalSteps": total, "percent": int(100 * step / total)}
        rate = progress.get("steps_per_second")
        if phase == "Running" and rate:
            status["estimatedFinish"] = _rfc3339(progress["updated"] + (total - step) / rate)
    metrics = {_camel(k): v for k, v in progress.get("metrics", {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if metrics:
        status["metrics"] = metrics
    if progress.get("latest_checkpoint"):
        status["latestCheckpoint"] = progress["latest_checkpoint"]
        status["checkpoints"] = [
            {"step": c["step"], "uri": c["uri"], **({"evalLoss": c["eval_loss"]} if c.get("eval_loss") is not None else {})}
            for c in reversed(progress.get("checkpoints", [])[-CHECKPOINTS_SHOWN:])
        ]
    return status


def invalid_status(generation: int | None, message: str, previous: dict | None, now: float) -> dict:
    """The status of an object the models reject although the apiserver stored it (a CRD older
    than the operator, a rule only the models know): Failed, naming the field."""
    problem = Problem("InvalidSpec", message)
    conds = conditions("Failed", problem.reason, message, problem, generation, (previous or {}).get("conditions", []), _rfc3339(now))
    return {"phase": "Failed", "reason": problem.reason, "message": message, "observedGeneration": generation, "conditions": conds}


def _done(progress: dict) -> int:
    return sum(t["state"] in TRIAL_DONE for t in progress.get("trials", []))


def build_sweep_status(sweep: FineTuneSweep, rayjob: dict | None, progress: dict | None, previous: dict | None,
                       now: float, problem: Problem | None = None) -> dict:
    """A FineTuneSweep's status: the common part plus one entry per trial (name, params,
    state, metric, step), the best trial so far and trials done of maxTrials."""
    progress, previous = progress or {}, previous or {}
    status = _common(sweep.spec.template.suspend, sweep.metadata.generation, rayjob, progress, previous, now, problem)
    total = sweep.spec.max_trials
    done = _done(progress)
    status["trialsDone"] = f"{done}/{total}"
    status["progress"] = {"percent": int(100 * done / total)}
    if progress.get("trials"):
        status["trials"] = [
            {"name": t["name"], "params": t["params"], "state": t["state"],
             **({"metric": t["metric"]} if t.get("metric") is not None else {}),
             **({"step": t["step"], "totalSteps": t["total_steps"]} if t.get("total_steps") else {})}
            for t in progress["trials"]
        ]
    if progress.get("best_trial"):
        status["bestTrial"] = progress["best_trial"]
    return status
