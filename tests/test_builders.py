"""FineTuneJob → RayJob, the pure builder the operator applies: table tests, no cluster."""

import copy

import pytest

from conftest import TINY_LLAMA, job_doc
from finetune_api.spec import parse_job
from finetune_operator.builders import DEFAULT_IMAGE, RESTRICTED, build_rayjob, owned_by, spec_patch

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
    assert (spec["suspend"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["shutdownAfterJobFinishes"]) == (False, 0, 3600, True)
    assert "activeDeadlineSeconds" not in spec
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    for pod in pods(rj).values():
        assert set(pod) == {"containers"}  # no scheduling fields unless the spec sets them
        (c,) = pod["containers"]
        assert c["image"] == DEFAULT_IMAGE and c["securityContext"] == RESTRICTED and "env" not in c
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


@pytest.mark.parametrize(
    "spec, rayjob_spec",
    [
        ({"suspend": True}, {"suspend": True}),
        ({"retries": 3}, {"backoffLimit": 3}),
        ({"activeDeadlineSeconds": 7200}, {"activeDeadlineSeconds": 7200}),
        ({"ttlSecondsAfterFinished": 0}, {"ttlSecondsAfterFinished": 0}),
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
    assert worker["limits"] == {"cpu": "48", "memory": "64Gi", "nvidia.com/gpu": "8"}
    assert "nvidia.com/gpu" not in p["head"]["containers"][0]["resources"]["limits"]
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4


def defaulted(rj):
    """The RayJob as the apiserver and KubeRay hand it back: defaults and status added."""
    out = copy.deepcopy(rj)
    out["spec"]["submissionMode"] = "K8sJobMode"
    out["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] = "Always"
    out["metadata"].update(uid="rj-uid", resourceVersion="7")
    del out["spec"]["suspend"], out["spec"]["backoffLimit"]  # KubeRay's writes drop zero values (Go omitempty)
    out["status"] = {"jobDeploymentStatus": "Running"}
    return out


@pytest.mark.parametrize(
    "change, changed",
    [
        ({}, set()),  # only defaults differ: nothing to write
        ({"suspend": True}, {"spec.suspend"}),
        ({"resources": {"nodes": 3}}, {"spec.rayClusterSpec.workerGroupSpecs[0].replicas", "spec.rayClusterSpec.workerGroupSpecs[0].minReplicas",
                                       "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas"}),
        ({"scheduling": {"priorityClassName": "batch-high"}}, {"spec.rayClusterSpec.headGroupSpec.template.spec.priorityClassName",
                                                               "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.priorityClassName"}),
    ],
)
def test_an_existing_rayjob_is_patched_only_when_the_spec_moved(tmp_path, change, changed):
    observed = defaulted(rayjob(tmp_path))
    desired = rayjob(tmp_path, **change)
    patch, paths = spec_patch(desired, observed)
    assert set(paths) - {"spec.entrypoint"} == changed  # the entrypoint carries the whole spec
    assert patch == ({"spec": desired["spec"]} if changed else None)


def test_a_rayjob_is_ours_only_through_its_controller_reference(tmp_path):
    rj = rayjob(tmp_path)
    assert owned_by(rj, UID) and not owned_by(rj, "another-uid")
    rj["metadata"]["ownerReferences"][0]["controller"] = False
    assert not owned_by(rj, UID)
