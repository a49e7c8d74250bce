"""The control plane's Kueue (ControlPlane(kueue=True)): RayJobs queued on a ClusterQueue
wait suspended while its quota is used and are unsuspended by Kueue when it frees; a
FineTuneJob with spec.queueName waits Suspended, saying what Kueue says, and starts when quota
frees."""

import json
import uuid

import pytest
import yaml

from conftest import TINY_BERT, get, job_doc, kubectl, wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(600)]

# Per RayJob: head and one worker at 200m/256Mi, plus Kueue's default for KubeRay's submitter
# Job (500m/200Mi): 900m/712Mi, so the quota below admits one at a time.
QUOTA = {"cpu": "1", "memory": "1Gi"}
RESOURCES = {"cpu": "200m", "memory": "256Mi"}


def apply(plane, *docs: dict) -> None:
    kubectl(plane, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))


def rayjob(name: str, namespace: str, queue: str) -> dict:
    def pod(container: str) -> dict:
        resources = {"requests": RESOURCES, "limits": RESOURCES}
        return {"spec": {"containers": [{"name": container, "image": "rayproject/ray:2.60.0", "resources": resources}]}}

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kueue.x-k8s.io/queue-name": queue}},
        "spec": {
            "suspend": True,  # no admission webhook here: the job must arrive suspended
            "entrypoint": "python -c 'print(1)'",
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {
                "headGroupSpec": {"rayStartParams": {}, "template": pod("ray-head")},
                "workerGroupSpecs": [{"groupName": "workers", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                                      "rayStartParams": {}, "template": pod("ray-worker")}],
            },
        },
    }


def queue_for(plane, ns: str, queue: str = "team") -> str:
    """A ClusterQueue with quota for one small RayJob at a time, and a LocalQueue for it in ns."""
    flavor = [{"name": "default", "resources": [{"name": r, "nominalQuota": q} for r, q in QUOTA.items()]}]
    apply(
        plane,
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": ns},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{"coveredResources": list(QUOTA), "flavors": flavor}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": queue, "namespace": ns},
         "spec": {"clusterQueue": ns}},
    )
    return queue


def test_rayjobs_wait_for_quota_and_are_admitted_when_it_frees(controlplane):
    plane = controlplane
    ns = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(plane, "create", "namespace", ns)
    queue = queue_for(plane, ns)
    apply(plane, rayjob("first", ns, queue))

    def suspended(job: str) -> bool:
        return get(plane, ns, "rayjob", job)["spec"].get("suspend", False)  # KubeRay's API omits suspend: false

    def workload(job: str) -> dict | None:
        items = get(plane, ns, "workloads.kueue.x-k8s.io")["items"]
        return next((w for w in items if any(o["name"] == job for o in w["metadata"].get("ownerReferences", []))), None)

    def condition(job: str, kind: str) -> dict:
        return next((c for c in ((workload(job) or {}).get("status") or {}).get("conditions", []) if c["type"] == kind), {})

    wait_for("Kueue to admit the first RayJob and unsuspend it", lambda: not suspended("first"))
    assert condition("first", "Admitted").get("status") == "True"

    apply(plane, rayjob("second", ns, queue))
    pending = wait_for("the second RayJob's Workload to find no quota",
                       lambda: (c := condition("second", "QuotaReserved")).get("status") == "False" and c)
    assert "insufficient unused quota" in pending["message"], pending  # the first one holds it
    assert suspended("second")

    kubectl(plane, "delete", "-n", ns, "rayjob", "first")
    wait_for("Kueue to admit the second RayJob once the first is gone", lambda: not suspended("second"), timeout=60)
    assert condition("second", "Admitted").get("status") == "True", json.dumps(workload("second"), indent=1)


def test_a_queued_finetunejob_waits_saying_why_and_suspend_gives_its_quota_back(controlplane, namespace, tmp_path):
    """Kueue unsuspends whatever it has admitted (and admits a suspended job when quota frees):
    a user's suspend of a queued job holds only if its Workload is deactivated."""
    from test_operator import Operator, apply as apply_job, rayjob_of, until_status

    queue = queue_for(controlplane, namespace)
    small = {"nodes": 1, "cpusPerWorker": 0.2, "memoryPerWorker": "256Mi", "head": {"cpu": "100m", "memory": "256Mi"}}

    def suspend(name: str, value: bool) -> None:
        kubectl(controlplane, "patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"suspend": value}}))

    def admitted(name: str) -> dict:
        return until_status(controlplane, namespace, name, f"{name} admitted", lambda s: s.get("phase") == "Initializing", 90)

    def waiting(name: str) -> dict:
        st = until_status(controlplane, namespace, name, f"{name} queued", lambda s: s.get("reason") == "Queued"
                          and "insufficient unused quota" in s.get("message", ""), 60)
        assert st["phase"] == "Suspended" and f"queue {queue}" in st["message"]
        return st

    op = Operator(controlplane, tmp_path / "operator.log", "--namespace", namespace, "--no-leader-election")
    try:
        for name in ("first", "second"):
            apply_job(controlplane, namespace, job_doc(name, tmp_path, TINY_BERT, queueName=queue, resources=small))
            assert rayjob_of(controlplane, namespace, name)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
            if name == "first":  # admitted: Kueue unsuspends it, and the operator leaves it so
                admitted("first")
        waiting("second")
        assert get(controlplane, namespace, "rayjob", "first")["spec"].get("suspend", False) is False

        suspend("first", True)  # its quota goes to the job that waits
        admitted("second")
        assert get(controlplane, namespace, "rayjob", "first")["spec"]["suspend"] is True  # Kueue had its chance to unsuspend it

        suspend("first", False)  # back in the queue, behind the job that holds the quota now
        waiting("first")
        kubectl(controlplane, "delete", "ftj", "second", "-n", namespace)  # its RayJob goes with it, and its quota
        admitted("first")

        # Created suspended: nothing reaches Kueue, which would admit it.
        apply_job(controlplane, namespace, job_doc("third", tmp_path, TINY_BERT, queueName=queue, resources=small, suspend=True))
        until_status(controlplane, namespace, "third", "third suspended", lambda s: s.get("reason") == "Suspended")
        assert kubectl(controlplane, "get", "rayjob", "third", "-n", namespace, check=False).returncode != 0
    finally:
        assert op.stop() == 0, op.log.read_text()[-3000:]
