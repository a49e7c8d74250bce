"""Pure builders: FineTuneJob or FineTuneSweep → KubeRay RayJob manifest. No Kubernetes
client, no kopf: what the operator applies is decided here and table-tested without a cluster."""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass

from finetune_api.kinds import KINDS
from finetune_api.spec import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec, PodTemplateSpec, StorageSpec, TrackingSpec
from finetune_api.sweep import SWEEP_KIND, FineTuneSweep

DEFAULT_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
RAY_VERSION = "2.60.0"
MANAGED_BY = {"app.kubernetes.io/managed-by": "finetune-operator"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The hash of the spec last applied: the operator applies again only when the desired spec moved.
SPEC_HASH = "finetune.dev/spec-hash"

RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# After the grace period the driver still writes the final progress.json (one storage call) and
# Ray shuts down; the kubelet's SIGKILL must not cut that short.
TERMINATION_MARGIN_SECONDS = 30

# How a run reaches the operator (finetune_train/progress.py): a projected ServiceAccount token
# for this audience only, rotated by the kubelet, and the operator's report URL.
REPORT_AUDIENCE = "finetune-operator"
REPORT_TOKEN_DIR = "/var/run/secrets/finetune.dev/report"
REPORT_TOKEN_SECONDS = 3600


@dataclass(frozen=True)
class Settings:
    """What the operator adds to every RayJob: the default trainer image and where runs report."""

    image: str = DEFAULT_IMAGE
    report_url: str | None = None


def entrypoint(flag: str, encoded: str) -> str:
    return shlex.join(["python", "-m", "finetune_train", flag, encoded])


def s3_credentials_env(storage: StorageSpec) -> list[dict]:
    """The Secret's keys as the standard AWS variables: the training program reads
    credentials from the environment only, so they never pass through the spec."""
    secret = storage.credentials_secret
    if secret is None:
        return []
    keys = [("AWS_ACCESS_KEY_ID", secret.access_key_id_key), ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key)]
    if secret.session_token_key:
        keys.append(("AWS_SESSION_TOKEN", secret.session_token_key))
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}} for var, key in keys]


def mlflow_credentials_env(tracking: TrackingSpec) -> list[dict]:
    """MLflow's credential variables from the Secret, each key optional: a token, or a user and
    password, whichever the Secret holds."""
    secret = tracking.mlflow and tracking.mlflow.credentials_secret
    if not secret:
        return []
    keys = [("MLFLOW_TRACKING_TOKEN", secret.token_key), ("MLFLOW_TRACKING_USERNAME", secret.username_key),
            ("MLFLOW_TRACKING_PASSWORD", secret.password_key)]
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key, "optional": True}}} for var, key in keys]


# SIGTERM to a Ray pod stops its Ray processes at once: this hook first hands it to the training
# driver, which checkpoints every worker at the current step, and waits for the pod's training
# processes to finish (finetune_train/prestop.py).
PRE_STOP = {"preStop": {"exec": {"command": ["python", "-m", "finetune_train.prestop"]}}}


def _report(settings: Settings) -> tuple[list[dict], list[dict], list[dict]]:
    """(env, volumes, mounts) that let a run push its progress to the operator."""
    if not settings.report_url:
        return [], [], []
    token = {"serviceAccountToken": {"audience": REPORT_AUDIENCE, "expirationSeconds": REPORT_TOKEN_SECONDS, "path": "token"}}
    env = [{"name": "FINETUNE_STATUS_URL", "value": settings.report_url},
           {"name": "FINETUNE_STATUS_TOKEN_FILE", "value": f"{REPORT_TOKEN_DIR}/token"}]
    return env, [{"name": "finetune-report", "projected": {"sources": [token]}}], [
        {"name": "finetune-report", "mountPath": REPORT_TOKEN_DIR, "readOnly": True}]


