"""(FineTuneJob, what was observed, previous status) → .status: table tests, no cluster."""

import pytest

from conftest import TINY_LLAMA, job_doc
from finetune_api.spec import parse_job
from finetune_api.status import Problem, Progress
from finetune_operator.status import CONDITION_TYPES, Observed, build_status, invalid_status, pod_problem

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
PROGRESS = {
    "state": "Running", "step": 40, "total_steps": 100, "updated": T0, "steps_per_second": 2.0,
    "metrics": {"train_loss": 1.25, "eval_loss": 1.5, "eval_accuracy": 0.75, "tokens_per_s": 900.0},
    "latest_checkpoint": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000040",
    "checkpoints": [
        {"step": 20, "uri": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000020", "eval_loss": 1.7},
        {"step": 40, "uri": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000040", "eval_loss": None},
    ],
}


def job(tmp_path, **spec):
    doc = job_doc("sft", tmp_path, TINY_LLAMA, **spec)
    doc["metadata"].update(uid="6c1e0b8a-uid", generation=3)
    return parse_job(doc)


def rayjob(deployment=None, job_status=None, suspend=False, **status):
    st = {k: v for k, v in (("jobDeploymentStatus", deployment), ("jobStatus", job_status)) if v} | status
    return {"metadata": {"name": "sft"}, "spec": {"suspend": suspend}, "status": st}


def build(j, observed=None, progress=None, previous=None, now=T0, problem=None, queue=None) -> dict:
    """The status as the operator writes it."""
    seen = Observed(observed, progress and Progress.model_validate(progress), problem, queue)
    return build_status(j, seen, previous, now).wire()


@pytest.mark.parametrize(
    "spec, observed, progress, problem, phase, reason",
    [
        ({}, None, None, None, "Pending", "Creating"),
        ({}, rayjob(), None, None, "Initializing", "Initializing"),
        ({}, rayjob("Initializing"), None, None, "Initializing", "Initializing"),
        ({}, rayjob("Running", "RUNNING"), PROGRESS, None, "Running", "Training"),
        ({}, rayjob("Complete", "SUCCEEDED"), {**PROGRESS, "state": "Succeeded", "model_uri": "s3://m"}, None, "Succeeded", "Succeeded"),
        ({}, rayjob("Complete", "FAILED"), {**PROGRESS, "state": "Failed", "error": "storage error (s3://b): timeout"}, None,
         "Failed", "RayJobFailed"),
        ({}, rayjob("Failed", "FAILED", reason="DeadlineExceeded", message="past activeDeadlineSeconds"), None, None,
         "Failed", "DeadlineExceeded"),
        # KubeRay refused the RayJob (e.g. a name it does not take): Failed with its word, not Initializing for ever.
        ({}, rayjob("ValidationFailed", reason="ValidationFailed", message="The RayJob metadata is invalid"), None, None,
         "Failed", "ValidationFailed"),
        ({"retries": 2}, rayjob("Retrying", "FAILED", failed=1), PROGRESS, None, "Initializing", "Retrying"),
        ({"suspend": True}, rayjob("Suspending"), PROGRESS, None, "Suspended", "Suspending"),
        ({"suspend": True}, rayjob("Suspended"), PROGRESS, None, "Suspended", "Suspended"),
        ({"suspend": True}, None, None, None, "Suspended", "Suspended"),
        ({}, None, None, Problem(reason="SecretNotFound", message="Secret s3-creds not found in team-a"), "Pending", "SecretNotFound"),
        # Storage the run cannot write does not stop it: only Ready says so.
        ({}, rayjob("Running", "RUNNING"), None, Problem(reason="StorageUnreachable", message="progress.json not written"), "Running", "Training"),
        # Input no retry can fix: Failed at once, whatever KubeRay says yet.
        ({"retries": 3}, rayjob("Running", "RUNNING"), {"state": "Failed", "reason": "InvalidInput", "error": "spec.dataset.train row 3: no column 'label'"},
         None, "Failed", "InvalidInput"),
        ({"queueName": "gpu"}, rayjob(suspend=True), None, None, "Suspended", "Queued"),
        ({"queueName": "gpu"}, rayjob("Initializing"), None, None, "Initializing", "Initializing"),  # admitted
    ],
)
def test_phase_table(tmp_path, spec, observed, progress, problem, phase, reason):
    status = build(job(tmp_path, **spec), observed, progress, problem=problem)
    assert status["phase"] == phase
    by_type = {c["type"]: c for c in status["conditions"]}
    assert list(by_type) == list(CONDITION_TYPES)
    assert by_type["Ready"]["status"] == ("False" if problem else "True")
    for kind in ("Running", "Suspended", "Succeeded", "Failed"):
        assert by_type[kind]["status"] == ("True" if kind == phase else "False"), kind
    assert status["reason"] == reason
    if phase in by_type:
        assert by_type[phase]["reason"] == reason
    assert all(c["observedGeneration"] == 3 for c in by_type.values()) and status["observedGeneration"] == 3


def test_running_status_mirrors_progress(tmp_path):
    status = build(job(tmp_path), rayjob("Running", "RUNNING"), PROGRESS)
    assert status["progress"] == {"step": 40, "totalSteps": 100, "percent": 40}
    assert status["metrics"] == {"trainLoss": 1.25, "evalLoss": 1.5, "evalAccuracy": 0.75, "tokensPerS": 900.0}
    assert status["latestCheckpoint"].endswith("checkpoint_00000040")
    assert status["checkpoints"] == [  # newest first
        {"step": 40, "uri": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000040"},
        {"step": 20, "uri": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000020", "evalLoss": 1.7},
    ]
    assert status["estimatedFinish"] == "2027-01-15T08:00:30Z"  # 60 steps left at 2 steps/s
    assert status["attempts"] == 1 and status["rayJobName"] == "sft" and "modelURI" not in status


def test_failure_message_comes_from_the_run_and_attempts_count_failures(tmp_path):
    progress = {**PROGRESS, "state": "Failed", "error": "storage error (s3://b): timeout"}
    status = build(job(tmp_path), rayjob("Failed", "FAILED", failed=2), progress)  # KubeRay counted the last one too
    assert status["message"] == "storage error (s3://b): timeout" and status["attempts"] == 2
    assert build(job(tmp_path), rayjob("Retrying", "FAILED", failed=2))["attempts"] == 3
    assert "estimatedFinish" not in status


def test_success_carries_the_model_uri(tmp_path):
    progress = {**PROGRESS, "state": "Succeeded", "step": 100, "model_uri": "s3://b/runs/sft-6c1e0b8a/output/model"}
    status = build(job(tmp_path), rayjob("Complete", "SUCCEEDED"), progress)
    assert status["modelURI"] == "s3://b/runs/sft-6c1e0b8a/output/model" and status["progress"]["percent"] == 100


def test_transition_times_move_only_when_a_condition_flips(tmp_path):
    j = job(tmp_path)
    first = build(j, rayjob("Initializing"))
    same = build(j, rayjob("Initializing"), previous=first, now=T0 + 60)
    assert same == first  # nothing changed: the operator writes nothing
    running = build(j, rayjob("Running", "RUNNING"), PROGRESS, same, T0 + 120)
    times = {c["type"]: c["lastTransitionTime"] for c in running["conditions"]}
    assert times["Running"] == "2027-01-15T08:02:00Z"
    assert times["Ready"] == times["Failed"] == "2027-01-15T08:00:00Z"


def test_a_spec_the_models_reject_fails_naming_the_field():
    message = "spec.training.lr: Input should be greater than 0"
    status = invalid_status(4, message, None, T0).wire()
    by_type = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec" and status["message"] == message
    assert by_type["Ready"]["status"] == "False" and by_type["Failed"]["status"] == "True"
    assert by_type["Failed"]["observedGeneration"] == 4


def pod(name="sft-head", waiting=None, scheduled=None, message="not found"):
    status = {}
    if waiting:
        status["containerStatuses"] = [{"image": "ghcr.io/x/trainer:nope", "state": {"waiting": {"reason": waiting, "message": message}}}]
    if scheduled:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": scheduled, "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize(
    "pods, reason, words",
    [
        ([], None, ()),
        ([pod(waiting="ContainerCreating")], None, ()),  # just starting
        ([pod(), pod("sft-worker", waiting="ImagePullBackOff")], "ImagePullBackOff", ("spec.image", "sft-worker", "ghcr.io/x/trainer:nope")),
        ([pod(waiting="ErrImagePull")], "ImagePullBackOff", ("spec.image",)),
        ([pod(scheduled="Unschedulable")], "Unschedulable", ("spec.resources", "Insufficient cpu")),
        ([pod(scheduled="SchedulerError")], None, ()),
        ([pod(waiting="CreateContainerConfigError", message='secret "s3-creds" not found')], "SecretNotFound",
         ("spec.storage.credentialsSecret", 's3-creds')),
        ([pod(waiting="CreateContainerConfigError", message="couldn't find key user in Secret team-a/s3-creds")], "SecretNotFound",
         ("key user",)),
    ],
)
def test_pod_problems_name_the_field_to_fix(pods, reason, words):
    problem = pod_problem(pods)
    assert (problem and problem.reason) == reason
    assert all(w in problem.message for w in words) if problem else True


def test_a_starting_job_with_a_pod_problem_says_why(tmp_path):
    problem = pod_problem([pod(scheduled="Unschedulable")])
    status = build(job(tmp_path), rayjob("Initializing"), problem=problem)
    assert (status["phase"], status["reason"]) == ("Initializing", "Unschedulable")
    assert "Insufficient cpu" in status["message"]


def test_resumes_reach_the_status(tmp_path):
    progress = {**PROGRESS, "resumes": [{"step": 20, "checkpoint": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000020", "at": T0}]}
    status = build(job(tmp_path), rayjob("Running", "RUNNING"), progress)
    assert status["resumes"] == [{"step": 20, "checkpoint": "s3://b/runs/sft-6c1e0b8a/checkpoint_00000020"}]
    assert "resumes" not in build(job(tmp_path), rayjob("Running", "RUNNING"), PROGRESS)


def test_without_a_report_since_the_operator_started_the_progress_fields_stay(tmp_path):
    before = build(job(tmp_path), rayjob("Running", "RUNNING"), PROGRESS)
    after_restart = build(job(tmp_path), rayjob("Running", "RUNNING"), None, previous=before)
    for key in ("progress", "metrics", "latestCheckpoint", "checkpoints"):
        assert after_restart[key] == before[key], key


def test_a_queued_job_says_what_kueue_says(tmp_path):
    status = build(job(tmp_path, queueName="gpu"), rayjob(suspend=True), queue="insufficient unused quota for cpu in flavor default")
    assert (status["phase"], status["reason"]) == ("Suspended", "Queued")
    assert "queue gpu" in status["message"] and "insufficient unused quota" in status["message"]
    user = build(job(tmp_path, queueName="gpu", suspend=True), rayjob("Suspended", suspend=True))
    assert user["reason"] == "Suspended"  # suspended by the user, not waiting in the queue
