"""The operator (`finetune operator`, a real subprocess) against the real control plane: the
examples become RayJobs that KubeRay turns into RayClusters and pods shaped by podTemplate;
status, conditions, progress, metrics and Events follow RayJob status driven as KubeRay writes
it and progress reports pushed as the runs push them (a pod's projected token, checked with a
TokenReview); the real RayJob entrypoint refusing invalid input, with no second attempt;
pods that cannot start; suspend/resume, retry, delete; an operator killed while creating 50
jobs; leader election and the followers' redirect; /metrics and /healthz."""

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, KUBECTL, KUBERAY_NAMESPACE, S3_KEY_ID, S3_SECRET, TINY_BERT, get, job_doc, kubectl, wait_for
from finetune_cli.controlplane import free_port
from finetune_api.spec import load_manifests
from finetune_operator.builders import MANAGED_BY

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(600)]


class Operator:
    """`finetune operator` as a subprocess, with its own log, metrics and report ports and Lease."""

    def __init__(self, plane, log: Path, *args: str, lease: str = "finetune-operator-test"):
        self.log, self.port, self.report_port = log, free_port(), free_port()
        self.report_url = f"http://127.0.0.1:{self.report_port}/v1/progress"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_cli.main", "operator", "--poll-seconds", "0.5",
             "--metrics-address", f"127.0.0.1:{self.port}", "--report-address", f"127.0.0.1:{self.report_port}",
             "--report-url", self.report_url, "--advertise-url", self.report_url,
             "--lease-name", lease, "--lease-namespace", "default", *args],
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )
        wait_for("the operator's /healthz", lambda: self.proc.poll() is None and self.get("/healthz") == "ok", 60)

    def get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if self.proc.poll() is not None:
                raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}") from None
            return None

    def metric(self, name: str, /, **labels) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(self.get("/metrics") or "") for s in f.samples]
        return next((s.value for s in samples if s.name == name and s.labels == labels), None)

    def report(self, token: str, doc: dict) -> tuple[int, str, str | None]:
        """POSTs a progress report as a run does: (status code, body, Location)."""
        request = urllib.request.Request(self.report_url, data=json.dumps(doc).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode(), None
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), err.headers.get("Location")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def operator(controlplane, namespace, tmp_path):
    op = Operator(controlplane, tmp_path / "operator.log", "--namespace", namespace, "--namespace", KUBERAY_NAMESPACE)
    yield op
    assert op.stop() == 0, op.log.read_text()[-3000:]


