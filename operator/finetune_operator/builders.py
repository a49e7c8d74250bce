"""Pure builders: FineTuneJob or FineTuneSweep → KubeRay RayJob manifest. No Kubernetes
client, no kopf: what the operator applies is decided here and table-tested without a cluster."""

from __future__ import annotations

import shlex

from finetune_api.spec import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec, StorageSpec
from finetune_api.sweep import SWEEP_KIND, FineTuneSweep

DEFAULT_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
RAY_VERSION = "2.60.0"
MANAGED_BY = {"app.kubernetes.io/managed-by": "finetune-operator"}

RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


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


def _container(name: str, image: str, requests: dict, limits: dict, env: list[dict]) -> dict:
    return {
        "name": name,
        "image": image,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": RESTRICTED,
        **({"env": env} if env else {}),
    }


def _pod_spec(container: dict, scheduling) -> dict:
    sched = {
        "nodeSelector": scheduling.node_selector or None,
        "tolerations": scheduling.tolerations or None,
        "affinity": scheduling.affinity,
        "priorityClassName": scheduling.priority_class_name,
    }
    return {"containers": [container], **{k: v for k, v in sched.items() if v is not None}}


def build_rayjob(job: FineTuneJob, image: str = DEFAULT_IMAGE) -> dict:
    return _rayjob(KIND, job, job.name, job.spec, entrypoint("--job", job.encode()), job.spec.resources.nodes, image)


def sweep_rayjob_name(name: str) -> str:
    return f"{name}-sweep"  # a job and a sweep may share a name; their RayJobs may not


def build_sweep_rayjob(sweep: FineTuneSweep, image: str = DEFAULT_IMAGE) -> dict:
    """One Ray cluster for the whole sweep, sized for maxConcurrentTrials trials of
    template.resources.nodes workers each."""
    t = sweep.spec.template
    workers = sweep.spec.max_concurrent_trials * t.resources.nodes
    return _rayjob(SWEEP_KIND, sweep, sweep_rayjob_name(sweep.name), t, entrypoint("--sweep", sweep.encode()), workers, image)


def _rayjob(kind: str, owner: FineTuneJob | FineTuneSweep, name: str, s: FineTuneJobSpec, command: str, nodes: int, image: str) -> dict:
    r, image = s.resources, s.image or image
    worker = {"cpu": format(r.cpus_per_worker * max(r.gpus_per_node, 1), "g")}  # a quantity: 48, 0.5
    if r.memory_per_worker:
        worker["memory"] = r.memory_per_worker
    worker_limits = {**worker, **({"nvidia.com/gpu": str(r.gpus_per_node)} if r.gpus_per_node else {})}
    head = {"cpu": "1", "memory": "4Gi"}
    labels = {**MANAGED_BY, f"finetune.dev/{kind.removeprefix('FineTune').lower()}": owner.name}
    env = s3_credentials_env(s.storage)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": owner.metadata.namespace,
            "labels": labels,
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
        "spec": {
            "entrypoint": command,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
            # Each retry is a new Ray cluster running the same run, so it resumes from the latest checkpoint.
            "backoffLimit": s.retries,
            "suspend": s.suspend,
            **({"activeDeadlineSeconds": s.active_deadline_seconds} if s.active_deadline_seconds else {}),
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # the head schedules no training work: all workers land on worker pods
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {"metadata": {"labels": labels}, "spec": _pod_spec(_container("ray-head", image, head, head, env), s.scheduling)},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": nodes,
                        "minReplicas": nodes,
                        "maxReplicas": nodes,
                        "rayStartParams": {},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": _pod_spec(_container("ray-worker", image, worker, worker_limits, env), s.scheduling),
                        },
                    }
                ],
            },
        },
    }


def owned_by(obj: dict, uid: str | None) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences", []))


def differences(observed, desired, path: str = "spec") -> list[str]:
    """The paths where observed lacks a value desired sets. What the apiserver and KubeRay add
    (defaults) is no difference, nor is a zero value KubeRay's Go types leave out on their
    writes (omitempty: `suspend: false`, `backoffLimit: 0`)."""
    if observed is None and not desired:
        return []
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return [path]
        return [d for k, v in desired.items() for d in differences(observed.get(k), v, f"{path}.{k}")]
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(observed) != len(desired):
            return [path]
        return [d for i, (o, v) in enumerate(zip(observed, desired)) for d in differences(o, v, f"{path}[{i}]")]
    return [] if observed == desired else [path]


def spec_patch(desired: dict, observed: dict) -> tuple[dict | None, list[str]]:
    """The merge patch that brings an existing RayJob to the desired spec (suspend, resources,
    scheduling) and the paths that differ; (None, []) when it already has it."""
    changed = differences(observed.get("spec"), desired["spec"])
    return ({"spec": desired["spec"]} if changed else None), changed