def _pod(name: str, image: str, requests: dict, limits: dict, s: FineTuneJobSpec, settings: Settings) -> dict:
    """A Ray pod template: ours, then the user's podTemplate merged on (their env replaces ours
    of the same name: the CRD keys env by name, so two would fail the apply; their volumes
    beside ours; their securityContext instead of ours)."""
    t: PodTemplateSpec = s.pod_template
    report_env, report_volumes, report_mounts = _report(settings)
    theirs = [e.wire() for e in t.env]
    named = {e["name"] for e in theirs}
    ours = [*s3_credentials_env(s.storage), *mlflow_credentials_env(s.tracking), {"name": "FINETUNE_IMAGE", "value": image}, *report_env]
    env = [*(e for e in ours if e["name"] not in named), *theirs]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}, *report_mounts, *(m.wire() for m in t.volume_mounts)]
    container = {
        "name": name,
        "image": image,
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "securityContext": t.security_context if t.security_context is not None else RESTRICTED,
        **({"env": env} if env else {}),
        **({"envFrom": t.env_from} if t.env_from else {}),
        "volumeMounts": mounts,
        "lifecycle": PRE_STOP,
    }
    # Ray's object store, NCCL and DeepSpeed need more /dev/shm than the runtime's 64 MiB. Its
    # pages count as the container's memory, so the memory limit (if any) is the useful bound.
    shm = {"medium": "Memory", **({"sizeLimit": limits["memory"]} if "memory" in limits else {})}
    optional = {
        "nodeSelector": s.scheduling.node_selector or None,
        "tolerations": s.scheduling.tolerations or None,
        "affinity": s.scheduling.affinity,
        "priorityClassName": s.scheduling.priority_class_name,
        "serviceAccountName": t.service_account_name,
        "imagePullSecrets": [r.wire() for r in t.image_pull_secrets] or None,
        "securityContext": t.pod_security_context,
    }
    return {
        "containers": [container],
        "volumes": [{"name": "shm", "emptyDir": shm}, *report_volumes, *(v.wire() for v in t.volumes)],
        # Kubernetes' 30 s default would SIGKILL workers in the middle of the SIGTERM checkpoint.
        "terminationGracePeriodSeconds": s.checkpointing.grace_period_seconds + TERMINATION_MARGIN_SECONDS,
        **{k: v for k, v in optional.items() if v is not None},
    }


def build_rayjob(job: FineTuneJob, settings: Settings = Settings(), observed: dict | None = None, give_up: bool = False) -> dict:
    """`observed`: the RayJob as it is (a queued job's suspend is Kueue's once it exists);
    `give_up`: the run failed for good (invalid input), so KubeRay must not retry it."""
    return _rayjob(KIND, job, job.name, job.spec, entrypoint("--job", job.encode()), job.spec.resources.nodes,
                   job.spec.suspend, settings, observed, give_up)


def sweep_rayjob_name(name: str) -> str:
    return f"{name}-sweep"  # a job and a sweep may share a name; their RayJobs may not


def build_sweep_rayjob(sweep: FineTuneSweep, settings: Settings = Settings(), observed: dict | None = None, give_up: bool = False) -> dict:
    """One Ray cluster for the whole sweep, sized for maxConcurrentTrials trials of
    template.resources.nodes workers each."""
    t = sweep.spec.template
    workers = sweep.spec.max_concurrent_trials * t.resources.nodes
    return _rayjob(SWEEP_KIND, sweep, sweep_rayjob_name(sweep.name), t, entrypoint("--sweep", sweep.encode()), workers,
                   sweep.spec.suspend, settings, observed, give_up)