def apply(plane, namespace: str, doc: dict) -> dict:
    kubectl(plane, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
    return get(plane, namespace, "ftj", doc["metadata"]["name"])


def rayjob_of(plane, namespace: str, name: str, timeout: float = 30) -> dict:
    def fetch():
        result = kubectl(plane, "get", "rayjob", name, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    return wait_for(f"RayJob {namespace}/{name}", fetch, timeout)


def drive(plane, namespace: str, name: str, **status) -> None:
    """Writes RayJob status as KubeRay would (KubeRay does not act in this namespace)."""
    kubectl(plane, "patch", "rayjob", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))


def status_of(plane, namespace: str, name: str, kind: str = "ftj") -> dict:
    return get(plane, namespace, kind, name).get("status", {})


def until_status(plane, namespace: str, name: str, what: str, check, timeout: float = 30, kind: str = "ftj") -> dict:
    def ok():
        status = status_of(plane, namespace, name, kind)
        return status if check(status) else None

    try:
        return wait_for(what, ok, timeout)
    except AssertionError:
        raise AssertionError(f"{what}; status is {json.dumps(status_of(plane, namespace, name, kind), indent=1)}") from None


def events_of(plane, namespace: str, name: str) -> list[tuple[str, str]]:
    items = get(plane, namespace, "events", "--field-selector", f"involvedObject.name={name},involvedObject.kind=FineTuneJob")["items"]
    return [(e["type"], e["reason"]) for e in sorted(items, key=lambda e: (e["metadata"]["creationTimestamp"], e["metadata"]["resourceVersion"]))]


def owned(plane, namespace: str, kind: str, owner_uid: str) -> list[dict]:
    items = get(plane, namespace, kind)["items"]
    return [o for o in items if any(r["uid"] == owner_uid for r in o["metadata"].get("ownerReferences", []))]


def s3_job(name: str, tmp_path, endpoint: str, secret: str = "s3-credentials", **spec) -> dict:
    return job_doc(name, tmp_path, TINY_BERT, storage={"uri": "s3://ftj/runs", "endpoint": endpoint, "credentialsSecret": {"name": secret}}, **spec)


def create_secret(plane, namespace: str, name: str = "s3-credentials") -> None:
    data = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    kubectl(plane, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(secret))


def ray_head(plane, namespace: str, name: str, cluster: str, kind: str = "job") -> str:
    """A Ray head pod of the job's cluster, as KubeRay makes it (no kubelet runs it), and a
    token bound to it for the operator's audience, as the kubelet projects it: what a run
    reports with."""
    labels = {**MANAGED_BY, f"finetune.dev/{kind}": name, "ray.io/cluster": cluster, "ray.io/node-type": "head"}  # KubeRay's copy of ours
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{cluster}-head", "labels": labels},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "ray-head", "image": "trainer"}]}}
    kubectl(plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(pod))
    uid = get(plane, namespace, "pod", f"{cluster}-head")["metadata"]["uid"]
    wait_for("the default ServiceAccount", lambda: kubectl(plane, "get", "sa", "default", "-n", namespace, check=False).returncode == 0)
    return kubectl(plane, "create", "token", "default", "-n", namespace, "--audience=finetune-operator", "--duration=1h",
                   "--bound-object-kind=Pod", f"--bound-object-name={cluster}-head", f"--bound-object-uid={uid}").stdout.strip()


def progress(step: int, total: int = 100, state: str = "Running", **extra) -> dict:
    run = "s3://ftj/runs/x"
    return {
        "state": state, "step": step, "totalSteps": total, "updated": time.time(), "stepsPerSecond": 2.0,
        "metrics": {"train_loss": 2.0 - step / 100, "eval_loss": 1.5, "tokens_per_s": 1200.0},
        "latestCheckpoint": f"{run}/checkpoint_{step:08d}",
        "checkpoints": [{"step": s, "uri": f"{run}/checkpoint_{s:08d}", "evalLoss": 1.5} for s in range(10, step + 1, 10)],
        **extra,
    }


def report_of(obj: dict, progress: dict | None = None) -> dict:
    meta = obj["metadata"]
    return {"kind": obj["kind"], "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"],
            **({"progress": progress} if progress is not None else {})}


def test_examples_become_rayjobs_and_kuberay_creates_their_clusters(controlplane, operator):
    ns = KUBERAY_NAMESPACE
    create_secret(controlplane, ns)  # the GPU example's storage credentials
    kubectl(controlplane, "apply", "-n", ns, "-f", str(EXAMPLES[0].parent))
    try:
        for path in EXAMPLES:
            (job,) = load_manifests(path)
            uid = get(controlplane, ns, "ftj", job.name)["metadata"]["uid"]
            rj = rayjob_of(controlplane, ns, job.name)
            assert rj["metadata"]["ownerReferences"][0]["uid"] == uid
            cluster = rj["spec"]["rayClusterSpec"]
            head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0" and "nvidia.com/gpu" not in head["resources"]["limits"]
            (group,) = cluster["workerGroupSpecs"]
            worker = group["template"]["spec"]["containers"][0]
            assert group["replicas"] == job.spec.resources.nodes
            assert worker["resources"].get("limits", {}).get("nvidia.com/gpu", "0") == str(job.spec.resources.gpus_per_node)
            assert worker["securityContext"]["runAsNonRoot"] and worker["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") or e["value"] for e in worker["env"]}
            assert env["FINETUNE_STATUS_URL"] == operator.report_url  # where the run reports
            if job.spec.storage.credentials_secret:
                assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
            wait_for(f"KubeRay's RayCluster of {job.name}", lambda: owned(controlplane, ns, "rayclusters", rj["metadata"]["uid"]), 30)
            until_status(controlplane, ns, job.name, "phase Initializing", lambda s: s.get("phase") == "Initializing")
    finally:
        kubectl(controlplane, "delete", "-n", ns, "-f", str(EXAMPLES[0].parent), "--wait=false")


