"""Against a real control plane (etcd + kube-apiserver + kube-controller-manager + KubeRay's
operator, built from Go modules by infra/build-controlplane.sh; see the `controlplane`
fixture in conftest.py): the CRD installs, the examples apply, the apiserver rejects what
`finetune validate` rejects naming the same field, and immutable fields stay immutable.
KubeRay turning our RayJob into a Ray cluster is the e2e tier's, on a real node (test_e2e.py)."""

import json

import pytest
import yaml

from conftest import EXAMPLES, REPO, get, kubectl
from finetune_api.spec import SpecError, load_manifests
from test_spec import BASE, MALFORMED

# The session fixture's first use may build the binaries (cold: about a quarter of an
# hour on 2 cores), and pytest-timeout counts fixture set-up against the first test.
pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(2700)]

# Cases only the client names the field of: a manifest of another group/version or kind is
# not a FineTuneJob to the apiserver at all (kubectl answers "no matches for kind").
CLIENT_ONLY = {"wrong-apiVersion", "wrong-kind"}


def test_crds_are_established(controlplane):
    names = kubectl(controlplane, "get", "crd", "-o", "name").stdout.split()
    for crd in ("finetunejobs.finetune.dev", "rayjobs.ray.io", "rayclusters.ray.io"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}" in names


def test_examples_apply_and_print_columns(controlplane, namespace):
    result = kubectl(controlplane, "apply", "-n", namespace, "-f", str(REPO / "examples"))
    expected = sorted(job.name for path in EXAMPLES for job in load_manifests(path))
    assert len(expected) == 6  # every example is a FineTuneJob
    for name in expected:
        assert f"finetunejob.finetune.dev/{name} created" in result.stdout
    table = kubectl(controlplane, "get", "ftj", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"]
    assert sorted(line.split()[0] for line in table[1:]) == expected
    # The apiserver filled the schema's defaults, as the models do.
    job = get(controlplane, namespace, "ftj", "minilm-sentiment")
    assert job["spec"]["deepspeed"]["zeroStage"] == load_manifests(REPO / "examples" / "minilm-sentiment.yaml")[0].spec.deepspeed.zero_stage


@pytest.mark.parametrize(("case", "doc", "field"), [c[:3] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_rejected_by_validate_and_apiserver(controlplane, namespace, tmp_path, case, doc, field):
    """The same table as test_spec: `finetune validate` and the apiserver both reject the
    manifest, and both name the field."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SpecError) as info:
        load_manifests(path)
    assert any(e.split(": ", 1)[0] == field for e in info.value.errors), info.value.errors
    result = kubectl(controlplane, "apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"the apiserver accepted {case}:\n{result.stdout}"
    if case in CLIENT_ONLY:
        assert "no matches for kind" in result.stderr, result.stderr
        return
    # As an error's path ("spec.x: ..."), an unknown field ('unknown field "spec.x"'), or
    # the subject of a whole-object rule's message ("Invalid value: metadata.name must ...").
    assert any(f in result.stderr for f in (f"{field}: ", f'"{field}"', f"Invalid value: {field} ")), result.stderr
    assert not get(controlplane, namespace, "ftj")["items"]


def test_the_apiserver_rejects_at_least_15_malformed_manifests():
    assert len([c for c in MALFORMED if c[0] not in CLIENT_ONLY]) >= 15


def test_immutable_fields_cannot_change_but_resources_can(controlplane, namespace):
    kubectl(controlplane, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(BASE))
    for change in (
        {"training": {"lr": 0.5}},
        {"model": {"source": "org/other-model"}},
        {"dataset": {"train": "s3://bucket/other.jsonl"}},
        {"method": {"type": "lora"}},
    ):
        (section,) = change
        result = kubectl(
            controlplane, "patch", "ftj", "sentiment", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": change}), check=False
        )
        assert result.returncode != 0, f"spec.{section} changed: {result.stdout}"
        assert f"spec.{section}" in result.stderr and "immutable" in result.stderr, result.stderr
    kubectl(controlplane, "patch", "ftj", "sentiment", "-n", namespace, "--type=merge", "-p", '{"spec":{"resources":{"nodes":3}}}')
    job = get(controlplane, namespace, "ftj", "sentiment")
    assert job["spec"]["resources"]["nodes"] == 3
    assert job["spec"]["training"].get("lr") != 0.5