def _rayjob(kind: str, owner: FineTuneJob | FineTuneSweep, name: str, s: FineTuneJobSpec, command: str, nodes: int,
            suspend: bool, settings: Settings, observed: dict | None, give_up: bool) -> dict:
    r, image = s.resources, s.image or settings.image
    # CPU is requested, never limited (head and workers): a CFS quota throttles the bursts of
    # imports and start-up, and stalls every collective on its most throttled rank. Memory and
    # GPUs are limited.
    memory = {"memory": r.memory_per_worker} if r.memory_per_worker else {}
    worker = {"cpu": format(r.cpus_per_worker * r.per_node, "g"), **memory}  # a quantity: 48, 0.5
    worker_limits = {**memory, **({"nvidia.com/gpu": str(r.gpus_per_node)} if r.gpus_per_node else {})}
    head = {"cpu": r.head.cpu, "memory": r.head.memory}
    selector = {**MANAGED_BY, KINDS[kind].label: owner.name}
    pod_meta = {"labels": {**s.pod_template.labels, **selector}, **({"annotations": s.pod_template.annotations} if s.pod_template.annotations else {})}
    spec = {
        "entrypoint": command,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
        # Each retry is a new Ray cluster running the same run, so it resumes from the latest checkpoint.
        "backoffLimit": 0 if give_up else s.retries,
        **({"activeDeadlineSeconds": s.active_deadline_seconds} if s.active_deadline_seconds else {}),
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": {
                # the head schedules no training work: all workers land on worker pods
                "rayStartParams": {"num-cpus": "0"},
                "template": {"metadata": pod_meta, "spec": _pod("ray-head", image, head, {"memory": r.head.memory}, s, settings)},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": nodes,
                    "minReplicas": nodes,
                    "maxReplicas": nodes,
                    "rayStartParams": {},
                    "template": {"metadata": pod_meta, "spec": _pod("ray-worker", image, worker, worker_limits, s, settings)},
                }
            ],
        },
    }
    # Kueue admits a queued job by unsuspending it (and may suspend it again to preempt it): it
    # starts suspended, and once it exists its suspend is what Kueue made it, unless the user
    # suspends it. (Leaving the field out would not leave it to Kueue: server-side apply
    # removes a field its only owner stops applying.)
    if suspend or s.queue_name is None or observed is None:
        spec["suspend"] = suspend or s.queue_name is not None
    else:
        spec["suspend"] = bool(observed.get("spec", {}).get("suspend"))
    labels = {**selector, **({QUEUE_LABEL: s.queue_name} if s.queue_name else {})}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": owner.metadata.namespace,
            "labels": labels,
            "annotations": {SPEC_HASH: spec_hash(spec, labels)},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": kind,
                    "name": owner.name,
                    "uid": owner.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def spec_hash(spec: dict, labels: dict) -> str:
    return hashlib.sha256(json.dumps([spec, labels], sort_keys=True).encode()).hexdigest()[:16]


def needs_apply(desired: dict, observed: dict | None) -> bool:
    """Whether the RayJob must be applied: it is missing, or what was applied last differs."""
    annotations = ((observed or {}).get("metadata") or {}).get("annotations") or {}
    return annotations.get(SPEC_HASH) != desired["metadata"]["annotations"][SPEC_HASH]


def as_applier(managed: list[dict], manager: str) -> list[dict]:
    """A JSON patch that makes the fields `manager` wrote with a create (managedFields records a
    POST as an Update) its fields as an applier's, as kubectl's csaupgrade does: only then does
    an apply that leaves a field out remove it. Empty when there is nothing to fold. The test
    ops make it fail rather than fold entries it did not see."""
    ours = {e.get("operation"): (i, e) for i, e in enumerate(managed) if e.get("manager") == manager and not e.get("subresource")}
    if "Update" not in ours:
        return []
    i, created = ours["Update"]
    test = [{"op": "test", "path": f"/metadata/managedFields/{i}", "value": created}]
    if "Apply" not in ours:
        return [*test, {"op": "replace", "path": f"/metadata/managedFields/{i}/operation", "value": "Apply"}]
    j, applied = ours["Apply"]
    return [*test, {"op": "test", "path": f"/metadata/managedFields/{j}", "value": applied},
            {"op": "replace", "path": f"/metadata/managedFields/{j}/fieldsV1", "value": _union(applied.get("fieldsV1", {}), created.get("fieldsV1", {}))},
            {"op": "remove", "path": f"/metadata/managedFields/{i}"}]


def _union(a: dict, b: dict) -> dict:
    """Two field sets in managedFields' fieldsV1 form (a trie of nested dicts) as one."""
    return {k: _union(a.get(k, {}), b.get(k, {})) for k in a.keys() | b.keys()}


def controller(obj: dict) -> str:
    """The uid of the object's controller ('' when it has none)."""
    return next((ref["uid"] for ref in obj["metadata"].get("ownerReferences") or [] if ref.get("controller")), "")