def test_a_pod_template_reaches_the_pods_kuberay_makes(controlplane, operator, tmp_path):
    """A service account, an env var from a Secret and a volume: on the head and worker pods
    KubeRay creates from the RayJob, beside the operator's own (the report token, /dev/shm)."""
    ns, name = KUBERAY_NAMESPACE, "shaped"
    template = {"serviceAccountName": "trainer", "labels": {"team": "vision"},
                "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
                "volumes": [{"name": "datasets", "emptyDir": {}}], "volumeMounts": [{"name": "datasets", "mountPath": "/datasets"}]}
    kubectl(controlplane, "create", "serviceaccount", "trainer", "-n", ns, check=False)
    apply(controlplane, ns, job_doc(name, tmp_path, TINY_BERT, podTemplate=template, resources={"nodes": 1}))
    try:
        def pods():
            found = get(controlplane, ns, "pods", "-l", f"finetune.dev/job={name}")["items"]
            return found if {p["metadata"]["labels"].get("ray.io/node-type") for p in found} == {"head", "worker"} else None

        for pod in wait_for("the head and worker pods", pods, 60):
            spec, (c,) = pod["spec"], pod["spec"]["containers"]
            assert spec["serviceAccountName"] == "trainer" and pod["metadata"]["labels"]["team"] == "vision"
            assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in c["env"]
            assert {"name": "datasets", "mountPath": "/datasets"} in [{k: m[k] for k in ("name", "mountPath")} for m in c["volumeMounts"]]
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert {"datasets", "shm", "finetune-report"} <= set(volumes)
            token = volumes["finetune-report"]["projected"]["sources"][0]["serviceAccountToken"]
            assert token["audience"] == "finetune-operator"
    finally:
        kubectl(controlplane, "delete", "ftj", name, "-n", ns, "--wait=false")


