"""The chart installed with the real helm into the real control plane, and the operator run as
the chart's ServiceAccount (a TokenRequest token, so it has exactly the chart's RBAC and no
more): cluster-wide and namespaced releases reconcile FineTuneJobs and take the runs' reports
(a TokenReview, the reporting pod), `kubectl auth can-i` shows every right the operator needs
granted and the dangerous ones denied, no Secret among them, and `helm uninstall` leaves no
RBAC behind. There is no kubelet: the Deployment's pods never run, so the
operator runs here, with the Deployment's own arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, TINY_BERT, job_doc, wait_for
from helm import ToolNotFound, helm, kubectl
from test_operator import Operator, apply, drive, events_of, progress, ray_head, rayjob_of, report_of, until_status

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(600)]

CHART = REPO / "charts/finetune-operator"
INSTANCE = "app.kubernetes.io/instance"
FTJ, RAYJOBS, LEASES = "finetunejobs.finetune.dev", "rayjobs.ray.io", "leases.coordination.k8s.io"
TOKENREVIEWS, WORKLOADS = "tokenreviews.authentication.k8s.io", "workloads.kueue.x-k8s.io"


@cache
def tool(name: str) -> str:
    try:
        return str({"helm": helm, "kubectl": kubectl}[name]())
    except ToolNotFound as err:
        pytest.fail(str(err))


def kc(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """kubectl 1.33 (tests/helm.py) with the given kubeconfig."""
    result = subprocess.run([tool("kubectl"), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass
class Release:
    """One helm release of the chart in its own namespace."""

    plane: object
    name: str
    namespace: str
    home: Path  # helm's cache/config/data, so nothing of the user's ~ is read or written
    namespaces: list[str] = field(default_factory=list)  # namespaces this test created
    installed: bool = False

    @property
    def fullname(self) -> str:  # the chart's finetune-operator.fullname
        return self.name if "finetune-operator" in self.name else f"{self.name}-finetune-operator"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, **{f"HELM_{k}_HOME": str(self.home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
        result = subprocess.run([tool("helm"), f"--kubeconfig={self.plane.kubeconfig}", *args],
                                capture_output=True, text=True, timeout=120, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return kc(self.plane.kubeconfig, *args, check=check)

    def create_namespace(self, name: str) -> str:
        self.admin("create", "namespace", name)
        self.namespaces.append(name)
        return name

    def install(self, *values: str) -> str:
        """`helm install` into a new namespace; returns helm's output (with NOTES)."""
        out = self.helm("install", self.name, str(CHART), "-n", self.namespace, "--create-namespace",
                        "--set", "crds.enabled=false", *values, "--timeout", "60s")
        self.namespaces.append(self.namespace)
        self.installed = True
        return out.stdout

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, "-n", self.namespace, "--wait", "--timeout", "60s")
        self.installed = False

    def objects(self) -> set[tuple[str, str, str]]:
        """(kind, namespace, name) of what the release rendered, from helm's stored manifest."""
        docs = yaml.safe_load_all(self.helm("get", "manifest", self.name, "-n", self.namespace).stdout)
        return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs if d}

    def live(self) -> set[tuple[str, str, str]]:
        """(kind, namespace, name) of every object in the cluster labelled with the release."""
        kinds = "deployments,services,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,networkpolicies"
        items = json.loads(self.admin("get", kinds, "-A", "-l", f"{INSTANCE}={self.name}", "-o", "json").stdout)["items"]
        return {(i["kind"], i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in items}

    def deployment_args(self) -> list[str]:
        deploy = json.loads(self.admin("get", "deployment", self.fullname, "-n", self.namespace, "-o", "json").stdout)
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["finetune", "operator"]
        assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == self.fullname
        return container["args"]

    def token_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that authenticates as the chart's ServiceAccount (TokenRequest API)."""
        token = self.admin("create", "token", self.fullname, "-n", self.namespace, "--duration=1h").stdout.strip()
        admin = yaml.safe_load(Path(self.plane.kubeconfig).read_text())
        ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "finetune", "cluster": {"server": self.plane.server, "certificate-authority-data": ca}}],
            "users": [{"name": self.fullname, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "finetune", "user": self.fullname, "namespace": self.namespace}}],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        whoami = json.loads(kc(path, "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
        assert whoami["username"] == self.user, whoami
        return path

    def can_i(self, verb: str, resource: str, namespace: str | None, subresource: str | None = None) -> bool:
        """`kubectl auth can-i` as the ServiceAccount, asked by the admin; namespace None: all (-A)."""
        args = ["auth", "can-i", verb, resource, f"--as={self.user}"]
        args += ["-A"] if namespace is None else ["-n", namespace]
        args += [f"--subresource={subresource}"] if subresource else []
        result = self.admin(*args, check=False)
        if result.returncode not in (0, 1) or result.stdout.strip() not in ("yes", "no"):
            raise AssertionError(f"kubectl {' '.join(args)}: {result.returncode} {result.stdout} {result.stderr}")
        return result.returncode == 0


@pytest.fixture
def releases(controlplane, tmp_path):
    """Makes Releases; uninstalls what is still installed and deletes their namespaces after."""
    made: list[Release] = []

    def make(prefix: str = "fto") -> Release:
        release = Release(controlplane, unique(prefix), unique(f"{prefix}-system"), tmp_path / f"helm-{len(made)}")
        made.append(release)
        return release

    yield make
    for release in made:
        if release.installed:
            release.helm("uninstall", release.name, "-n", release.namespace, check=False)
        for ns in release.namespaces:
            release.admin("delete", "namespace", ns, "--wait=false", check=False)


def expected_objects(release: Release, watched: list[str]) -> set[tuple[str, str, str]]:
    name, ns = release.fullname, release.namespace
    common = {("Deployment", ns, name), ("ServiceAccount", ns, name), ("Service", ns, f"{name}-metrics"),
              ("Service", ns, f"{name}-reports"), ("ClusterRole", "", f"{name}-tokenreview"),
              ("ClusterRoleBinding", "", f"{name}-tokenreview"),
              ("Role", ns, f"{name}-leader-election"), ("RoleBinding", ns, f"{name}-leader-election")}
    if not watched:
        return common | {("ClusterRole", "", name), ("ClusterRoleBinding", "", name)}
    return common | {(kind, w, name) for w in watched for kind in ("Role", "RoleBinding")}


def run_operator_as_the_chart(release: Release, tmp_path: Path) -> Operator:
    """`finetune operator` with the Deployment's arguments (but free loopback metrics and report
    ports and a short poll), authenticated as the chart's ServiceAccount."""
    args = release.deployment_args()
    lease = next(a.split("=", 1)[1] for a in args if a.startswith("--lease-name="))
    assert f"--lease-namespace={release.namespace}" in args and "--log-format=json" in args
    kept = [a for a in args if not a.startswith(("--metrics-address=", "--report-address=", "--poll-seconds="))]
    identity = SimpleNamespace(kubeconfig=release.token_kubeconfig(tmp_path / f"{release.name}.kubeconfig"))
    return Operator(identity, tmp_path / f"{release.name}.log", *kept, lease=lease)


def forbidden(log: Path) -> list[str]:
    """The operator's log messages (JSON lines) about a request the apiserver refused by RBAC.
    Not an Event refused in a namespace being deleted (a 403 too, NamespaceTerminating): a
    clusterwide operator sees the jobs other tests leave to their namespaces' deletion."""
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines() if line.strip()]
    return [m for m in messages if re.search(r"forbidden|\b403\b", m, re.IGNORECASE) and "NamespaceTerminating" not in m]


def reconciles_as_the_chart(release: Release, namespace: str, tmp_path: Path) -> None:
    """The operator, run as the chart describes it: a plain job becomes a RayJob with a status
    and an Event; a run's report (checked by TokenReview and the reporting pod) reaches the
    status; it stops cleanly and the apiserver refused it nothing."""
    op = run_operator_as_the_chart(release, tmp_path)
    try:
        _reconciles(release, op, namespace, tmp_path)
    except AssertionError as err:
        refused = "\n".join(m[:300] for m in forbidden(op.log)[:4])
        raise AssertionError(f"{err}\nrequests the apiserver refused the operator:\n{refused or '(none)'}") from None
    finally:
        assert op.stop() == 0, op.log.read_text()[-3000:]
    assert forbidden(op.log) == []


def _reconciles(release: Release, op: Operator, namespace: str, tmp_path: Path) -> None:
    plane = release.plane
    job = apply(plane, namespace, job_doc("plain", tmp_path, TINY_BERT))
    rayjob_of(plane, namespace, "plain")
    until_status(plane, namespace, "plain", "phase Initializing", lambda s: s.get("phase") == "Initializing")
    wait_for("the Initializing Event", lambda: ("Normal", "Initializing") in events_of(plane, namespace, "plain"), 15)

    drive(plane, namespace, "plain", jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName="plain-rc")
    token = ray_head(plane, namespace, "plain", "plain-rc")
    code, text, _ = op.report(token, report_of(job, progress(40)))
    assert code == 200, text
    until_status(plane, namespace, "plain", "Running at step 40", lambda s: s.get("progress", {}).get("step") == 40)

    lease = json.loads(release.admin("get", "lease", release.fullname, "-n", release.namespace, "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"].endswith(str(op.proc.pid))


def uninstalls_cleanly(release: Release) -> None:
    release.uninstall()
    assert release.live() == set()
    assert release.helm("list", "-n", release.namespace, "-q").stdout.strip() == ""
    # The CRD (crds.enabled=false: never the release's) and the FineTuneJobs stay.
    release.admin("get", "crd", FTJ)


def test_a_clusterwide_release_reconciles_with_exactly_the_charts_rbac(releases, namespace, tmp_path):
    release = releases()
    notes = release.install()
    assert "WARNING: the RayJob CRD" not in notes  # .Capabilities saw KubeRay's CRD
    assert release.objects() == expected_objects(release, []) == release.live()

    reconciles_as_the_chart(release, namespace, tmp_path)
    # A clean stop hands the Lease over: get and update on it are granted.
    lease = json.loads(release.admin("get", "lease", release.fullname, "-n", release.namespace, "-o", "json").stdout)
    assert not lease["spec"].get("holderIdentity")

    uninstalls_cleanly(release)


def test_a_namespaced_release_reconciles_in_its_namespaces(releases, tmp_path):
    release = releases("ftn")
    a, b = release.create_namespace(unique("team-a")), release.create_namespace(unique("team-b"))
    release.install("--set", f"watchNamespaces={{{a},{b}}}")
    assert release.objects() == expected_objects(release, [a, b]) == release.live()
    assert [x for x in release.deployment_args() if x.startswith("--namespace")] == [f"--namespace={a}", f"--namespace={b}"]

    reconciles_as_the_chart(release, b, tmp_path)

    uninstalls_cleanly(release)


# What the operator does in each namespace it watches: (verb, resource, subresource).
NEEDED = [
    *[(verb, FTJ, None) for verb in ("get", "list", "watch", "patch")],
    ("patch", FTJ, "status"),
    *[(verb, RAYJOBS, None) for verb in ("get", "list", "watch", "create", "patch")],
    *[(verb, "pods", None) for verb in ("get", "list", "watch")],
    ("list", WORKLOADS, None),
    ("patch", WORKLOADS, None),
    ("create", "events", None),
]
# Never, in any namespace nor across all of them: runs report their progress themselves, so
# the operator reads no Secret (and no bucket).
DENIED = [
    ("get", "secrets", None), ("list", "secrets", None), ("watch", "secrets", None), ("create", "pods", "exec"),
    ("create", "roles.rbac.authorization.k8s.io", None), ("create", "rolebindings.rbac.authorization.k8s.io", None),
    ("delete", FTJ, None), ("update", FTJ, None), ("delete", RAYJOBS, None), ("delete", LEASES, None),
]
# Never; cluster-scoped.
DENIED_CLUSTER = [
    ("create", "clusterroles.rbac.authorization.k8s.io", None), ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None), ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
]


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_rbac_is_least_privilege(releases, mode):
    """`kubectl auth can-i --as=<the ServiceAccount>` (namespace None: all namespaces)."""
    release = releases(f"ftr{mode[0]}")
    other = unique("other")  # a namespace no release watches (can-i needs no Namespace object)
    if mode == "clusterwide":
        watched, unwatched = [unique("anywhere"), release.namespace], []
        release.install()
    else:
        watched = [release.create_namespace(unique("team-a")), release.create_namespace(unique("team-b"))]
        unwatched = [other, release.namespace]
        release.install("--set", f"watchNamespaces={{{','.join(watched)}}}")
    lease = f"{LEASES}/{release.fullname}"

    allowed = [(v, r, ns, s) for ns in watched for v, r, s in NEEDED]
    allowed += [("create", LEASES, release.namespace, None), ("get", lease, release.namespace, None),
                ("update", lease, release.namespace, None), ("create", TOKENREVIEWS, None, None)]
    denied = [(v, r, ns, s) for ns in (watched[0], other, None) for v, r, s in DENIED]
    denied += [(v, r, None, s) for v, r, s in DENIED_CLUSTER]
    # The Lease: only the release's own, only in the release namespace.
    denied += [("update", lease, ns, None) for ns in ("default", other)]
    denied += [(verb, f"{LEASES}/another", release.namespace, None) for verb in ("get", "update")]
    if mode == "clusterwide":  # FineTuneJobs and RayJobs of every namespace, one watch each
        allowed += [(v, r, None, None) for v in ("list", "watch") for r in (FTJ, RAYJOBS)]
    else:  # nothing outside the watched namespaces, Secrets included
        denied += [(v, r, ns, s) for ns in (*unwatched, None) for v, r, s in NEEDED]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: release.can_i(*c), allowed + denied))

    def show(check):
        verb, resource, ns, sub = check
        return f"{verb} {resource}{'/' + sub if sub else ''} in {ns or 'all namespaces'}"

    assert [show(c) for c, yes in zip(allowed, answers[: len(allowed)]) if not yes] == [], "needed but denied"
    assert [show(c) for c, yes in zip(denied, answers[len(allowed):]) if yes] == [], "granted but never needed"

    release.uninstall()
    assert not release.can_i("get", FTJ, watched[0])  # the bindings went with the release
