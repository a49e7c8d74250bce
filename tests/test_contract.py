"""The spec the operator hands a RayJob is the spec the training program trains."""

import json
import shlex

import pytest

from conftest import EXAMPLES

from finetune_api.spec import StorageSpec, TrackingSpec, load_manifests
from finetune_operator.builders import build_rayjob
from finetune_train.__main__ import parse_args

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("manifest", EXAMPLES, ids=lambda p: p.stem)
def test_rayjob_entrypoint_parses_back_to_the_same_job(manifest):
    (job,) = load_manifests(manifest)
    job.metadata.namespace, job.metadata.uid = "team-a", "0b7c2f3e-uid"
    argv = shlex.split(build_rayjob(job)["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "finetune_train"]
    parsed = parse_args(argv[3:])
    assert parsed.spec == job.spec
    assert parsed.spec.model_dump() == job.spec.model_dump()
    assert (parsed.metadata.name, parsed.metadata.namespace, parsed.metadata.uid) == (job.name, "team-a", "0b7c2f3e-uid")
    assert parsed.run_name == job.run_name == f"{job.name}-0b7c2f3e"  # every attempt continues one run


def test_s3_credentials_reach_every_pod_only_as_secret_references():
    (job,) = load_manifests(EXAMPLES[0])
    job.spec.storage = StorageSpec(
        uri="s3://models/ft", endpoint="http://minio:9000",
        credentials_secret={"name": "s3-creds", "accessKeyIdKey": "user", "secretAccessKeyKey": "password"},
    )
    rayjob = build_rayjob(job)
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert [e for e in container["env"] if "valueFrom" in e] == [
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "user"}}},
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "password"}}},
        ]
        assert all("creds" not in json.dumps(e) for e in container["env"] if "valueFrom" not in e)
    job.spec.storage = StorageSpec(uri="s3://models/ft")  # no Secret: the pods' own identity (IRSA etc.)
    (container,) = build_rayjob(job)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert [e["name"] for e in container["env"]] == ["FINETUNE_IMAGE"]  # what tracking tags runs with


def test_mlflow_credentials_reach_the_pods_only_as_optional_secret_references():
    (job,) = load_manifests(EXAMPLES[0])
    job.spec.tracking = TrackingSpec(mlflow={"trackingUri": "http://mlflow:5000", "credentialsSecret": {"name": "mlflow"}})
    (container,) = build_rayjob(job)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs == {var: {"name": "mlflow", "key": var, "optional": True}
                    for var in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"minilm-sentiment", "smollm2-lora-sft", "tiny-zero3-full", "efficientnet-fashion-mnist", "smollm2-dpo"}