def test_status_follows_the_rayjob_and_the_runs_reports(controlplane, namespace, operator, tmp_path):
    job = apply(controlplane, namespace, job_doc("follow", tmp_path, TINY_BERT))
    rayjob_of(controlplane, namespace, "follow")
    until_status(controlplane, namespace, "follow", "Initializing", lambda s: s.get("phase") == "Initializing")

    cluster = "follow-raycluster-x1"
    drive(controlplane, namespace, "follow", jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName=cluster)
    token = ray_head(controlplane, namespace, "follow", cluster)
    assert operator.report(token, report_of(job, progress(40)))[0] == 200
    # The RayJob's status event and the report race each other: wait for both to show.
    st = until_status(controlplane, namespace, "follow", "Running at step 40",
                      lambda s: s.get("phase") == "Running" and s.get("progress", {}).get("step") == 40)
    assert st["progress"] == {"step": 40, "totalSteps": 100, "percent": 40}
    assert st["metrics"] == {"trainLoss": 1.6, "evalLoss": 1.5, "tokensPerS": 1200.0}
    assert st["latestCheckpoint"] == "s3://ftj/runs/x/checkpoint_00000040" and [c["step"] for c in st["checkpoints"]] == [40, 30, 20, 10]
    assert "estimatedFinish" in st and st["observedGeneration"] == job["metadata"]["generation"]
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Running"]["status"] == "True" and conditions["Ready"]["status"] == "True"
    assert set(conditions["Running"]) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert operator.metric("finetune_job_step", namespace=namespace, name="follow") == 40
    assert operator.metric("finetune_job_train_loss", namespace=namespace, name="follow") == 1.6
    assert operator.metric("finetune_jobs", kind="FineTuneJob", phase="Running") >= 1
    # kubectl explain reads the status schema the models generated.
    explained = kubectl(controlplane, "explain", "ftj.status.progress").stdout
    assert "totalSteps" in explained and "percent" in explained

    # Who may report: a token not for the operator's audience, or of another job's pod, is refused.
    default = kubectl(controlplane, "create", "token", "default", "-n", namespace, "--duration=1h").stdout.strip()
    assert operator.report(default, report_of(job, progress(50)))[0] == 401
    other = ray_head(controlplane, namespace, "someone-else", "other-raycluster-x1")
    code, text, _ = operator.report(other, report_of(job, progress(50)))
    assert code == 403 and "does not run FineTuneJob" in text
    # Polls that find nothing new write nothing: the object's resourceVersion stays.
    version = get(controlplane, namespace, "ftj", "follow")["metadata"]["resourceVersion"]
    time.sleep(3)  # six polls
    assert get(controlplane, namespace, "ftj", "follow")["metadata"]["resourceVersion"] == version

    drive(controlplane, namespace, "follow", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    final = progress(100, state="Succeeded", modelURI="s3://ftj/runs/x/output/model")
    assert operator.report(token, report_of(job, final))[0] == 200
    # A final report is answered once the status has it: the run's driver exits right after.
    st = until_status(controlplane, namespace, "follow", "Succeeded", lambda s: s.get("phase") == "Succeeded" and "modelURI" in s)
    assert st["modelURI"] == "s3://ftj/runs/x/output/model" and st["progress"]["percent"] == 100 and "estimatedFinish" not in st
    assert {c["type"]: c["status"] for c in st["conditions"]}["Succeeded"] == "True"
    wait_for("the Succeeded Event", lambda: ("Normal", "Succeeded") in events_of(controlplane, namespace, "follow"), 15)
    assert [r for _, r in events_of(controlplane, namespace, "follow")] == ["Initializing", "Training", "Succeeded"], operator.log.read_text()[-5000:]

    # A finished job's RayJob deleted by hand is not made again (that would train it again).
    kubectl(controlplane, "delete", "rayjob", "follow", "-n", namespace)
    time.sleep(2)  # four polls
    assert kubectl(controlplane, "get", "rayjob", "follow", "-n", namespace, check=False).returncode != 0
    assert status_of(controlplane, namespace, "follow")["phase"] == "Succeeded"

    # Structured logs: every line the operator wrote is a JSON object.
    lines = [line for line in operator.log.read_text().splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def test_invalid_input_fails_at_once_naming_the_column_without_a_second_attempt(controlplane, namespace, operator, tmp_path):
    """The real RayJob entrypoint, run as the head runs it (with the pod's token), finds the
    missing label column before any worker starts and reports InvalidInput: the job fails at
    once and the RayJob is applied with backoffLimit 0, so KubeRay starts no second cluster."""
    doc = job_doc("nolabel", tmp_path, TINY_BERT, retries=2)
    doc["spec"]["dataset"]["labelColumn"] = "stars"
    apply(controlplane, namespace, doc)
    rj = rayjob_of(controlplane, namespace, "nolabel")
    assert rj["spec"]["backoffLimit"] == 2
    cluster = "nolabel-raycluster-x1"
    drive(controlplane, namespace, "nolabel", jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName=cluster)
    token_file = tmp_path / "token"
    token_file.write_text(ray_head(controlplane, namespace, "nolabel", cluster))
    entrypoint = shlex.split(rj["spec"]["entrypoint"])
    env = {**os.environ, "FINETUNE_STATUS_URL": operator.report_url, "FINETUNE_STATUS_TOKEN_FILE": str(token_file)}
    driver = subprocess.run([sys.executable, *entrypoint[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 1, driver.stderr[-3000:]
    st = status_of(controlplane, namespace, "nolabel")  # the driver's last report was answered once written
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidInput"), st
    assert "spec.dataset.train row 0: no column 'stars'" in st["message"] and st["attempts"] == 1
    assert rayjob_of(controlplane, namespace, "nolabel")["spec"]["backoffLimit"] == 0
    drive(controlplane, namespace, "nolabel", jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", failed=1)
    time.sleep(1)  # two polls: the Failed phase and its reason stay
    assert status_of(controlplane, namespace, "nolabel")["reason"] == "InvalidInput"
    wait_for("a Warning Event", lambda: ("Warning", "InvalidInput") in events_of(controlplane, namespace, "nolabel"), 15)


def test_a_rayjob_of_the_same_name_that_is_not_ours_is_left_alone_until_it_is_gone(controlplane, namespace, operator, tmp_path):
    """Whether the name is free comes from the operator's watch of every RayJob, not a GET:
    someone else's RayJob is named in the status and not touched; once deleted, ours is made."""
    theirs = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "taken"}, "spec": {"entrypoint": "python theirs.py"}}
    kubectl(controlplane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(theirs))
    before = rayjob_of(controlplane, namespace, "taken")
    uid = apply(controlplane, namespace, job_doc("taken", tmp_path, TINY_BERT))["metadata"]["uid"]
    st = until_status(controlplane, namespace, "taken", "RayJobNameTaken", lambda s: s.get("reason") == "RayJobNameTaken")
    assert "RayJob" in st["message"] and "delete it" in st["message"] and not st.get("rayJobName")
    after = rayjob_of(controlplane, namespace, "taken")
    assert (after["metadata"]["resourceVersion"], after["spec"]) == (before["metadata"]["resourceVersion"], before["spec"])
    kubectl(controlplane, "delete", "rayjob", "taken", "-n", namespace)
    (ours,) = wait_for("our RayJob, once theirs is gone", lambda: owned(controlplane, namespace, "rayjobs", uid), 30)
    assert ours["spec"]["entrypoint"] != "python theirs.py"


def test_a_failed_run_reports_the_programs_error(controlplane, namespace, operator, tmp_path):
    job = apply(controlplane, namespace, job_doc("fails", tmp_path, TINY_BERT))
    rayjob_of(controlplane, namespace, "fails")
    token = ray_head(controlplane, namespace, "fails", "fails-raycluster-x1")
    drive(controlplane, namespace, "fails", jobDeploymentStatus="Running", rayClusterName="fails-raycluster-x1")
    failed = progress(30, state="Failed", error="storage error (s3://ftj/runs): Connection was closed", reason="StorageError")
    assert operator.report(token, report_of(job, failed))[0] == 200
    drive(controlplane, namespace, "fails", jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", failed=1)
    st = until_status(controlplane, namespace, "fails", "Failed", lambda s: s.get("phase") == "Failed" and "storage error" in s.get("message", ""))
    assert st["reason"] == "StorageError" and st["attempts"] == 1  # KubeRay's failed: 1 counts this, the only one
    wait_for("a Warning Event", lambda: ("Warning", "StorageError") in events_of(controlplane, namespace, "fails"), 15)


def test_pods_that_cannot_start_say_why_and_the_operator_reads_no_secret(controlplane, namespace, operator, tmp_path):
    """The kubelet's word on a pod whose Secret is missing (written here as the kubelet writes
    it: there is none) becomes the job's reason; the operator never reads the Secret."""
    apply(controlplane, namespace, job_doc("nosecret", tmp_path, TINY_BERT, storage={
        "uri": "s3://ftj/runs", "endpoint": "http://minio:9000", "credentialsSecret": {"name": "absent"}}))
    rayjob_of(controlplane, namespace, "nosecret")  # created at once: the pods' status will say what is missing
    ray_head(controlplane, namespace, "nosecret", "nosecret-raycluster-x1")
    waiting = {"containerStatuses": [{"name": "ray-head", "image": "trainer", "imageID": "", "ready": False, "restartCount": 0,
                                      "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "absent" not found'}}}]}
    kubectl(controlplane, "patch", "pod", "nosecret-raycluster-x1-head", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": waiting}))
    st = until_status(controlplane, namespace, "nosecret", "SecretNotFound", lambda s: s.get("reason") == "SecretNotFound")
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert st["phase"] == "Initializing" and ready["status"] == "False" and ready["reason"] == "SecretNotFound"
    assert "spec.storage.credentialsSecret" in st["message"] and 'secret "absent" not found' in st["message"]
    wait_for("a Warning Event", lambda: ("Warning", "SecretNotFound") in events_of(controlplane, namespace, "nosecret"), 15)
    assert "secrets" not in operator.log.read_text()


def test_mutable_fields_reach_the_rayjob_and_retries_continue_the_same_run(controlplane, operator, tmp_path):
    """Real KubeRay: resources change the RayJob; suspend stops the Ray cluster and resume
    starts a new one; a retry (KubeRay's Retrying, after it counted a failure against
    backoffLimit) starts attempt 2 on a new cluster with the same run name."""
    ns, name = KUBERAY_NAMESPACE, "lifecycle"
    doc = job_doc(name, tmp_path, TINY_BERT, retries=2, podTemplate={"labels": {"team": "a"}})
    try:
        job = apply(controlplane, ns, doc)
        rj = rayjob_of(controlplane, ns, name)
        entrypoint = rj["spec"]["entrypoint"]
        first = wait_for("the first RayCluster", lambda: owned(controlplane, ns, "rayclusters", rj["metadata"]["uid"]), 30)[0]

        kubectl(controlplane, "patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"resources":{"nodes":3}}}')
        wait_for("3 worker replicas", lambda: rayjob_of(controlplane, ns, name)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3)
        # A field the RayJob was created with and the spec stops asking for leaves it: the create's
        # fields were made ours as an applier's before the first apply.
        def head_labels():
            return rayjob_of(controlplane, ns, name)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
        assert head_labels()["team"] == "a"
        kubectl(controlplane, "patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"podTemplate":null}}')
        wait_for("the pod label gone", lambda: "team" not in head_labels())
        shown = json.loads(kubectl(controlplane, "get", "rayjob", name, "-n", ns, "-o", "json", "--show-managed-fields").stdout)
        managers = [(m["manager"], m["operation"]) for m in shown["metadata"]["managedFields"]]
        assert ("finetune-operator", "Apply") in managers and ("finetune-operator", "Update") not in managers

        kubectl(controlplane, "patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
        until_status(controlplane, ns, name, "Suspended", lambda s: s.get("phase") == "Suspended" and s.get("reason") == "Suspended", 60)
        assert rayjob_of(controlplane, ns, name)["spec"]["suspend"] is True
        wait_for("KubeRay to delete the cluster", lambda: not owned(controlplane, ns, "rayclusters", rj["metadata"]["uid"]) or all(
            "deletionTimestamp" in c["metadata"] for c in owned(controlplane, ns, "rayclusters", rj["metadata"]["uid"])), 60)

        kubectl(controlplane, "patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
        resumed = wait_for("a new RayCluster", lambda: [c for c in owned(controlplane, ns, "rayclusters", rj["metadata"]["uid"])
                                                      if c["metadata"]["name"] != first["metadata"]["name"] and "deletionTimestamp" not in c["metadata"]], 60)[0]
        until_status(controlplane, ns, name, "Initializing", lambda s: s.get("phase") == "Initializing")
        assert resumed["spec"]["workerGroupSpecs"][0]["replicas"] == 3

        drive(controlplane, ns, name, jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=1)
        wait_for("attempt 2's RayCluster", lambda: [c for c in owned(controlplane, ns, "rayclusters", rj["metadata"]["uid"])
                                                   if c["metadata"]["name"] not in (first["metadata"]["name"], resumed["metadata"]["name"])
                                                   and "deletionTimestamp" not in c["metadata"]], 60)
        until_status(controlplane, ns, name, "attempt 2", lambda s: s.get("attempts") == 2)
        # Every attempt runs the same entrypoint: the same run name, so it resumes the same checkpoints.
        run_name = f"{name}-{job['metadata']['uid'][:8]}"
        assert rayjob_of(controlplane, ns, name)["spec"]["entrypoint"].split("--job")[0] == entrypoint.split("--job")[0]
        from finetune_api.spec import decode_job

        assert decode_job(rayjob_of(controlplane, ns, name)["spec"]["entrypoint"].split()[-1]).run_name == run_name
        wait_for("a Retrying Event", lambda: ("Normal", "Retrying") in events_of(controlplane, ns, name), 15)
    finally:
        kubectl(controlplane, "delete", "ftj", name, "-n", ns, "--wait=false", check=False)
    # Deleting the FineTuneJob deletes its RayJob (owner reference; KubeRay's finalizer may hold it a moment).
    wait_for("the RayJob to go", lambda: kubectl(controlplane, "get", "rayjob", name, "-n", ns, check=False).returncode != 0, 60)


def test_an_operator_killed_while_creating_50_jobs_leaves_exactly_one_rayjob_each(controlplane, namespace, tmp_path):
    docs = [job_doc(f"burst-{i:02d}", tmp_path, TINY_BERT) for i in range(50)]
    args = ("--namespace", namespace, "--no-leader-election")
    first = Operator(controlplane, tmp_path / "first.log", *args)
    count = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    applying = subprocess.Popen([KUBECTL, f"--kubeconfig={controlplane.kubeconfig}", "apply", "-n", namespace, "-f", "-"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    applying.stdin.write(yaml.safe_dump_all(docs))
    applying.stdin.close()
    wait_for("the first RayJob", lambda: controlplane.api("GET", count)["items"], 60, every=0.01)
    first.stop(signal.SIGKILL)  # mid-burst: jobs still arriving, some RayJobs made, some not
    assert applying.wait(timeout=60) == 0
    created = len(controlplane.api("GET", count)["items"])
    second = Operator(controlplane, tmp_path / "second.log", *args)
    try:
        wait_for("50 RayJobs", lambda: len(get(controlplane, namespace, "rayjobs")["items"]) >= 50, 120)
        time.sleep(2)  # a duplicate, were one made, would show up now
        rayjobs = get(controlplane, namespace, "rayjobs")["items"]
        jobs = {j["metadata"]["name"]: j["metadata"]["uid"] for j in get(controlplane, namespace, "ftj")["items"]}
        assert len(rayjobs) == 50 and created < 50, f"{created} created before the kill"
        assert {r["metadata"]["name"]: r["metadata"]["ownerReferences"][0]["uid"] for r in rayjobs} == jobs
    finally:
        assert second.stop() == 0
    # With no operator running the jobs can still be deleted: the operator puts no finalizer on them.
    kubectl(controlplane, "delete", "ftj", "--all", "-n", namespace, "--timeout=30s")


def test_only_the_lease_holder_acts_and_a_successor_takes_over(controlplane, namespace, tmp_path):
    args = ("--namespace", namespace)
    lease = f"lease-{namespace}"
    leader = Operator(controlplane, tmp_path / "leader.log", *args, lease=lease)
    wait_for("the Lease", lambda: kubectl(controlplane, "get", "lease", lease, "-n", "default", check=False).returncode == 0)
    follower = Operator(controlplane, tmp_path / "follower.log", *args, lease=lease)
    try:
        apply(controlplane, namespace, job_doc("led", tmp_path, TINY_BERT))
        rayjob_of(controlplane, namespace, "led")
        holder = get(controlplane, "default", "lease", lease)["spec"]["holderIdentity"]
        assert holder.endswith(str(leader.proc.pid))
        # A run's report that reaches the follower (the Service picks any replica) is sent to the leader.
        code, _, location = follower.report("any-token", {})
        assert (code, location) == (307, leader.report_url)
        assert follower.metric("finetune_reconcile_duration_seconds_count", trigger="finetunejob") is None  # it never acted
        assert leader.metric("finetune_reconcile_duration_seconds_count", trigger="finetunejob") >= 1

        assert leader.stop() == 0  # a clean stop hands the Lease over at once
        apply(controlplane, namespace, job_doc("succeeded-leader", tmp_path, TINY_BERT))
        rayjob_of(controlplane, namespace, "succeeded-leader", timeout=30)
        assert get(controlplane, "default", "lease", lease)["spec"]["holderIdentity"].endswith(str(follower.proc.pid))
    finally:
        leader.stop()
        assert follower.stop() == 0
