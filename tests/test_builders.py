"""FineTuneJob → RayJob, the pure builder the operator applies: table tests, no cluster."""

import copy

import pytest

from conftest import TINY_LLAMA, job_doc
from finetune_api.spec import SpecError, parse_job
from finetune_operator.builders import DEFAULT_IMAGE, REPORT_TOKEN_DIR, RESTRICTED, Settings, as_applier, build_rayjob, controller, needs_apply

pytestmark = pytest.mark.unit

UID = "6c1e0b8a-3d0f-4c52-9d7e-2b8f7f0f1a11"


def rayjob(tmp_path, **spec):
    doc = job_doc("sft", tmp_path, TINY_LLAMA, **spec)
    doc["metadata"].update(namespace="team-a", uid=UID)
    return build_rayjob(parse_job(doc))


def pods(rj):
    cluster = rj["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": cluster["workerGroupSpecs"][0]["template"]["spec"]}


def test_defaults(tmp_path):
    rj = rayjob(tmp_path)
    assert rj["metadata"]["name"] == "sft" and rj["metadata"]["namespace"] == "team-a"
    (owner,) = rj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("FineTuneJob", "sft", UID, True)
    spec = rj["spec"]
    assert (spec["suspend"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["shutdownAfterJobFinishes"]) == (False, 0, 0, True)
    assert "activeDeadlineSeconds" not in spec
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    for pod in pods(rj).values():
        assert set(pod) == {"containers", "volumes", "terminationGracePeriodSeconds"}  # no scheduling fields unless set
        assert pod["terminationGracePeriodSeconds"] == 120 + 30  # gracePeriodSeconds + the margin
        (c,) = pod["containers"]
        assert c["image"] == DEFAULT_IMAGE and c["securityContext"] == RESTRICTED and c["env"] == [{"name": "FINETUNE_IMAGE", "value": DEFAULT_IMAGE}]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert c["volumeMounts"] == [{"name": "shm", "mountPath": "/dev/shm"}]
    # Every Ray pod's preStop hook hands SIGTERM to the training driver and waits for the checkpoint.
    for pod in pods(rj).values():
        assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "finetune_train.prestop"]
    # A head that fits beside two 1-CPU workers on a small node; CPU unlimited, memory limited.
    assert pods(rj)["head"]["containers"][0]["resources"] == {"requests": {"cpu": "250m", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert pods(rj)["worker"]["containers"][0]["resources"] == {"requests": {"cpu": "1"}}  # nothing to limit without memoryPerWorker


@pytest.mark.parametrize(
    "resources, head, worker",
    [
        ({}, {"medium": "Memory", "sizeLimit": "4Gi"}, {"medium": "Memory"}),  # no worker memory limit: none on /dev/shm
        ({"memoryPerWorker": "16Gi", "head": {"memory": "3Gi"}}, {"medium": "Memory", "sizeLimit": "3Gi"},
         {"medium": "Memory", "sizeLimit": "16Gi"}),
    ],
)
def test_dev_shm_is_memory_sized_to_the_memory_limit(tmp_path, resources, head, worker):
    p = pods(rayjob(tmp_path, resources=resources))
    assert [v["emptyDir"] for v in p["head"]["volumes"]] == [head]
    assert [v["emptyDir"] for v in p["worker"]["volumes"]] == [worker]


def test_head_resources_and_termination_grace_come_from_the_spec(tmp_path):
    rj = rayjob(tmp_path, resources={"head": {"cpu": "1", "memory": "4Gi"}}, checkpointing={"gracePeriodSeconds": 600})
    assert pods(rj)["head"]["containers"][0]["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert {pod["terminationGracePeriodSeconds"] for pod in pods(rj).values()} == {630}


@pytest.mark.parametrize(
    "spec, rayjob_spec",
    [
        ({"suspend": True}, {"suspend": True}),
        ({"retries": 3}, {"backoffLimit": 3}),
        ({"activeDeadlineSeconds": 7200}, {"activeDeadlineSeconds": 7200}),
        ({"ttlSecondsAfterFinished": 600}, {"ttlSecondsAfterFinished": 600}),
    ],
)
def test_lifecycle_fields(tmp_path, spec, rayjob_spec):
    rj = rayjob(tmp_path, **spec)
    assert {k: rj["spec"][k] for k in rayjob_spec} == rayjob_spec


def test_gpus_scheduling_and_image_reach_the_pods(tmp_path):
    scheduling = {
        "nodeSelector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "priorityClassName": "training-high",
    }
    rj = rayjob(tmp_path, image="registry.local/trainer:dev", scheduling=scheduling,
                resources={"nodes": 4, "gpusPerNode": 8, "cpusPerWorker": 6, "memoryPerWorker": "64Gi"})
    p = pods(rj)
    for pod in p.values():
        assert pod["nodeSelector"] == scheduling["nodeSelector"] and pod["tolerations"] == scheduling["tolerations"]
        assert pod["affinity"] == scheduling["affinity"] and pod["priorityClassName"] == "training-high"
        assert pod["containers"][0]["image"] == "registry.local/trainer:dev"
    worker = p["worker"]["containers"][0]["resources"]
    assert worker["requests"]["cpu"] == "48" and worker["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "8"}
    assert "nvidia.com/gpu" not in p["head"]["containers"][0]["resources"]["limits"]
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4


def test_a_rayjob_is_ours_only_through_its_controller_reference(tmp_path):
    rj = rayjob(tmp_path)
    assert controller(rj) == UID
    rj["metadata"]["ownerReferences"][0]["controller"] = False
    assert controller(rj) == ""


# ---- applying: the spec hash


@pytest.mark.parametrize(
    "change, moves",
    [
        ({}, False),
        ({"suspend": True}, True),
        ({"resources": {"nodes": 3}}, True),
        ({"scheduling": {"priorityClassName": "batch-high"}}, True),
        ({"resources": {"head": {"cpu": "500m"}}}, True),
        ({"podTemplate": {"labels": {"team": "a"}}}, True),
        ({"queueName": "gpu"}, True),
    ],
)
def test_the_rayjob_is_applied_again_only_when_the_desired_spec_moved(tmp_path, change, moves):
    applied = rayjob(tmp_path)
    # What the apiserver and KubeRay hand back: defaults, canonical quantities, status. Only
    # the hash of what was applied decides.
    observed = copy.deepcopy(applied)
    observed["spec"]["submissionMode"] = "K8sJobMode"
    observed["status"] = {"jobDeploymentStatus": "Running"}
    assert needs_apply(rayjob(tmp_path, **change), observed) == moves
    assert needs_apply(applied, None)


CREATED = {"manager": "us", "operation": "Update", "apiVersion": "ray.io/v1", "fieldsV1": {"f:metadata": {}, "f:spec": {"f:a": {}}}}
APPLIED = {"manager": "us", "operation": "Apply", "apiVersion": "ray.io/v1", "fieldsV1": {"f:spec": {"f:b": {".": {}}}}}
KUEUE = {"manager": "kueue", "operation": "Update", "fieldsV1": {"f:spec": {"f:suspend": {}}}}
STATUS = {"manager": "us", "operation": "Update", "subresource": "status", "fieldsV1": {"f:status": {}}}


@pytest.mark.parametrize(
    "managed, patch",
    [
        ([], []),
        ([APPLIED, KUEUE, STATUS], []),  # ours already as an applier's; a status entry is not the object's
        ([KUEUE, CREATED], [{"op": "test", "path": "/metadata/managedFields/1", "value": CREATED},
                            {"op": "replace", "path": "/metadata/managedFields/1/operation", "value": "Apply"}]),
        # Applied before the create was folded (a create that met a RayJob made in the instant before):
        # one entry owning both, the apply's entry kept in place (replaced before the remove shifts it).
        ([APPLIED, KUEUE, CREATED], [
            {"op": "test", "path": "/metadata/managedFields/2", "value": CREATED},
            {"op": "test", "path": "/metadata/managedFields/0", "value": APPLIED},
            {"op": "replace", "path": "/metadata/managedFields/0/fieldsV1",
             "value": {"f:metadata": {}, "f:spec": {"f:a": {}, "f:b": {".": {}}}}},
            {"op": "remove", "path": "/metadata/managedFields/2"}]),
    ],
)
def test_the_fields_a_create_wrote_become_the_appliers(managed, patch):
    assert as_applier(managed, "us") == patch


def test_a_run_that_failed_for_good_is_not_retried(tmp_path):
    assert rayjob(tmp_path, retries=3)["spec"]["backoffLimit"] == 3
    doc = job_doc("sft", tmp_path, TINY_LLAMA, retries=3)
    doc["metadata"].update(namespace="team-a", uid=UID)
    assert build_rayjob(parse_job(doc), give_up=True)["spec"]["backoffLimit"] == 0


# ---- reports, pod templates, queues


def test_with_a_report_url_every_pod_gets_it_and_a_projected_token_for_the_operator_only(tmp_path):
    doc = job_doc("sft", tmp_path, TINY_LLAMA)
    doc["metadata"].update(namespace="team-a", uid=UID)
    rj = build_rayjob(parse_job(doc), Settings(report_url="http://op.ns.svc:8081/v1/progress"))
    for pod in pods(rj).values():
        (c,) = pod["containers"]
        assert {e["name"]: e["value"] for e in c["env"]} == {"FINETUNE_IMAGE": DEFAULT_IMAGE,
            "FINETUNE_STATUS_URL": "http://op.ns.svc:8081/v1/progress", "FINETUNE_STATUS_TOKEN_FILE": f"{REPORT_TOKEN_DIR}/token"}
        (volume,) = [v for v in pod["volumes"] if v["name"] == "finetune-report"]
        assert volume["projected"]["sources"] == [{"serviceAccountToken": {"audience": "finetune-operator", "expirationSeconds": 3600, "path": "token"}}]
        assert {"name": "finetune-report", "mountPath": REPORT_TOKEN_DIR, "readOnly": True} in c["volumeMounts"]


POD_TEMPLATE = {
    "labels": {"team": "vision"}, "annotations": {"sidecar.istio.io/inject": "false"},
    "serviceAccountName": "trainer", "imagePullSecrets": [{"name": "regcred"}],
    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "envFrom": [{"configMapRef": {"name": "proxy"}}],
    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}],
    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
}


def test_a_pod_template_reaches_head_and_workers_beside_what_the_operator_needs(tmp_path):
    rj = rayjob(tmp_path, podTemplate=POD_TEMPLATE, storage={"uri": "s3://b/runs", "credentialsSecret": {"name": "s3"}})
    cluster = rj["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        meta, pod = template["metadata"], template["spec"]
        assert meta["labels"]["team"] == "vision" and meta["labels"]["finetune.dev/job"] == "sft"
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert pod["serviceAccountName"] == "trainer" and pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert [v["name"] for v in pod["volumes"]] == ["shm", "data"]
        (c,) = pod["containers"]
        assert [e["name"] for e in c["env"]] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FINETUNE_IMAGE", "HF_TOKEN"]
        assert c["env"][-1]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
        assert c["envFrom"] == [{"configMapRef": {"name": "proxy"}}]
        assert c["volumeMounts"][1:] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
        assert c["securityContext"] == RESTRICTED  # kept: the template did not replace it


def test_a_pod_template_env_var_of_a_name_the_operator_sets_replaces_it(tmp_path):
    """The CRD keys a container's env by name: a second AWS_ACCESS_KEY_ID would fail every apply."""
    mine = {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "id"}}}
    rj = rayjob(tmp_path, podTemplate={"env": [mine]}, storage={"uri": "s3://b/runs", "credentialsSecret": {"name": "s3"}})
    for p in pods(rj).values():
        env = p["containers"][0]["env"]
        assert [e["name"] for e in env] == ["AWS_SECRET_ACCESS_KEY", "FINETUNE_IMAGE", "AWS_ACCESS_KEY_ID"] and env[-1] == mine


def test_a_pod_template_replaces_the_security_context_only_explicitly(tmp_path):
    mine = {"runAsUser": 0, "runAsNonRoot": False}
    p = pods(rayjob(tmp_path, podTemplate={"securityContext": mine, "podSecurityContext": {"fsGroup": 1000}}))
    for pod in p.values():
        assert pod["containers"][0]["securityContext"] == mine and pod["securityContext"] == {"fsGroup": 1000}


@pytest.mark.parametrize(
    "template, field",
    [
        ({"env": [{"name": "FINETUNE_STATUS_URL", "value": "x"}]}, "env"),
        ({"volumes": [{"name": "shm", "emptyDir": {}}]}, "volumes"),
        ({"volumeMounts": [{"name": "nowhere", "mountPath": "/x"}]}, "volumeMounts"),
        ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/dev/shm"}]}, "volumeMounts"),
        ({"labels": {"finetune.dev/job": "other"}}, "labels"),
        ({"env": [{"value": "no name"}]}, "env.0.name"),
    ],
)
def test_a_pod_template_may_not_take_what_the_operator_needs(tmp_path, template, field):
    with pytest.raises(SpecError) as err:
        rayjob(tmp_path, podTemplate=template)
    assert any(line.startswith(f"spec.podTemplate.{field}:") for line in err.value.errors), err.value.errors


def test_a_queued_job_starts_suspended_and_then_leaves_suspend_to_kueue(tmp_path):
    doc = job_doc("sft", tmp_path, TINY_LLAMA, queueName="gpu-queue")
    doc["metadata"].update(namespace="team-a", uid=UID)
    job = parse_job(doc)
    new = build_rayjob(job)
    assert new["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue" and new["spec"]["suspend"] is True
    admitted = {**new, "spec": {**new["spec"], "suspend": False}}  # Kueue unsuspended it
    assert build_rayjob(job, observed=admitted)["spec"]["suspend"] is False  # Kueue's to flip once it exists
    assert build_rayjob(job, observed=new)["spec"]["suspend"] is True
    job.spec.suspend = True
    assert build_rayjob(job, observed=admitted)["spec"]["suspend"] is True  # the user's suspend still holds
    assert "kueue.x-k8s.io/queue-name" not in rayjob(tmp_path)["metadata"]["labels"]
